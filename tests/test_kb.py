"""The knowledge base: storage, search against brute force by hand, warm start, integrity."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from metaml.algorithms.base import MetaLearner
from metaml.algorithms.protonet import ProtoNet
from metaml.config import load_config
from metaml.errors import UserError
from metaml.kb import SCHEMA_VERSION, KnowledgeBase
from metaml.kb.store import MIGRATIONS
from metaml.kb.warmstart import support_score
from metaml.taskrep import TaskEncoder
from metaml.tasks import Task

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPE = (1, 16, 16)
SPEC = {"input_shape": list(SHAPE), "task_type": "classification", "ways": 3, "num_classes": 0}


def _w(value: float = 1.0) -> dict[str, np.ndarray]:
    return {"w": np.full(3, value, np.float32)}


def _task(seed: int, ways: int = 3, shots: int = 2) -> Task:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(ways).repeat_interleave(shots)
    return Task(
        torch.rand(len(y), *SHAPE, generator=g), y, torch.rand(len(y), *SHAPE, generator=g), y
    )


def _protonet(seed: int) -> tuple[MetaLearner, object]:
    cfg = load_config(None, ["algorithm.name=protonet", "model.backbone=conv4"])
    torch.manual_seed(seed)
    from metaml.algorithms import create_learner

    return create_learner(cfg, SHAPE, "classification", ways=3), cfg


def test_open_requires_init_and_records_the_schema(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="metaml kb init"):
        KnowledgeBase(tmp_path / "kb")
    kb = KnowledgeBase(tmp_path / "kb", create=True)
    assert kb.schema_version == SCHEMA_VERSION == len(MIGRATIONS)
    assert kb._conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert len(kb) == 0 and kb.nearest(np.ones(3), k=2) == []


def test_migrates_a_version_1_database(tmp_path: Path) -> None:
    folder = tmp_path / "kb"
    (folder / "weights").mkdir(parents=True)
    db = sqlite3.connect(folder / "kb.sqlite")
    db.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    for statement in MIGRATIONS[0]:
        db.execute(statement)
    db.execute("INSERT INTO schema_version VALUES (1)")
    db.commit()
    db.close()
    kb = KnowledgeBase(folder)
    assert kb.schema_version == SCHEMA_VERSION
    indexes = {r[1] for r in kb._conn.execute("PRAGMA index_list(entries)")}
    assert "entries_dataset" in indexes
    db = sqlite3.connect(folder / "kb.sqlite")
    db.execute("UPDATE schema_version SET version = 99")
    db.commit()
    db.close()
    with pytest.raises(UserError, match="upgrade metaml"):
        KnowledgeBase(folder)


def test_add_get_list_remove_and_weights_round_trip(tmp_path: Path) -> None:
    kb = KnowledgeBase(tmp_path, create=True)
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    a = kb.add(net, _task(0), dataset="toy", classes=["x", "y", "z"], metadata={"alphabet": "A"},
               metrics={"acc": 0.9}, name="first")  # fmt: skip
    b = kb.add(_w(2.0), representation=np.arange(a.representation.shape[0], dtype=np.float32))
    assert (a.id, b.id, a.ways, a.shots, a.classes) == (1, 2, 3, 2, ["x", "y", "z"])
    assert a.metadata == {"alphabet": "A"} and a.metrics == {"acc": 0.9} and a.name == "first"
    loaded = kb.load_weights(a.id)
    for key, value in net.state_dict().items():
        assert torch.equal(loaded[key], value), key
    assert kb.load_weights(b.uid[:8])["w"].tolist() == [2.0, 2.0, 2.0]
    assert [e.id for e in kb.entries()] == [1, 2] and [e.id for e in kb.entries("toy")] == [1]
    assert kb.get("1").representation.tolist() == a.representation.tolist()
    assert KnowledgeBase(tmp_path).encoder.spec() == TaskEncoder(input_shape=SHAPE).spec()  # type: ignore[union-attr]
    kb.remove(a.id)
    assert [e.id for e in kb.entries()] == [2]
    assert sorted(p.name for p in kb.weights_dir.iterdir()) == [b.weights_file]
    with pytest.raises(UserError, match="no entry"):
        kb.get(1)
    with pytest.raises(UserError, match="uid prefix"):
        kb.get("ab")
    # a uid prefix made only of digits is still found (ids are tried first)
    digits = kb.add(_w(), representation=np.ones(128))
    kb._conn.execute(
        "UPDATE entries SET uid = '12345678' || substr(uid, 9) WHERE id = ?", (digits.id,)
    )
    assert kb.get("12345678").id == digits.id and kb.get(str(digits.id)).id == digits.id
    kb.remove(digits.id)
    with pytest.raises(UserError, match="not both"):
        kb.add(_w(), _task(0), representation=np.ones(128))
    with pytest.raises(UserError, match="128-d"):
        kb.add(_w(), representation=np.ones(5))


def test_a_different_encoder_is_refused(tmp_path: Path) -> None:
    KnowledgeBase(tmp_path, create=True, encoder=TaskEncoder(input_shape=SHAPE, seed=0))
    with pytest.raises(UserError, match="another task encoder"):
        KnowledgeBase(tmp_path, encoder=TaskEncoder(input_shape=SHAPE, seed=1))


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_nearest_equals_brute_force_by_hand(tmp_path: Path, metric: str) -> None:
    rng = np.random.default_rng(0)
    vectors = (
        rng.normal(size=(120, 8)).astype(np.float32) + 5.0
    )  # a shared offset, as ReLU features
    kb = KnowledgeBase(tmp_path, create=True)
    for v in vectors:
        kb.add(_w(), representation=v)
    for q in rng.normal(size=(10, 8)).astype(np.float32) + 5.0:
        q64, x64 = q.astype(np.float64), vectors.astype(np.float64)
        if metric == "euclidean":
            d = np.sqrt(((x64 - q64) ** 2).sum(1))
        else:
            d = 1 - x64 @ q64 / (np.linalg.norm(x64, axis=1) * np.linalg.norm(q64))
        expected = np.argsort(d, kind="stable")[:7] + 1  # ids start at 1
        got = kb.nearest(q, k=7, metric=metric)  # type: ignore[arg-type]
        assert [n.entry.id for n in got] == expected.tolist()
        np.testing.assert_allclose([n.distance for n in got], np.sort(d)[:7], rtol=1e-9, atol=1e-12)
        excluded = kb.nearest(q, k=3, metric=metric, exclude=expected[:2].tolist())  # type: ignore[arg-type]
        assert [n.entry.id for n in excluded] == expected[2:5].tolist()


def test_nearest_ties_break_by_id_and_cache_follows_changes(tmp_path: Path) -> None:
    kb = KnowledgeBase(tmp_path, create=True)
    for v in ([1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]):
        kb.add(_w(), representation=np.array(v))
    assert [n.entry.id for n in kb.nearest(np.zeros(2), k=3)] == [1, 2, 3]
    assert kb.nearest(np.array([0.0, 0.9]), k=1)[0].entry.id == 2
    kb.add(_w(), representation=np.array([0.0, 0.9]))
    assert kb.nearest(np.array([0.0, 0.9]), k=1)[0].entry.id == 4
    kb.remove(4)
    assert kb.nearest(np.array([0.0, 0.9]), k=1)[0].entry.id == 2
    other = KnowledgeBase(tmp_path)  # another connection's add is seen too
    other.add(_w(), representation=np.array([0.0, 0.95]))
    assert kb.nearest(np.array([0.0, 0.9]), k=1)[0].entry.id == 5
    with pytest.raises(UserError, match="hnswlib"):
        kb.nearest(np.zeros(2), index="hnsw") if not _has_hnswlib() else _raise_hnsw()
    with pytest.raises(UserError, match="k must be"):
        kb.nearest(np.zeros(2), k=0)


def _has_hnswlib() -> bool:
    try:
        import hnswlib  # noqa: F401
    except ImportError:
        return False
    return True


def _raise_hnsw() -> None:
    raise UserError("hnswlib installed: the missing-package message is not reachable")


def test_verify_finds_missing_and_corrupt_files_and_load_refuses_them(tmp_path: Path) -> None:
    kb = KnowledgeBase(tmp_path, create=True)
    entries = [kb.add(_w(i), representation=np.ones(2) * i) for i in range(3)]
    assert kb.verify() == []
    (kb.weights_dir / entries[0].weights_file).unlink()
    path = kb.weights_dir / entries[2].weights_file
    blob = bytearray(path.read_bytes())
    blob[-1] ^= 0xFF  # one flipped byte in the tensor data
    path.write_bytes(bytes(blob))
    problems = kb.verify()
    assert [(p.entry_id, p.kind) for p in problems] == [(1, "missing"), (3, "corrupt")]
    with pytest.raises(UserError, match="sha256"):
        kb.load_weights(3)
    assert kb.load_weights(2)["w"].tolist() == [1.0, 1.0, 1.0]


def test_open_sweeps_orphan_files(tmp_path: Path) -> None:
    kb = KnowledgeBase(tmp_path, create=True)
    kept = kb.add(_w(), representation=np.ones(2))
    (kb.weights_dir / "deadbeef.safetensors").write_bytes(b"left by a killed writer")
    (kb.weights_dir / ".x.safetensors.abc.tmp").write_bytes(b"half")
    again = KnowledgeBase(tmp_path)
    assert again.swept == [".x.safetensors.abc.tmp", "deadbeef.safetensors"]
    assert [p.name for p in again.weights_dir.iterdir()] == [kept.weights_file]


def test_load_learner_rebuilds_and_warm_start_strategies(tmp_path: Path) -> None:
    kb = KnowledgeBase(tmp_path, create=True)
    tasks = [_task(seed) for seed in range(4)]
    learners = []
    for i, task in enumerate(tasks):
        learner, cfg = _protonet(seed=i)
        learners.append(learner)
        kb.add(learner, task, config=cfg, model_spec=SPEC, name=f"m{i}")  # type: ignore[arg-type]
    rebuilt = kb.load_learner(3)
    for (key, a), (_, b) in zip(
        learners[2].state_dict().items(), rebuilt.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), key
    # nearest: a stored task is its own nearest neighbour
    assert kb.warm_start(tasks[1], "nearest").entry.id == 2
    # model-based: the candidate with the lowest support score (computed here independently)
    new = _task(10, shots=2)
    ws = kb.warm_start(new, "model-based", k=3)
    candidates = [n.entry.id for n in kb.nearest(new, k=3)]
    scores = {
        i: support_score(kb.load_learner(i), new.support_x, new.support_y) for i in candidates
    }
    assert ws.scores == pytest.approx(scores, rel=1e-6)
    assert ws.entry.id == min(scores, key=lambda i: (scores[i], candidates.index(i)))
    # random: reproducible by seed, and every entry is reachable
    picks = [kb.warm_start(new, "random", seed=s).entry.id for s in range(40)]
    assert picks == [kb.warm_start(new, "random", seed=s).entry.id for s in range(40)]
    assert set(picks) == {1, 2, 3, 4}
    with pytest.raises(UserError, match="did you mean 'nearest'"):
        kb.warm_start(new, "neares")  # type: ignore[arg-type]
    bare = KnowledgeBase(tmp_path / "bare", create=True)
    bare.add(nn.Linear(2, 2), representation=np.ones(2))
    with pytest.raises(UserError, match="without its config"):
        bare.load_learner(1)


class _Identity(nn.Module):
    def forward_features(self, x: Tensor) -> Tensor:
        return x.flatten(1)


def test_support_score_is_leave_one_out_by_hand() -> None:
    net = ProtoNet(_Identity())
    x = torch.tensor([[0.0], [1.0], [3.0], [5.0]])
    y = torch.tensor([0, 0, 1, 1])
    expected = []
    for i in range(4):
        keep = [j for j in range(4) if j != i]
        protos = [np.mean([x[j, 0].item() for j in keep if y[j] == c]) for c in (0, 1)]
        logits = np.array([-((x[i, 0].item() - p) ** 2) for p in protos])
        expected.append(-(logits[y[i]] - np.log(np.exp(logits).sum())))
    assert support_score(net, x, y) == pytest.approx(float(np.mean(expected)), rel=1e-5)
    # max_folds=2: the first example of each class is left out in turn (indices 0 and 2)
    capped = support_score(net, x, y, max_folds=2)
    assert capped == pytest.approx(float(np.mean([expected[0], expected[2]])), rel=1e-5)
    # 1-shot: no example can be left out; the resubstitution loss is used
    one = support_score(net, x[[0, 1]], torch.tensor([0, 1]))
    logits = np.array([[0.0, -1.0], [-1.0, 0.0]])
    resub = np.mean([np.log(np.exp(row).sum()) - row[i] for i, row in enumerate(logits)])
    assert one == pytest.approx(float(resub), rel=1e-5)


@pytest.mark.slow
def test_add_a_run_directory(tmp_path: Path) -> None:
    from metaml import runs

    images = np.random.default_rng(0).integers(0, 256, size=(48, 16, 16), dtype=np.uint8)
    np.savez(tmp_path / "toy.npz", images=images, labels=np.repeat(np.arange(8), 6))
    cfg = load_config(
        None,
        [f"data.dataset=npz:{tmp_path / 'toy.npz'}", "data.split_by=class", "data.split_fractions=[0.5, 0.25, 0.25]", "data.ways=2",
         "data.shots=1", "data.queries=2", "model.backbone=conv4", "algorithm.name=protonet",
         "train.steps=2", "train.val_every=2", "train.val_tasks=2", "train.checkpoint_every=2"],
    )  # fmt: skip
    run_dir = runs.train(cfg, tmp_path / "run", quiet=True)
    kb = KnowledgeBase(tmp_path / "kb", create=True)
    entry = kb.add(run_dir, _task(0))
    assert entry.name == "run" and entry.dataset.startswith("npz:")
    assert entry.model_spec == json.loads((run_dir / "model.json").read_text())
    original = runs.load_learner(run_dir, device="cpu")
    for (key, a), (_, b) in zip(
        original.state_dict().items(), kb.load_learner(entry).state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), key
