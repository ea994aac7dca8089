"""MANN's accuracy by instance on Omniglot-small, against Santoro et al. (2016), Table 1.

Meta-trains the MANN of ``configs/mann-omniglot.yaml`` within a CPU time budget (one torch
thread), then runs held-out test episodes (test alphabets, fixed seed) as sequences of 5
classes x 10 instances and scores the prediction at the 1st, 2nd, ... 10th instance of each
class, with a 95% CI over episodes. Also evaluates ``adapt`` (the common interface) 5-way 1-
and 5-shot. Writes into the run directory ``by-instance.json`` and ``by-instance.png`` (the
curve, with the paper's points) and the adapt evaluations under ``eval/``, and appends the
table to ``benchmarks/RESULTS.md`` (section ``## MANN``).

Run: ``python -m benchmarks.mann_instances`` (``--budget-min 25``, ``--episodes 1000``,
``--eval-only`` to score an existing run).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import torch

from metaml.algorithms.mann import MANN, accuracy_by_instance, episode_sequence
from metaml.config import RunConfig, load_config
from metaml.engine import Trainer, latest_checkpoint, load_checkpoint
from metaml.evaluate import Result, evaluate, mean_ci95
from metaml.io import atomic_write_text
from metaml.report import save_eval
from metaml.runs import RunData, build_samplers
from metaml.tasks import EpisodeSampler, TaskBatch

# Santoro et al. 2016, Table 1: MANN (LRUA), Omniglot, 5 classes, one-hot labels, percent.
PAPER = {1: 36.4, 2: 82.8, 3: 91.0, 4: 92.6, 5: 94.9, 10: 98.1}
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
INSTANCES = 10
TRAINING = "training.json"  # steps done and their wall and CPU seconds, after every chunk


def load_run_config(path: Path, overrides: list[str]) -> tuple[RunConfig, dict[str, Any]]:
    """The run config and MANN's options from a YAML file and ``a.b=value`` overrides."""
    cfg = load_config(path, overrides)
    return cfg, cfg.algorithm.model_dump(exclude={"name"})


def build(cfg: RunConfig, options: dict[str, Any]) -> tuple[RunData, MANN]:
    """The run's samplers and a fresh MANN for its episodes."""
    data = build_samplers(cfg)
    learner = MANN(
        None, task_type="classification", ways=data.train.ways,
        input_shape=data.train.input_shape, **options,
    )  # fmt: skip
    return data, learner


def train_within(
    cfg: RunConfig, learner: MANN, data: RunData, run_dir: Path, budget_s: float, chunk: int
) -> dict[str, Any]:
    """Meta-train in chunks of ``chunk`` steps until ``cfg.train.steps`` or the time budget.

    Each chunk resumes the previous one from its checkpoint (the trainer's resume is bitwise
    exact and the learning rate is constant), so this is one run that stops on time. The budget
    is this process's CPU time (the machine is shared: wall-clock time depends on the others).
    """
    started, cpu_started, done = time.perf_counter(), time.process_time(), 0
    info: dict[str, Any] = {"steps": 0, "train_s": 0.0, "train_cpu_s": 0.0}
    while done < cfg.train.steps and time.process_time() - cpu_started < budget_s:
        train_cfg = cfg.train.model_copy(update={"steps": min(done + chunk, cfg.train.steps)})
        trainer = Trainer(
            learner, data.train, data.val, train_cfg, run_dir, torch.device("cpu"), quiet=True
        )
        summary = (trainer.resume() if done else trainer).fit()
        done = int(summary["step"])
        info = {"steps": done, "train_s": time.perf_counter() - started,
                "train_cpu_s": time.process_time() - cpu_started}  # fmt: skip
        # written after every chunk, so a run stopped by hand is still scored with its cost
        atomic_write_text(run_dir / TRAINING, json.dumps(info))
        print(f"step {done}: {done / info['train_s']:.2f} steps/s, "
              f"best val {summary.get('best_value')}", flush=True)  # fmt: skip
    return info


def test_protocol_on(train: EpisodeSampler, test: EpisodeSampler) -> EpisodeSampler:
    """The test sampler's episodes (ways, shots, queries, seed) drawn from the training classes."""
    return EpisodeSampler(
        train.source, ways=test.ways, shots=test.shots, queries=test.queries, seed=test.seed,
        within_group=test.within_group, rotations=test.rotations,
    )  # fmt: skip


def by_instance(
    learner: MANN, sampler: EpisodeSampler, episodes: int, chunk: int = 50
) -> np.ndarray:
    """Per-episode accuracy ``(episodes, INSTANCES)`` on the sampler's episodes as sequences."""
    rows = []
    learner.eval()
    with torch.no_grad():
        for first in range(0, episodes, chunk):
            batch = TaskBatch.stack(
                [sampler.episode(i) for i in range(first, min(first + chunk, episodes))]
            )
            x, y = episode_sequence(batch)  # (b, T, ...), order fixed by each batch's contents
            logits, _ = learner(x, y)
            rows.append(accuracy_by_instance(logits, y, INSTANCES))
    return torch.cat(rows).numpy()


def plot(
    path: Path, means: list[float], cis: list[float], title: str, seen: list[float] | None = None
) -> None:
    """The accuracy-by-instance curve with its 95% band, the paper's points and, when given,
    the same model's curve on its training alphabets (``seen``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = np.arange(1, len(means) + 1)
    m, c = 100 * np.asarray(means), 100 * np.asarray(cis)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(k, m, "o-", label="metaml MANN (this run)")
    ax.fill_between(k, m - c, m + c, alpha=0.25, label="95% CI")
    if seen is not None:
        ax.plot(k, 100 * np.asarray(seen), "^:", color="tab:orange",
                label="same model, training alphabets")  # fmt: skip
    ax.plot(list(PAPER), list(PAPER.values()), "s--", color="gray", label="Santoro et al. 2016")
    ax.axhline(20, color="k", lw=0.5, ls=":")
    ax.set(
        xlabel="instance of the class in the episode",
        ylabel="accuracy (%)",
        title=title,
        ylim=(0, 100),
        xticks=k,
    )
    ax.legend(loc="lower right")
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def append_results(rows: list[str]) -> None:
    """Append to RESULTS.md: new rows under ``## MANN`` if it is the last section, else a new section."""
    text = RESULTS.read_text(encoding="utf-8") if RESULTS.exists() else "# Benchmark results\n"
    headings = [line for line in text.splitlines() if line.startswith("## ")]
    header = ""
    if not headings or headings[-1].strip() != "## MANN":
        header = "\n## MANN\n\n" + SECTION_INTRO + "\n" + TABLE_HEAD + "\n"
    with RESULTS.open("a", encoding="utf-8") as f:
        f.write(header + "\n".join(rows) + "\n")


SECTION_INTRO = (
    "Accuracy (%) at the k-th instance of a class, MANN with LRUA memory (Santoro et al. 2016),\n"
    "Omniglot-small, 5 classes per episode, 10 instances each (50-step sequences, labels shown one\n"
    "step late), test alphabets held out, mean ± 95% CI over test episodes. The paper trained\n"
    "100,000 episodes; here training stops at a CPU budget (one torch thread, shared 2-core\n"
    "machine). `adapt` columns: `evaluate` of the common interface, 5-way 1-/5-shot, 9/5 queries.\n"
    "Run: `python -m benchmarks.mann_instances` (options: the algorithm section of the config).\n"
)
TABLE_HEAD = (
    "| date | source | train episodes | CPU min (wall) | 1st | 2nd | 3rd | 4th | 5th | 10th | adapt 1-shot | adapt 5-shot | test episodes | options |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def result_rows(record: dict[str, Any]) -> list[str]:
    """The paper's row and this run's, for the RESULTS.md table."""
    cells = [
        f"{100 * m:.1f} ± {100 * c:.1f}"
        for m, c in zip(record["mean"], record["ci95"], strict=True)
    ]
    ours = [cells[k - 1] for k in PAPER]
    adapt = [
        f"{100 * record['adapt'][s]['mean']:.1f} ± {100 * record['adapt'][s]['ci95']:.1f}"
        for s in ("1", "5")
    ]
    paper = " | ".join(f"{v:.1f}" for v in PAPER.values())
    rows = [
        f"| {record['date']} | Santoro et al. 2016 | 100,000 | (GPU) | {paper} | | | | |",
        f"| {record['date']} | metaml | {record['train_episodes']:,} | "
        f"{record['cpu_min']:.1f} ({record['wall_min']:.1f}) | "
        f"{' | '.join(ours)} | {adapt[0]} | {adapt[1]} | {record['episodes']} | {record['options']} |",
    ]
    if "train_alphabets" in record:  # the same model on episodes of its training characters
        seen = record["train_alphabets"]
        cells = [
            f"{100 * m:.1f} ± {100 * c:.1f}"
            for m, c in zip(seen["mean"], seen["ci95"], strict=True)
        ]
        rows.append(
            f"| {record['date']} | metaml, training alphabets | (same run) | | "
            f"{' | '.join(cells[k - 1] for k in PAPER)} | | | {record['episodes']} | |"
        )
    return rows


def evaluate_adapt(learner: MANN, cfg: RunConfig, episodes: int) -> dict[str, Result]:
    """``evaluate`` through ``adapt``: 5-way 1-shot (9 queries) and 5-shot (5 queries) test episodes."""
    out = {}
    for shots in (1, 5):
        cfg_s = cfg.model_copy(update={"data": cfg.data.model_copy(update={"queries": 10 - shots})})
        sampler = build_samplers(cfg_s, eval_shots=shots).test
        out[str(shots)] = evaluate(learner, sampler, episodes)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", type=Path, default=Path("configs/mann-omniglot.yaml"))
    parser.add_argument("--run-dir", type=Path, default=Path("runs/mann-omniglot"))
    parser.add_argument("--budget-min", type=float, default=25.0, help="training CPU-time budget")
    parser.add_argument("--chunk", type=int, default=500, help="steps between budget checks")
    parser.add_argument("--episodes", type=int, default=1000, help="test episodes")
    parser.add_argument(
        "--eval-only", action="store_true", help="score the run's latest checkpoint"
    )
    parser.add_argument("--no-results", action="store_true", help="do not append to RESULTS.md")
    parser.add_argument("--set", nargs="*", default=[], help="config overrides, as metaml train")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg, options = load_run_config(args.config, args.set)
    torch.manual_seed(cfg.seed)
    data, learner = build(cfg, options)
    run_dir: Path = args.run_dir
    info: dict[str, Any] = {"steps": 0, "train_s": 0.0}
    if not args.eval_only:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "config.yaml", cfg.to_yaml())
        info = train_within(cfg, learner, data, run_dir, 60 * args.budget_min, args.chunk)
    else:  # the training cost as the training run left it
        for name in (TRAINING, "by-instance.json"):
            if (run_dir / name).exists():
                info = json.loads((run_dir / name).read_text())
                break
    checkpoint = latest_checkpoint(run_dir)
    assert checkpoint is not None, f"{run_dir} has no checkpoint"
    load_checkpoint(checkpoint, learner, restore_rng=False)
    steps = int(info.get("steps", 0))
    started, cpu_started = time.perf_counter(), time.process_time()
    scores = by_instance(learner, data.test, args.episodes)
    stats = [mean_ci95(scores[:, k]) for k in range(INSTANCES)]
    # The same protocol on the training characters (new drawings and label orders): how much of
    # the gap to the paper is generalisation to unseen alphabets rather than learning to bind.
    seen = by_instance(learner, test_protocol_on(data.train, data.test), args.episodes)
    seen_stats = [mean_ci95(seen[:, k]) for k in range(INSTANCES)]
    adapt = evaluate_adapt(learner, cfg, args.episodes)
    for shots, result in adapt.items():  # the run report lists these with its own evaluations
        save_eval(run_dir, result, dataset=cfg.data.dataset, ways=cfg.data.ways, shots=int(shots),
                  queries=10 - int(shots), steps=None, checkpoint="last")  # fmt: skip
    eval_s, eval_cpu_s = time.perf_counter() - started, time.process_time() - cpu_started
    record = {
        "date": date.today().isoformat(),
        "steps": steps,
        "train_s": info.get("train_s", 0.0),
        "eval_s": eval_s,
        "train_episodes": steps * cfg.data.meta_batch_size,
        "train_cpu_s": info.get("train_cpu_s", 0.0),
        "eval_cpu_s": eval_cpu_s,
        "cpu_min": (info.get("train_cpu_s", 0.0) + eval_cpu_s) / 60,
        "wall_min": (info.get("train_s", 0.0) + eval_s) / 60,
        "episodes": args.episodes,
        "instances": list(range(1, INSTANCES + 1)),
        "mean": [m for m, _ in stats],
        "ci95": [c for _, c in stats],
        "paper": PAPER,
        "adapt": {s: {"mean": r.mean, "ci95": r.ci95} for s, r in adapt.items()},
        "train_alphabets": {"mean": [m for m, _ in seen_stats], "ci95": [c for _, c in seen_stats]},
        "checkpoint": checkpoint.name,
        "options": ", ".join(f"{k}={v}" for k, v in options.items())
        + f", image {cfg.data.image_size}",
        "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}, 1 thread",
    }
    (run_dir / "by-instance.json").write_text(json.dumps(record, indent=2), encoding="utf-8")
    plot(run_dir / "by-instance.png", record["mean"], record["ci95"],
         f"MANN, Omniglot-small 5-way, {record['train_episodes']:,} training episodes",
         seen=record["train_alphabets"]["mean"])  # fmt: skip
    rows = result_rows(record)
    print("\n".join([TABLE_HEAD, *rows]))
    if not args.no_results:
        append_results(rows)


if __name__ == "__main__":
    main()
