"""Tests of the run report: saved evaluations, the HTML/Markdown content, and end to end."""

from __future__ import annotations

import base64
import json
import math
import re
import time
from html import unescape
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest

from metaml.config import load_config
from metaml.evaluate import Result, compare
from metaml.report import (
    eval_filename,
    eval_result,
    format_diff,
    format_score,
    load_evals,
    resolve_test_steps,
    save_eval,
    write_report,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------- helpers


def _synthetic_run(
    run_dir: Path, *, seed: int = 0, offset: float = 0.0, shots: tuple[int, ...] = (1, 5)
) -> dict[int, Result]:
    """A sinusoid run directory without checkpoints: config, metrics and saved evaluations."""
    run_dir.mkdir(parents=True)
    cfg = load_config(None, [f"name={run_dir.name}", "data.shots=5"])
    (run_dir / "config.yaml").write_text(cfg.to_yaml())
    lines = []
    for step in range(10, 210, 10):
        record: dict[str, float] = {"step": step, "loss": 3 * math.exp(-step / 80), "lr": 1e-3}
        record["mse"] = record["loss"]
        if step % 50 == 0:
            record |= {"val_mse": record["loss"] + offset, "val_mse_ci95": 0.1}
        lines.append(json.dumps(record))
    # A torn last line, as left by a killed trainer: the report must skip it.
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 210, "lo')
    rng = np.random.default_rng(seed)
    results = {}
    for k in shots:
        scores = np.abs(rng.normal(2.0 / k + offset, 0.3, 100)).tolist()
        results[k] = Result.from_scores(scores, "mse", seed=cfg.eval.seed)
        save_eval(
            run_dir,
            results[k],
            dataset="sinusoid",
            ways=1,
            shots=k,
            queries=15,
            steps=resolve_test_steps(cfg),
            checkpoint="best",
        )
    return results


def _embedded_pngs(html: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([^"]+)"', html)]


def _table_rows(html: str) -> list[list[str]]:
    """The text of every body row's cells, across all tables of the page."""
    rows = re.findall(r"<tr>(.*?)</tr>", html)
    return [[unescape(c) for c in re.findall(r"<td[^>]*>(.*?)</td>", row)] for row in rows]


def _md_images(md: str) -> list[str]:
    return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)


# --------------------------------------------------------------------------- saved evaluations


def test_save_eval_round_trip(tmp_path: Path) -> None:
    result = Result.from_scores([0.5, 0.75, 1.0], "accuracy", seed=7, steps=10)
    path = save_eval(
        tmp_path,
        result,
        dataset="omniglot",
        ways=5,
        shots=1,
        queries=15,
        steps=10,
        checkpoint="last",
    )
    assert path == tmp_path / "eval" / "omniglot-5way-1shot-10steps.json"
    [record] = load_evals(tmp_path)
    assert record["ways"] == 5 and record["queries"] == 15 and record["checkpoint"] == "last"
    assert record["episodes"] == 3
    assert eval_result(record) == result


def test_eval_filename_is_safe_for_dataset_specs() -> None:
    assert eval_filename("npz:/data/my set.npz", 5, 1, None) == (
        "npz_data_my_set.npz-5way-1shot-defaultsteps.json"
    )


def test_load_evals_skips_unreadable_files(tmp_path: Path) -> None:
    save_eval(
        tmp_path,
        Result.from_scores([1.0, 2.0], "mse", seed=0),
        dataset="sinusoid",
        ways=1,
        shots=5,
        queries=10,
        steps=1,
        checkpoint="best",
    )
    (tmp_path / "eval" / "broken.json").write_text("{not json")
    (tmp_path / "eval" / "partial.json").write_text('{"mean": 1.0}')
    with pytest.warns(UserWarning, match="skipping unreadable evaluation"):
        records = load_evals(tmp_path)
    assert [r["shots"] for r in records] == [5]


def test_resolve_test_steps_prefers_eval_steps() -> None:
    assert (
        resolve_test_steps(load_config(None, ["algorithm.name=maml", "algorithm.inner_steps=3"]))
        == 3
    )
    assert (
        resolve_test_steps(
            load_config(None, ["algorithm.name=maml", "algorithm.test_inner_steps=7"])
        )
        == 7
    )
    assert resolve_test_steps(load_config(None, ["eval.steps=9"])) == 9
    assert resolve_test_steps(load_config(None, ["algorithm.name=protonet"])) == 0


def test_formatting() -> None:
    assert format_score(0.97123, 0.0041, "accuracy") == "97.12% ± 0.41"
    assert format_score(0.12345, 0.0042, "mse") == "0.123 ± 0.004"
    assert format_diff(-0.0123, 0.004, "accuracy") == "-1.23 pp ± 0.40"
    assert format_diff(0.0123, 0.004, "mse") == "+0.012 ± 0.004"


# --------------------------------------------------------------------------- report content


def test_single_run_report_from_saved_files(tmp_path: Path) -> None:
    run = tmp_path / "maml-sin"
    results = _synthetic_run(run)
    html_path, md_path = write_report([run], progress=False)
    assert (html_path, md_path) == (run / "report.html", run / "report.md")
    html, md = html_path.read_text(), md_path.read_text()

    assert "<h1>metaml report: maml-sin</h1>" in html
    rows = _table_rows(html)
    for k, r in results.items():  # one row per saved evaluation, with its number and CI
        score = f"mse {format_score(r.mean, r.ci95, 'mse')}"
        assert [
            "maml-sin",
            "sinusoid",
            "–",
            str(k),
            "15",
            "1",
            "best",
            "100",
            "1234",
            score,
        ] in rows
        assert f"| {score} |" in md
    # Best validation: the lowest val_mse (step 200) with its CI.
    assert f"mse {format_score(3 * math.exp(-200 / 80), 0.1, 'mse')} (step 200)" in html
    # The config, collapsible; no checkpoint -> an explanation instead of new evaluations.
    assert "<details><summary>Configuration of maml-sin" in html and "inner_lr: 0.01" in html
    assert "has no checkpoint" in html

    pngs = _embedded_pngs(html)
    assert len(pngs) == 2 and all(p.startswith(PNG_MAGIC) for p in pngs)  # curves and shots
    assert not re.search(r'(src|href)="(?!data:)', html), "the HTML must not load other files"
    linked = _md_images(md)
    assert linked == ["report-curves.png", "report-shots.png"]
    assert all((run / name).read_bytes().startswith(PNG_MAGIC) for name in linked)


def test_report_without_metrics_or_evals_still_renders(tmp_path: Path) -> None:
    run = tmp_path / "fresh"
    run.mkdir()
    (run / "config.yaml").write_text(load_config(None).to_yaml())
    html_path, md_path = write_report([run], progress=False)
    html = html_path.read_text()
    assert "No evaluations." in html and "Training curves" not in html
    assert _embedded_pngs(html) == [] and _md_images(md_path.read_text()) == []


def test_two_runs_compare_paired_on_shared_episodes(tmp_path: Path) -> None:
    a = _synthetic_run(tmp_path / "a", seed=0)
    b = _synthetic_run(tmp_path / "b", seed=1, offset=0.2, shots=(1, 5, 10))
    html_path, md_path = write_report([tmp_path / "a", tmp_path / "b"], progress=False)
    assert html_path == tmp_path / "report" / "report.html"
    html, md = html_path.read_text(), md_path.read_text()

    assert "<h1>metaml report: a, b</h1>" in html
    rows = _table_rows(html)
    for k in (1, 5):  # shared shot counts only; 10 shots exists for b alone
        [c] = compare({"a": a[k], "b": b[k]})
        diff = format_diff(c.mean_diff, c.ci95, "mse")
        verdict = "yes" if c.significant else "no"
        better = ("a" if c.mean_diff > 0 else "b") if c.significant else "–"
        assert ["sinusoid", "–", str(k), "15", "100", "b − a", diff, verdict, better] in rows
        assert f'<td class="{verdict}">{verdict}</td>' in html
        assert f"| b − a | {diff} | {verdict} |" in md
    assert html.count("<td>b − a</td>") == 2
    assert (tmp_path / "report" / "report-curves.png").is_file()


def test_comparison_needs_the_same_episodes(tmp_path: Path) -> None:
    _synthetic_run(tmp_path / "a")
    _synthetic_run(tmp_path / "b")
    # Re-evaluate b's 5-shot result on fewer episodes: no longer paired with a's.
    [record] = [r for r in load_evals(tmp_path / "b") if r["shots"] == 5]
    fewer = Result.from_scores(record["scores"][:50], "mse", seed=record["seed"])
    save_eval(
        tmp_path / "b",
        fewer,
        dataset="sinusoid",
        ways=1,
        shots=5,
        queries=15,
        steps=record["steps"],
        checkpoint="best",
    )
    html_path, _ = write_report([tmp_path / "a", tmp_path / "b"], tmp_path / "out", progress=False)
    html = html_path.read_text()
    assert html.count("<td>b − a</td>") == 1  # 1 shot only


# --------------------------------------------------------------------------- end to end


def _train_tiny(run_dir: Path) -> Path:
    from metaml import runs

    overrides = [
        *("train.steps=20", "train.val_every=10", "train.checkpoint_every=10"),
        *("train.val_tasks=10", "data.shots=5", "data.meta_batch_size=4", "device=cpu"),
    ]
    return runs.train(load_config(None, overrides), run_dir, quiet=True)


def test_end_to_end_regression_run(tmp_path: Path) -> None:
    run = _train_tiny(tmp_path / "tiny")
    html_path, md_path = write_report(
        [run], episodes=20, sample_episodes=2, shots=(1, 5), progress=False
    )
    records = {r["shots"]: r for r in load_evals(run)}
    assert sorted(records) == [1, 5] and all(r["episodes"] == 20 for r in records.values())
    html, md = html_path.read_text(), md_path.read_text()
    for r in records.values():
        assert f"mse {format_score(r['mean'], r['ci95'], 'mse')}" in html
    # Training curves, metric against shots, and the sample episodes' plot.
    assert len(_embedded_pngs(html)) == 3
    assert "report-samples-tiny.png" in _md_images(md)
    assert (run / "report-samples-tiny.png").read_bytes().startswith(PNG_MAGIC)

    # A second report reuses the saved evaluations instead of recomputing them.
    stamps = {p.name: p.stat().st_mtime_ns for p in (run / "eval").iterdir()}
    time.sleep(0.01)
    write_report([run], episodes=20, sample_episodes=0, shots=(1, 5), progress=False)
    assert {p.name: p.stat().st_mtime_ns for p in (run / "eval").iterdir()} == stamps


def _toy_images(path: Path, classes: int = 20, per_class: int = 8, size: int = 8) -> Path:
    """A tiny npz image dataset: each class is a random binary pattern plus noise."""
    rng = np.random.default_rng(0)
    protos = rng.random((classes, size, size)) > 0.7
    images = protos.repeat(per_class, 0) * 200 + rng.integers(
        0, 55, (classes * per_class, size, size)
    )
    labels = np.arange(classes).repeat(per_class)
    np.savez(path, images=images.astype(np.uint8), labels=labels)
    return path


def test_end_to_end_classification_run(tmp_path: Path) -> None:
    from metaml import runs

    npz = _toy_images(tmp_path / "toy.npz")
    overrides = [
        *(f"data.dataset=npz:{npz}", "data.split_by=class", "data.ways=3", "data.shots=1"),
        *("data.queries=3", "algorithm.name=protonet", "model.backbone_options={hidden: [16]}"),
        *("train.steps=10", "train.val_every=5", "train.val_tasks=5", "train.checkpoint_every=5"),
        "device=cpu",
    ]
    run = runs.train(load_config(None, overrides), tmp_path / "proto", quiet=True)
    # 50 shots is more than the 8 examples per class: noted in the report, not a crash.
    html_path, md_path = write_report(
        [run], episodes=10, sample_episodes=2, shots=(1, 2, 50), progress=False
    )
    html, md = html_path.read_text(), md_path.read_text()
    for r in load_evals(run):
        assert r["metric"] == "accuracy" and r["ways"] == 3
        assert f"accuracy {format_score(r['mean'], r['ci95'], 'accuracy')}" in html
    assert sorted(r["shots"] for r in load_evals(run)) == [1, 2]
    assert "No 50-shot evaluation" in html
    assert '<div class="gallery">' in html
    samples = [name for name in _md_images(md) if name.startswith("report-samples-")]
    assert samples == ["report-samples-proto-0.png", "report-samples-proto-1.png"]
    assert all((run / name).read_bytes().startswith(PNG_MAGIC) for name in samples)


def test_report_embeds_a_runs_by_instance_figure(tmp_path: Path) -> None:
    run = tmp_path / "mann-omniglot"
    _synthetic_run(run)
    fig = plt.figure(figsize=(2, 2))
    fig.savefig(run / "by-instance.png")
    plt.close(fig)
    html_path, md_path = write_report([run], progress=False)
    html, md = html_path.read_text(), md_path.read_text()
    assert (run / "by-instance.png").read_bytes() in _embedded_pngs(html)
    assert "report-mann-omniglot-by-instance.png" in _md_images(md)
    assert "Accuracy by instance: mann-omniglot" in html
