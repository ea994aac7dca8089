"""The knowledge base: trained models indexed by the representation of the task they learned.

A knowledge base is a folder::

    KB/kb.sqlite                    entries, schema version, settings (SQLite, WAL mode)
    KB/weights/<uid>.safetensors    one model's weights per entry (sha256 in its row)

Each entry holds the task's description (dataset, class names, ways, shots, free metadata),
its representation (a float32 vector from the knowledge base's :class:`~metaml.taskrep.TaskEncoder`),
the model (weights file, the run's resolved config and ``model.json`` so the learner can be
rebuilt), and metrics. Nothing is pickled.

Consistency (several processes may add at once; any of them may die at any moment):

* every write runs in one ``BEGIN IMMEDIATE`` transaction, which holds SQLite's write lock;
* :meth:`KnowledgeBase.add` writes the weights file (atomically: temporary file, fsync, rename)
  *inside* that transaction and commits the row last, so the row is the commit record: a process
  killed before the commit leaves no row, and at most a file no row points to;
* such orphan files can only exist while no process holds the write lock (a live writer's
  pending file is protected by its lock), so opening a knowledge base takes the lock, deletes
  every file of ``weights/`` no row points to, and records them in ``swept``;
* :meth:`KnowledgeBase.remove` deletes the row, commits, then the file (a crash in between again
  leaves only an orphan file); :meth:`KnowledgeBase.verify` reports rows whose file is missing
  or whose sha256 does not match, and :meth:`KnowledgeBase.load_weights` refuses such files.

Search is exact brute force over a cached ``(n, dim)`` float32 matrix (refreshed when entries
change), fast enough for 100k entries (see ``benchmarks/kb_retrieval.py``); ``index="hnsw"`` uses
an approximate hnswlib index instead when that package is installed.

Example:
    >>> import tempfile, numpy as np
    >>> kb = KnowledgeBase(tempfile.mkdtemp(), create=True)
    >>> e = kb.add({"w": np.ones(2, np.float32)}, representation=np.array([0.0, 1.0]), dataset="toy")
    >>> _ = kb.add({"w": np.zeros(2, np.float32)}, representation=np.array([5.0, 5.0]))
    >>> [n.entry.id for n in kb.nearest(np.array([0.0, 0.9]), k=2)]
    [1, 2]
    >>> kb.load_weights(e.id)["w"].tolist()
    [1.0, 1.0]
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import sqlite3
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from safetensors.numpy import save as save_numpy

from metaml.errors import UserError
from metaml.io import atomic_write

if TYPE_CHECKING:
    from torch import nn

    from metaml.algorithms.base import MetaLearner
    from metaml.config import RunConfig
    from metaml.kb.warmstart import Strategy, WarmStart
    from metaml.taskrep import TaskEncoder
    from metaml.tasks import Task

DB_FILE = "kb.sqlite"
WEIGHTS_DIR = "weights"
Metric = Literal["euclidean", "cosine"]

# Schema migrations, applied in order inside one write transaction; the version reached is
# stored in the schema_version table. Never edit a released step: append a new one.
MIGRATIONS: list[list[str]] = [
    [  # 1: entries and settings
        "CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
        """CREATE TABLE entries (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            uid TEXT NOT NULL UNIQUE,
            created TEXT NOT NULL,
            name TEXT NOT NULL,
            dataset TEXT NOT NULL,
            classes TEXT NOT NULL,
            ways INTEGER NOT NULL,
            shots INTEGER NOT NULL,
            metadata TEXT NOT NULL,
            representation BLOB NOT NULL,
            config TEXT,
            model_spec TEXT,
            metrics TEXT NOT NULL,
            weights_file TEXT NOT NULL UNIQUE,
            weights_sha256 TEXT NOT NULL,
            weights_bytes INTEGER NOT NULL
        )""",
    ],
    [  # 2: list and filter by dataset without a full scan
        "CREATE INDEX entries_dataset ON entries (dataset)",
    ],
]
SCHEMA_VERSION = len(MIGRATIONS)


@dataclass(frozen=True)
class Entry:
    """One stored model and the task it learned (a row of the knowledge base).

    Example:
        >>> import tempfile, numpy as np
        >>> kb = KnowledgeBase(tempfile.mkdtemp(), create=True)
        >>> kb.add({"w": np.ones(1, np.float32)}, representation=np.ones(3), dataset="toy").dataset
        'toy'
    """

    id: int
    uid: str
    created: str
    name: str
    dataset: str
    classes: list[str]
    ways: int
    shots: int
    metadata: dict[str, Any]
    metrics: dict[str, Any]
    config: str | None  # the run's resolved config.yaml, or None
    model_spec: dict[str, Any] | None  # the run's model.json, or None
    weights_file: str
    weights_sha256: str
    weights_bytes: int
    representation: np.ndarray = field(repr=False, compare=False)

    def summary(self) -> dict[str, Any]:
        """The entry as JSON-able data, without the representation vector.

        Example:
            >>> import tempfile, numpy as np
            >>> kb = KnowledgeBase(tempfile.mkdtemp(), create=True)
            >>> kb.add({"w": np.ones(1, np.float32)}, representation=np.ones(3), name="a").summary()["name"]
            'a'
        """
        out = {k: v for k, v in self.__dict__.items() if k not in ("representation", "config")}
        out["has_config"] = self.config is not None
        out["representation_dim"] = int(self.representation.shape[0])
        return out


@dataclass(frozen=True)
class Neighbor:
    """A search result: an entry and its distance to the query (smaller is nearer)."""

    entry: Entry
    distance: float


@dataclass(frozen=True)
class Problem:
    """A problem :meth:`KnowledgeBase.verify` found: ``kind`` is ``missing`` or ``corrupt``."""

    entry_id: int
    kind: str
    detail: str


class KnowledgeBase:
    """Stored models of past tasks, found again by the similarity of a new task.

    ``path`` is the knowledge base's folder; ``create=True`` creates it (or opens it when it
    exists). ``encoder`` computes task representations; a new knowledge base records its spec
    and later opens rebuild it from there (a different encoder is refused). Without one, the
    first :meth:`add` of a :class:`~metaml.tasks.Task` records the default
    ``TaskEncoder(input_shape=<the task's>)``.

    Example:
        >>> import tempfile, numpy as np
        >>> folder = tempfile.mkdtemp()
        >>> kb = KnowledgeBase(folder, create=True)
        >>> _ = kb.add({"w": np.ones(1, np.float32)}, representation=np.zeros(4), dataset="toy")
        >>> len(KnowledgeBase(folder)), KnowledgeBase(folder).schema_version
        (1, 2)
    """

    def __init__(
        self,
        path: str | Path,
        *,
        create: bool = False,
        encoder: TaskEncoder | None = None,
        timeout: float = 120.0,
    ) -> None:
        self.path = Path(path)
        self.db_path = self.path / DB_FILE
        self.weights_dir = self.path / WEIGHTS_DIR
        if not self.db_path.is_file():
            if not create:
                raise UserError(
                    f"{self.path} is not a knowledge base (no {DB_FILE}); create it with metaml kb init {self.path}"
                )
            self.weights_dir.mkdir(parents=True, exist_ok=True)
        self.weights_dir.mkdir(exist_ok=True)
        # Autocommit mode: transactions are explicit BEGIN IMMEDIATE ... COMMIT (see _write).
        self._conn = sqlite3.connect(
            self.db_path, timeout=timeout, isolation_level=None, check_same_thread=False
        )
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._migrate()
        self._encoder = encoder
        if encoder is not None:
            self._check_encoder(encoder)
        self._cache: _Matrix | None = None
        self._hnsw: tuple[tuple[int, int], str, Any] | None = None
        self.swept: list[str] = self._sweep()

    # -- schema ----------------------------------------------------------------------------

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (holds the database's write lock until it commits)."""
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield self._conn
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")

    def _migrate(self) -> None:
        with self._write() as db:
            db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            row = db.execute("SELECT version FROM schema_version").fetchone()
            version = int(row[0]) if row else 0
            if version > SCHEMA_VERSION:
                raise UserError(
                    f"{self.path} has schema version {version} but this metaml knows up to "
                    f"{SCHEMA_VERSION}; upgrade metaml to open it"
                )
            for steps in MIGRATIONS[version:]:
                for statement in steps:
                    db.execute(statement)
            if row is None:
                db.execute("INSERT INTO schema_version VALUES (?)", (SCHEMA_VERSION,))
            else:
                db.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION,))

    @property
    def schema_version(self) -> int:
        """The schema version of the database (after migration, :data:`SCHEMA_VERSION`)."""
        return int(self._conn.execute("SELECT version FROM schema_version").fetchone()[0])

    def _setting(self, key: str) -> Any:
        row = self._conn.execute("SELECT value FROM settings WHERE key = ?", (key,)).fetchone()
        return None if row is None else json.loads(row[0])

    def _check_encoder(self, encoder: TaskEncoder) -> None:
        with self._write() as db:
            stored = self._setting("encoder")
            if stored is None:
                db.execute(
                    "INSERT INTO settings VALUES ('encoder', ?)", (json.dumps(encoder.spec()),)
                )
            elif stored != encoder.spec():
                raise UserError(
                    f"{self.path} holds representations of another task encoder ({stored}); "
                    "open it without encoder= to use its own"
                )

    @property
    def encoder(self) -> TaskEncoder | None:
        """The knowledge base's task encoder (rebuilt from its recorded spec), or None if none yet.

        Example:
            >>> import tempfile
            >>> KnowledgeBase(tempfile.mkdtemp(), create=True).encoder is None
            True
        """
        if self._encoder is None:
            spec = self._setting("encoder")
            if spec is not None:
                from metaml.taskrep import TaskEncoder

                self._encoder = TaskEncoder.from_spec(spec)
        return self._encoder

    def _encoder_for(self, task: Task) -> TaskEncoder:
        encoder = self.encoder
        if encoder is None:
            from metaml.taskrep import TaskEncoder

            encoder = TaskEncoder(input_shape=tuple(task.support_x.shape[1:]))
            self._check_encoder(encoder)
            self._encoder = encoder
        return encoder

    def represent(self, task: Task | np.ndarray) -> np.ndarray:
        """The representation of a task (or the vector itself, checked), float32 ``(dim,)``.

        Example:
            >>> import tempfile, numpy as np
            >>> KnowledgeBase(tempfile.mkdtemp(), create=True).represent(np.ones(3)).dtype
            dtype('float32')
        """
        if isinstance(task, np.ndarray):
            vector = np.asarray(task, dtype=np.float32)
        else:
            vector = self._encoder_for(task).encode_task(task)
        if vector.ndim != 1 or not np.isfinite(vector).all():
            raise UserError(
                f"a task representation must be a finite 1-d vector; got shape {vector.shape}"
            )
        return vector

    # -- writing ---------------------------------------------------------------------------

    def add(
        self,
        source: str | Path | nn.Module | Mapping[str, Any],
        task: Task | None = None,
        *,
        representation: np.ndarray | None = None,
        name: str | None = None,
        dataset: str | None = None,
        classes: Sequence[str] = (),
        metadata: Mapping[str, Any] | None = None,
        metrics: Mapping[str, Any] | None = None,
        config: RunConfig | None = None,
        model_spec: Mapping[str, Any] | None = None,
        checkpoint: str = "best",
    ) -> Entry:
        """Store a model and the task it learned; return the new entry.

        ``source`` is a run directory (its ``checkpoint`` weights, config and ``model.json`` are
        stored, so :meth:`load_learner` can rebuild it), a learner or module (pass ``config`` and
        ``model_spec`` to make it rebuildable), or a mapping of names to arrays or tensors.
        ``task`` (its support set) is encoded with the knowledge base's encoder; or pass a
        ready ``representation``. ``ways``/``shots`` come from the task.

        Example:
            >>> import tempfile, numpy as np, torch
            >>> from metaml.tasks import Task
            >>> kb = KnowledgeBase(tempfile.mkdtemp(), create=True)
            >>> t = Task(torch.rand(4, 1, 16, 16), torch.tensor([0, 0, 1, 1]), torch.rand(2, 1, 16, 16), torch.tensor([0, 1]))
            >>> e = kb.add(torch.nn.Linear(2, 2), t, dataset="toy", classes=["a", "b"])
            >>> (e.ways, e.shots, e.representation.shape)
            (2, 2, (128,))
        """
        if (task is None) == (representation is None):
            raise UserError(
                "give the task (its support set) or its representation, not both or neither"
            )
        vector = self.represent(representation if representation is not None else task)  # type: ignore[arg-type]
        ways = shots = 0
        if task is not None:
            counts = np.bincount(task.support_y.cpu().numpy().astype(np.int64))
            ways, shots = int((counts > 0).sum()), int(counts.max())
        config_text: str | None = None
        spec: dict[str, Any] | None = dict(model_spec) if model_spec is not None else None
        if isinstance(source, str | Path):
            blob, config_text, spec, cfg_dataset = _run_weights(Path(source), checkpoint)
            name = name or Path(source).resolve().name
            dataset = dataset if dataset is not None else cfg_dataset
        else:
            blob = _serialize(source)
            if config is not None:
                config_text = config.to_yaml()
                dataset = dataset if dataset is not None else config.data.dataset
        uid = uuid.uuid4().hex
        weights_file = f"{uid}.safetensors"
        row = {
            "uid": uid,
            "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "name": name or uid[:12],
            "dataset": dataset or "",
            "classes": json.dumps([str(c) for c in classes]),
            "ways": ways,
            "shots": shots,
            "metadata": json.dumps(dict(metadata or {}), sort_keys=True),
            "representation": vector.astype("<f4").tobytes(),
            "config": config_text,
            "model_spec": None if spec is None else json.dumps(spec, sort_keys=True),
            "metrics": json.dumps(dict(metrics or {}), sort_keys=True),
            "weights_file": weights_file,
            "weights_sha256": hashlib.sha256(blob).hexdigest(),
            "weights_bytes": len(blob),
        }
        path = self.weights_dir / weights_file
        with self._write() as db:
            dim = self._setting("dim")
            if dim is None:
                db.execute("INSERT INTO settings VALUES ('dim', ?)", (json.dumps(len(vector)),))
            elif dim != len(vector):
                raise UserError(
                    f"this knowledge base holds {dim}-d representations; got {len(vector)}-d "
                    "(use the knowledge base's own encoder)"
                )
            try:
                # Weights first, row last: the committed row is the record that the entry exists.
                atomic_write(path, lambda tmp: _write_bytes(tmp, blob))
                entry_id = self._insert_row(db, row)
            except BaseException:
                path.unlink(missing_ok=True)
                raise
        return self.get(entry_id)

    def _insert_row(self, db: sqlite3.Connection, row: dict[str, Any]) -> int:
        columns = ", ".join(row)
        marks = ", ".join("?" for _ in row)
        cursor = db.execute(
            f"INSERT INTO entries ({columns}) VALUES ({marks})", tuple(row.values())
        )
        assert cursor.lastrowid is not None
        return int(cursor.lastrowid)

    def remove(self, entry: int | str) -> Entry:
        """Delete an entry (by id or uid prefix) and its weights file; return what was removed.

        Example:
            >>> import tempfile, numpy as np
            >>> kb = KnowledgeBase(tempfile.mkdtemp(), create=True)
            >>> e = kb.add({"w": np.ones(1, np.float32)}, representation=np.ones(2))
            >>> kb.remove(e.id).id, len(kb)
            (1, 0)
        """
        found = self.get(entry)
        with self._write() as db:
            db.execute("DELETE FROM entries WHERE id = ?", (found.id,))
        # After the commit: a crash here leaves an orphan file, which the next open sweeps.
        (self.weights_dir / found.weights_file).unlink(missing_ok=True)
        return found

    def _sweep(self) -> list[str]:
        """Delete files of ``weights/`` that no row points to (left by a writer that died)."""
        removed = []
        with self._write() as db:  # no writer is between its weights file and its commit now
            known = {r[0] for r in db.execute("SELECT weights_file FROM entries")}
            for item in os.scandir(self.weights_dir):
                if item.name not in known and item.is_file():
                    os.unlink(item.path)
                    removed.append(item.name)
        return sorted(removed)

    # -- reading ---------------------------------------------------------------------------

    def __len__(self) -> int:
        return int(self._conn.execute("SELECT COUNT(*) FROM entries").fetchone()[0])

    def entries(self, dataset: str | None = None) -> list[Entry]:
        """All entries (of ``dataset`` when given), oldest first.

        Example:
            >>> import tempfile, numpy as np
            >>> kb = KnowledgeBase(tempfile.mkdtemp(), create=True)
            >>> _ = kb.add({"w": np.ones(1, np.float32)}, representation=np.ones(2), dataset="a")
            >>> [e.dataset for e in kb.entries()], kb.entries("b")
            (['a'], [])
        """
        if dataset is None:
            rows = self._conn.execute(f"SELECT {_COLUMNS} FROM entries ORDER BY id")
        else:
            rows = self._conn.execute(
                f"SELECT {_COLUMNS} FROM entries WHERE dataset = ? ORDER BY id", (dataset,)
            )
        return [_entry(r) for r in rows]

    def get(self, entry: int | str) -> Entry:
        """The entry with this id (an int or a string of digits) or else uid prefix (6+ characters).

        Example:
            >>> import tempfile, numpy as np
            >>> kb = KnowledgeBase(tempfile.mkdtemp(), create=True)
            >>> e = kb.add({"w": np.ones(1, np.float32)}, representation=np.ones(2))
            >>> kb.get(e.uid[:8]).id == kb.get(str(e.id)).id == e.id
            True
        """
        rows: list[Any] = []
        is_id = isinstance(entry, int) or (isinstance(entry, str) and entry.isdigit())
        if is_id:
            rows = self._conn.execute(
                f"SELECT {_COLUMNS} FROM entries WHERE id = ?", (int(entry),)
            ).fetchall()
        # A uid prefix may be all digits too (about 2% of 8-character prefixes): ids come first.
        if not rows and isinstance(entry, str) and len(entry) >= 6:
            rows = self._conn.execute(
                f"SELECT {_COLUMNS} FROM entries WHERE uid LIKE ? LIMIT 2", (entry.lower() + "%",)
            ).fetchall()
        elif not is_id and not (isinstance(entry, str) and len(entry) >= 6):
            raise UserError(
                f"an entry is an id such as 3 or a uid prefix of 6+ characters; got {entry!r}"
            )
        if len(rows) != 1:
            problem = "no entry" if not rows else "more than one entry"
            raise UserError(
                f"{problem} matches {entry!r} in {self.path}; see metaml kb list {self.path}"
            )
        return _entry(rows[0])

    def load_weights(self, entry: int | str | Entry) -> dict[str, Any]:
        """The entry's weights as torch tensors, after checking the file's sha256.

        Example:
            >>> import tempfile, numpy as np
            >>> kb = KnowledgeBase(tempfile.mkdtemp(), create=True)
            >>> e = kb.add({"w": np.arange(3, dtype=np.float32)}, representation=np.ones(2))
            >>> kb.load_weights(e)["w"].tolist()
            [0.0, 1.0, 2.0]
        """
        from safetensors.torch import load as load_torch

        found = entry if isinstance(entry, Entry) else self.get(entry)
        problem = self._check_file(found)
        if problem is not None:
            raise UserError(
                f"entry {found.id} ({found.name}): {problem.detail}; remove it with "
                f"metaml kb remove {self.path} {found.id}"
            )
        blob = (self.weights_dir / found.weights_file).read_bytes()
        return dict(load_torch(blob))

    def load_learner(self, entry: int | str | Entry, device: str = "cpu") -> MetaLearner:
        """Rebuild the entry's learner from its stored config and ``model.json``, with its weights.

        Example:
            >>> # learner = kb.load_learner(3); predictor = learner.adapt(support_x, support_y)
        """
        import yaml

        from metaml.config import config_from_dict
        from metaml.device import resolve_device
        from metaml.runs import learner_from_spec

        found = entry if isinstance(entry, Entry) else self.get(entry)
        if found.config is None or found.model_spec is None:
            raise UserError(
                f"entry {found.id} was stored without its config and model.json; load its "
                "weights into a learner you build with kb.load_weights"
            )
        cfg = config_from_dict(yaml.safe_load(found.config) or {})
        spec = found.model_spec
        learner = learner_from_spec(cfg, spec)
        learner.load_state_dict(self.load_weights(found))
        return learner.to(resolve_device(device)).eval()

    def verify(self) -> list[Problem]:
        """Check every entry's weights file: missing, or its sha256 does not match.

        Example:
            >>> import tempfile, numpy as np
            >>> kb = KnowledgeBase(tempfile.mkdtemp(), create=True)
            >>> e = kb.add({"w": np.ones(1, np.float32)}, representation=np.ones(2))
            >>> (kb.weights_dir / e.weights_file).write_bytes(b"junk") and None
            >>> [p.kind for p in kb.verify()]
            ['corrupt']
        """
        problems = []
        for entry in self.entries():
            problem = self._check_file(entry)
            if problem is not None:
                problems.append(problem)
        return problems

    def _check_file(self, entry: Entry) -> Problem | None:
        path = self.weights_dir / entry.weights_file
        if not path.is_file():
            return Problem(entry.id, "missing", f"weights file {path} is missing")
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest != entry.weights_sha256:
            return Problem(
                entry.id, "corrupt", f"weights file {path} does not match its sha256 (corrupt)"
            )
        return None

    # -- search ----------------------------------------------------------------------------

    def _matrix(self) -> _Matrix:
        """``(key, ids (n,), vectors (n, dim) float32)``, cached until entries change."""
        # data_version changes when another connection commits; total_changes counts this
        # connection's own row changes: together they change whenever the entries may have.
        version = int(self._conn.execute("PRAGMA data_version").fetchone()[0])
        key = (version, self._conn.total_changes)
        if self._cache is None or self._cache.key != key:
            rows = self._conn.execute(
                "SELECT id, representation FROM entries ORDER BY id"
            ).fetchall()
            ids = np.array([r[0] for r in rows], dtype=np.int64)
            dim = self._setting("dim") or 0
            # A native-order, aligned copy: numpy hands only aligned arrays to BLAS (10x faster).
            flat = np.frombuffer(b"".join(r[1] for r in rows), dtype="<f4")
            matrix = np.ascontiguousarray(flat.astype(np.float32)).reshape(len(rows), dim)
            sq = np.einsum("ij,ij->i", matrix, matrix)  # (n,) |x|^2, reused by every query
            self._cache = _Matrix(key, ids, matrix, sq, np.sqrt(sq))
        return self._cache

    def nearest(
        self,
        task: Task | np.ndarray,
        k: int = 5,
        *,
        metric: Metric = "euclidean",
        index: Literal["exact", "hnsw"] = "exact",
        exclude: Sequence[int] = (),
    ) -> list[Neighbor]:
        """The ``k`` entries whose representations are nearest the task's, nearest first.

        ``metric``: Euclidean distance or cosine distance (``1 - cosine similarity``).
        ``index="exact"`` is brute force (ties broken by id); ``"hnsw"`` an approximate hnswlib
        index (``pip install hnswlib``), worth it only well beyond 100k entries.
        ``exclude``: entry ids to leave out.

        Example:
            >>> import tempfile, numpy as np
            >>> kb = KnowledgeBase(tempfile.mkdtemp(), create=True)
            >>> for v in ([0, 0], [1, 0], [3, 0]):
            ...     _ = kb.add({"w": np.ones(1, np.float32)}, representation=np.array(v, float))
            >>> [(n.entry.id, round(n.distance, 3)) for n in kb.nearest(np.array([2.9, 0.0]), k=2)]
            [(3, 0.1), (2, 1.9)]
        """
        if not isinstance(k, int) or k < 1:
            raise UserError(f"k must be a positive integer; got {k!r}")
        if metric not in ("euclidean", "cosine"):
            raise UserError(f"unknown metric {metric!r}; use euclidean or cosine")
        query = self.represent(task)
        cached = self._matrix()
        key, ids, matrix = cached.key, cached.ids, cached.matrix
        if len(ids) == 0:
            return []
        if query.shape[0] != matrix.shape[1]:
            raise UserError(
                f"the query is {query.shape[0]}-d but the knowledge base holds {matrix.shape[1]}-d representations"
            )
        keep = np.ones(len(ids), bool) if not exclude else ~np.isin(ids, np.asarray(exclude))
        want = min(k, int(keep.sum()))
        if want == 0:
            return []
        if index == "hnsw":
            order, dist = self._hnsw_search(key, matrix, query, want + len(exclude), metric)
            pairs = [(i, d) for i, d in zip(order, dist, strict=True) if keep[i]][:want]
        elif index == "exact":
            pairs = _exact(cached, query, want, metric, keep)
        else:
            raise UserError(f"unknown index {index!r}; use exact or hnsw")
        entries = {e.id: e for e in self._entries_by_id([int(ids[i]) for i, _ in pairs])}
        return [Neighbor(entries[int(ids[i])], float(d)) for i, d in pairs]

    def _entries_by_id(self, wanted: list[int]) -> list[Entry]:
        marks = ", ".join("?" for _ in wanted)
        rows = self._conn.execute(f"SELECT {_COLUMNS} FROM entries WHERE id IN ({marks})", wanted)
        return [_entry(r) for r in rows]

    def _hnsw_search(
        self, key: tuple[int, int], matrix: np.ndarray, query: np.ndarray, k: int, metric: Metric
    ) -> tuple[np.ndarray, np.ndarray]:
        try:
            import hnswlib
        except ImportError:
            raise UserError(
                "index='hnsw' needs the optional package hnswlib (pip install hnswlib); "
                "the default exact search needs nothing and answers in milliseconds up to 100k entries"
            ) from None
        space = "l2" if metric == "euclidean" else "cosine"
        if self._hnsw is None or self._hnsw[:2] != (key, space):
            built = hnswlib.Index(space=space, dim=matrix.shape[1])
            built.init_index(max_elements=max(len(matrix), 1), ef_construction=200, M=16)
            built.add_items(matrix, np.arange(len(matrix)))
            self._hnsw = (key, space, built)
        built = self._hnsw[2]
        built.set_ef(max(50, 2 * k))
        labels, distances = built.knn_query(query[None], k=min(k, len(matrix)))
        dist = np.sqrt(np.maximum(distances[0], 0)) if space == "l2" else distances[0]
        return labels[0].astype(np.int64), dist

    def warm_start(
        self,
        task: Task,
        strategy: Strategy = "nearest",
        *,
        k: int = 5,
        steps: int | None = None,
        seed: int = 0,
        metric: Metric = "euclidean",
        device: str = "cpu",
        max_folds: int | None = None,
    ) -> WarmStart:
        """Choose a stored model to start the new task from; adapt the returned learner as usual.

        ``nearest``: the entry nearest the task's representation. ``model-based``: the ``k``
        nearest, each scored on the task's own support set by leave-one-out (see
        :func:`~metaml.kb.warmstart.support_score`), the best kept. ``random``: a uniformly
        random entry (drawn with ``seed``), the control. ``steps``: adaptation steps when
        scoring; ``max_folds``: at most this many leave-one-out folds per candidate.

        Example:
            >>> # ws = kb.warm_start(task, "model-based", k=5); predict = ws.learner.adapt(sx, sy)
        """
        from metaml.kb.warmstart import choose

        return choose(
            self, task, strategy, k=k, steps=steps, seed=seed, metric=metric, device=device,
            max_folds=max_folds,
        )  # fmt: skip

    def close(self) -> None:
        """Close the database connection."""
        self._conn.close()

    def __enter__(self) -> KnowledgeBase:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"KnowledgeBase({str(self.path)!r}, entries={len(self)})"


@dataclass(frozen=True)
class _Matrix:
    """All representations, cached: ``matrix (n, dim)`` float32, their ids, squared norms, norms."""

    key: tuple[int, int]
    ids: np.ndarray
    matrix: np.ndarray
    sq: np.ndarray
    norms: np.ndarray


def _exact(
    cached: _Matrix, query: np.ndarray, k: int, metric: Metric, keep: np.ndarray
) -> list[tuple[int, float]]:
    """Brute-force top ``k`` rows: a fast float32 pass picks candidates, float64 ranks them."""
    matrix, ids = cached.matrix, cached.ids
    if metric == "cosine":
        norms = cached.norms * max(float(np.linalg.norm(query)), 1e-30)
        approx = 1.0 - (matrix @ query) / np.maximum(norms, 1e-30)  # (n,)
    else:
        approx = cached.sq - 2.0 * (matrix @ query)  # |x - q|^2 - |q|^2
    if not keep.all():
        approx = np.where(keep, approx, np.inf)
    # float32 expansion loses digits: re-rank a generous candidate set exactly in float64.
    wide = min(len(approx), max(4 * k, k + 64))
    candidates = (
        np.argpartition(approx, wide - 1)[:wide] if wide < len(approx) else np.arange(len(approx))
    )
    candidates = candidates[keep[candidates]]
    rows = matrix[candidates].astype(np.float64)
    q = query.astype(np.float64)
    if metric == "cosine":
        denom = np.maximum(np.linalg.norm(rows, axis=1) * np.linalg.norm(q), 1e-30)
        exact = 1.0 - rows @ q / denom
    else:
        exact = np.sqrt(((rows - q) ** 2).sum(1))
    order = np.lexsort((ids[candidates], exact))[:k]
    return [(int(candidates[i]), float(exact[i])) for i in order]


_COLUMNS = (
    "id, uid, created, name, dataset, classes, ways, shots, metadata, metrics, config, model_spec, "
    "weights_file, weights_sha256, weights_bytes, representation"
)


def _entry(row: tuple[Any, ...]) -> Entry:
    (id_, uid, created, name, dataset, classes, ways, shots, metadata, metrics, config, spec,
     weights_file, sha, size, rep) = row  # fmt: skip
    return Entry(
        id=int(id_), uid=uid, created=created, name=name, dataset=dataset,
        classes=json.loads(classes), ways=int(ways), shots=int(shots),
        metadata=json.loads(metadata), metrics=json.loads(metrics), config=config,
        model_spec=None if spec is None else json.loads(spec), weights_file=weights_file,
        weights_sha256=sha, weights_bytes=int(size),
        representation=np.frombuffer(rep, dtype="<f4").copy(),
    )  # fmt: skip


def _write_bytes(path: str, blob: bytes) -> None:
    Path(path).write_bytes(blob)


def _serialize(source: nn.Module | Mapping[str, Any]) -> bytes:
    """Safetensors bytes of a module's state dict or of a mapping of arrays/tensors."""
    if isinstance(source, Mapping) and all(isinstance(v, np.ndarray) for v in source.values()):
        arrays = {str(k): np.ascontiguousarray(v) for k, v in source.items()}
        return bytes(save_numpy(arrays, metadata={"format": "metaml-kb/1"}))
    import torch
    from safetensors.torch import save as save_torch

    state = source.state_dict() if isinstance(source, torch.nn.Module) else source
    tensors = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            value = torch.as_tensor(np.asarray(value))
        tensors[str(key)] = value.detach().cpu().clone().contiguous()
    return bytes(save_torch(tensors, metadata={"format": "metaml-kb/1"}))


def _run_weights(run_dir: Path, checkpoint: str) -> tuple[bytes, str, dict[str, Any], str]:
    """A run's weights (via runs.load_learner, which checks the checkpoint), config text, spec, dataset."""
    from metaml.runs import CONFIG_FILE, build_samplers, load_learner, read_config, read_model_spec

    learner = load_learner(run_dir, checkpoint=checkpoint, device="cpu")
    cfg = read_config(run_dir)
    spec = read_model_spec(run_dir) or build_samplers(cfg).model_spec()
    config_text = (run_dir / CONFIG_FILE).read_text(encoding="utf-8")
    return _serialize(learner), config_text, spec, cfg.data.dataset
