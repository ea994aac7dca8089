"""The knowledge base under concurrent writers and writers killed in the middle of ``add``."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from metaml.kb import KnowledgeBase

SRC = str(Path(__file__).resolve().parents[1] / "src")

WRITER = """
import sys, numpy as np
from metaml.kb import KnowledgeBase
kb = KnowledgeBase(sys.argv[1])
worker, count = int(sys.argv[2]), int(sys.argv[3])
for i in range(count):
    kb.add({"w": np.full(4, worker * 1000 + i, np.float32)},
           representation=np.array([worker, i], np.float32), metadata={"worker": worker, "i": i})
"""

# Patches one step of add so the process stops there, says so, and waits to be killed.
KILLED = """
import sys, time, numpy as np
from metaml.kb import KnowledgeBase, store
kb = KnowledgeBase(sys.argv[1])
def stop(*args, **kwargs):
    original(*args, **kwargs)
    print("ready", flush=True)
    time.sleep(60)
if sys.argv[2] == "after-insert":  # weights file in place, row inserted, not committed
    original = KnowledgeBase._insert_row
    KnowledgeBase._insert_row = stop
else:  # half the weights written to the temporary file, not yet renamed
    write = store._write_bytes
    original = lambda tmp, blob: write(tmp, blob[: len(blob) // 2])
    store._write_bytes = stop
kb.add({"w": np.ones(1000, np.float32)}, representation=np.zeros(2, np.float32))
"""


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _integrity(kb: KnowledgeBase) -> None:
    """Every row has its file with the right checksum, every file has its row, SQLite is sound."""
    db = sqlite3.connect(kb.db_path)
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    db.close()
    assert kb.verify() == []
    files = sorted(p.name for p in kb.weights_dir.iterdir())
    assert files == sorted(e.weights_file for e in kb.entries())


@pytest.mark.slow
def test_eight_processes_adding_at_once_lose_nothing(tmp_path: Path) -> None:
    KnowledgeBase(tmp_path, create=True).close()
    workers, count = 8, 200
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, str(tmp_path), str(w), str(count)],
            env=_env(),
            stderr=subprocess.PIPE,
            text=True,
        )
        for w in range(workers)
    ]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    kb = KnowledgeBase(tmp_path)
    entries = kb.entries()
    assert len(entries) == workers * count
    seen = {(e.metadata["worker"], e.metadata["i"]) for e in entries}
    assert seen == {(w, i) for w in range(workers) for i in range(count)}
    assert len({e.id for e in entries}) == len({e.uid for e in entries}) == workers * count
    for e in entries[::97]:  # each row's weights and representation belong to it
        w, i = e.metadata["worker"], e.metadata["i"]
        assert kb.load_weights(e)["w"].tolist() == [w * 1000 + i] * 4
        assert e.representation.tolist() == [w, i]
    _integrity(kb)


@pytest.mark.parametrize("where", ["after-insert", "mid-write"])
def test_a_writer_killed_mid_add_leaves_no_orphan_row_or_file(tmp_path: Path, where: str) -> None:
    kb = KnowledgeBase(tmp_path, create=True)
    kept = kb.add({"w": np.ones(2, np.float32)}, representation=np.ones(2, np.float32))
    kb.close()
    proc = subprocess.Popen([sys.executable, "-c", KILLED, str(tmp_path), where], env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if line.strip() != "ready":
            proc.wait(timeout=30)
            pytest.fail(
                f"the writer did not stop in add: {proc.stderr.read() if proc.stderr else ''}"
            )
        # The killed writer's file is on disk: the test catches an orphan if one survives.
        leftovers = [
            p.name for p in (tmp_path / "weights").iterdir() if p.name != kept.weights_file
        ]
        assert len(leftovers) == 1, leftovers
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    again = KnowledgeBase(tmp_path)
    assert again.swept == leftovers
    assert [e.id for e in again.entries()] == [kept.id]
    _integrity(again)
    # and the knowledge base still takes writes after the killed writer's lock is gone
    assert again.add({"w": np.zeros(1, np.float32)}, representation=np.zeros(2)).id == 2
    _integrity(again)
