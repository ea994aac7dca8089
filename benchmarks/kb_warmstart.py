"""Warm start from the knowledge base on held-out Omniglot-small alphabets.

Setup (one torch thread, first-order MAML on conv4 with 32 channels to fit a shared 2-core CPU,
28x28, no rotations):

1. Alphabets are split by a seeded permutation: ``--test-alphabets`` held out, the rest train.
2. The plain meta-learned initialisation: FOMAML meta-trained ``--global-steps`` steps on tasks
   of all training alphabets (5-way 1-shot, 5 queries, meta-batch 4, inner lr 0.4, 1 step).
3. One knowledge-base entry per training alphabet: the global initialisation meta-trained
   ``--specialise-steps`` more steps on that alphabet's tasks only, stored with the task vector
   of that alphabet (all its classes, 5 shots each).
4. On the same held-out test episodes (5-way ``--shots``-shot, 15 queries, each drawn within one
   test alphabet), the model to adapt is the knowledge base's ``nearest``, its ``model-based``
   choice (top-3 by leave-one-out loss on the support set, 1 adaptation step, 5 folds: one
   example of each class left out in turn), the plain
   initialisation, or a ``random`` stored model; each is adapted with 0, 1, 5 and 20 steps and
   scored on the query set. Mean accuracy ± 95% CI over episodes.

Run: flock /tmp/metaml-heavy.lock python -m benchmarks.kb_warmstart --record
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from typing import Any

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from benchmarks.common import OMNIGLOT, append_section, held_out_alphabets, machine
from metaml.algorithms import create_learner
from metaml.algorithms.base import MetaLearner
from metaml.config import load_config
from metaml.data import ClassDataset
from metaml.engine import Trainer
from metaml.kb import KnowledgeBase
from metaml.tasks import EpisodeSampler

STEPS = (0, 1, 5, 20)
STARTS = ("kb nearest", "kb model-based", "plain meta-learned init", "kb random")


def config(dataset_root: str, steps: int) -> Any:
    return load_config(
        None,
        ["algorithm.name=fomaml", "algorithm.inner_lr=0.4", "algorithm.inner_steps=1",
         "model.backbone=conv4", "model.backbone_options={hidden: 32}", "data.dataset=omniglot-small", f"data.root={dataset_root}",
         "data.ways=5", "data.shots=1", "data.queries=5", "data.meta_batch_size=4",
         f"train.steps={steps}", "train.lr=0.001", f"train.log_every={max(steps, 1)}",
         f"train.val_every={steps + 1}", f"train.checkpoint_every={steps}"],
    )  # fmt: skip


def meta_train(learner: MetaLearner, ds: ClassDataset, steps: int, seed: int, cfg: Any) -> None:
    sampler = EpisodeSampler(ds, ways=5, shots=1, queries=5, meta_batch_size=4, seed=seed)
    with tempfile.TemporaryDirectory() as run_dir:
        Trainer(learner, sampler, None, cfg.train.model_copy(update={"steps": steps}), run_dir,
                device="cpu", quiet=True).fit()  # fmt: skip


def alphabet_task(ds: ClassDataset, alphabet: str, seed: int) -> Any:
    classes = [c for c, g in enumerate(ds.class_groups) if g == alphabet]
    sub = ds.subset_classes(classes)
    return EpisodeSampler(sub, ways=len(classes), shots=5, queries=1, seed=seed).episode(0)


@torch.no_grad()
def accuracy(predictor: Any, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((predictor(x).argmax(-1) == y).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--omniglot", default=OMNIGLOT)
    parser.add_argument("--test-alphabets", type=int, default=2)
    parser.add_argument("--global-steps", type=int, default=200)
    parser.add_argument("--specialise-steps", type=int, default=40)
    parser.add_argument("--episodes", type=int, default=60)
    parser.add_argument("--shots", type=int, default=5)
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    threadpool_limits(1)
    started = time.perf_counter()

    train, test, train_names, test_names = held_out_alphabets(args.omniglot, args.test_alphabets)
    print(f"train alphabets {train_names}; test alphabets {test_names}", flush=True)

    cfg = config(args.omniglot, args.global_steps)
    spec = {
        "input_shape": list(train.shape),
        "task_type": "classification",
        "ways": 5,
        "num_classes": 0,
    }
    torch.manual_seed(0)
    init = create_learner(cfg, train.shape, "classification", ways=5)
    meta_train(init, train, args.global_steps, seed=0, cfg=cfg)
    print(f"global init trained in {time.perf_counter() - started:.0f} s", flush=True)

    folder = tempfile.mkdtemp(prefix="kb-warmstart-")
    kb = KnowledgeBase(folder, create=True)
    for i, name in enumerate(train_names):
        learner = copy.deepcopy(init)
        own = train.subset_classes(np.flatnonzero(np.asarray(train.class_groups) == name))
        meta_train(learner, own, args.specialise_steps, seed=100 + i, cfg=cfg)
        kb.add(learner, alphabet_task(train, name, seed=i), config=cfg, model_spec=spec, name=name,
               dataset="omniglot-small", metadata={"alphabet": name})  # fmt: skip
        print(
            f"specialised {name} ({own.num_classes} classes) at {time.perf_counter() - started:.0f} s",
            flush=True,
        )
    train_seconds = time.perf_counter() - started

    sampler = EpisodeSampler(
        test, ways=5, shots=args.shots, queries=15, within_group=True, seed=1234
    )
    acc: dict[str, dict[int, list[float]]] = {s: {k: [] for k in STEPS} for s in STARTS}
    chosen: dict[str, list[str]] = {s: [] for s in STARTS}
    cache: dict[int, MetaLearner] = {}
    for e in range(args.episodes):
        task = sampler.episode(e)
        alphabet = test.class_groups[int(task.classes[0])]  # type: ignore[index]
        starts: dict[str, MetaLearner] = {"plain meta-learned init": init}
        for start, strategy in (("kb nearest", "nearest"), ("kb model-based", "model-based"),
                                ("kb random", "random")):  # fmt: skip
            ws = kb.warm_start(task, strategy, k=3, steps=1, seed=e, max_folds=5)  # type: ignore[arg-type]
            starts[start] = cache.setdefault(ws.entry.id, ws.learner)
            chosen[start].append(ws.entry.name)
        for start, learner in starts.items():
            for k in STEPS:
                predictor = learner.adapt(task.support_x, task.support_y, steps=k)
                acc[start][k].append(accuracy(predictor, task.query_x, task.query_y))
        if e % 20 == 0:
            print(f"episode {e} ({alphabet}) at {time.perf_counter() - started:.0f} s", flush=True)
    results = {
        s: {
            k: (100 * float(np.mean(v)), 196 * float(np.std(v, ddof=1)) / np.sqrt(len(v)))
            for k, v in r.items()
        }
        for s, r in acc.items()
    }
    diffs = {
        s: {k: _paired(acc[s][k], acc["plain meta-learned init"][k]) for k in STEPS}
        for s in STARTS if s != "plain meta-learned init"
    }  # fmt: skip
    counts = {
        s: {n: chosen[s].count(n) for n in sorted(set(chosen[s]))} for s in STARTS if chosen[s]
    }
    total = time.perf_counter() - started
    print(json.dumps({"results": results, "diffs": diffs, "chosen": counts}), flush=True)
    if args.record:
        append_section("Knowledge-base warm start on held-out Omniglot-small alphabets",
                       report(args, train_names, test_names, results, diffs, counts, train_seconds, total))  # fmt: skip


def _paired(a: list[float], b: list[float]) -> tuple[float, float]:
    d = 100 * (np.asarray(a) - np.asarray(b))
    return float(d.mean()), float(1.96 * d.std(ddof=1) / np.sqrt(len(d)))


def report(args: Any, train_names: list[str], test_names: list[str], results: dict[str, Any],
           diffs: dict[str, Any], counts: dict[str, Any], train_seconds: float, total: float) -> str:  # fmt: skip
    lines = [
        f"`python -m benchmarks.kb_warmstart --record` (conv4 with 32 channels; global {args.global_steps} FOMAML steps, "
        f"{args.specialise_steps} more per training alphabet, {args.episodes} test episodes).",
        f"Training alphabets (one stored model each): {', '.join(train_names)}; held out: {', '.join(test_names)}.",
        f"5-way {args.shots}-shot, 15 queries, each episode within one held-out alphabet; the same episodes for",
        "every start. Accuracy in % ± 95% CI after k adaptation steps (inner lr 0.4). model-based: top-3",
        "by representation, scored by leave-one-out loss after 1 step (5 folds). random: a uniformly random stored",
        f"model per episode. CPU: training {train_seconds:.0f} s, total {total:.0f} s. Machine: {machine()}.",
        "",
        "| start | " + " | ".join(f"{k} steps" for k in STEPS) + " |",
        "|---|" + "---|" * len(STEPS),
    ]
    for s, r in results.items():
        lines.append(
            f"| {s} | " + " | ".join(f"{r[k][0]:.1f} ± {r[k][1]:.1f}" for k in STEPS) + " |"
        )
    lines += ["", "Paired difference to the plain initialisation (percentage points, same episodes):", "",
              "| start | " + " | ".join(f"{k} steps" for k in STEPS) + " |", "|---|" + "---|" * len(STEPS)]  # fmt: skip
    for s, r in diffs.items():
        lines.append(
            f"| {s} − plain | "
            + " | ".join(f"{r[k][0]:+.1f} ± {r[k][1]:.1f}" for k in STEPS)
            + " |"
        )
    lines += ["", "Which stored model each strategy chose (episodes): "
              + "; ".join(f"{s}: {c}" for s, c in counts.items() if s.startswith("kb"))]  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    main()
