"""Task representations and knowledge-base search: do they mean something, and are they fast?

1. Retrieval: 5-way 5-shot tasks drawn within one alphabet (Omniglot-small: 8 alphabets; glyphs:
   its scripts with at least 5 characters) are stored in a knowledge base; each task then queries
   the base with itself left out. precision@k = the share of its k nearest tasks that come from
   its own alphabet (chance = the share of other tasks from its alphabet), mean and 95% CI over
   query tasks, for several encoder settings.
2. Encoding time per task (median), 5-way 1-shot and 5-shot, with and without the Fisher block.
3. Exact brute-force query time at 100k entries (median of repeated queries, k=10, 128-d),
   after the cache is built; the first (cold) query, which reads every vector, is reported too.
   The 100k rows are inserted with one SQL transaction and no weights files (the query path is
   the same as for real entries; adding 100k real models one by one would take 100k fsyncs).

Run: python -m benchmarks.kb_retrieval [--omniglot ../shared/data/omniglot] [--record]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from benchmarks.common import append_section, machine
from metaml.data import ClassDataset, load
from metaml.kb import KnowledgeBase
from metaml.taskrep import TaskEncoder
from metaml.tasks import EpisodeSampler

KS = (1, 5, 10)
SETTINGS = [  # (label, encoder options, metric)
    ("mean+spread, euclidean", {}, "euclidean"),
    ("mean+spread, cosine", {}, "cosine"),
    ("mean+spread, blocks normalised", {"normalize": True}, "euclidean"),
    ("mean+spread+Fisher, euclidean", {"fisher": True}, "euclidean"),
]


def groups_with(ds: ClassDataset, ways: int) -> ClassDataset:
    """Only the groups with at least ``ways`` classes (within-group episodes need them)."""
    groups = np.asarray(ds.class_groups)
    names, sizes = np.unique(groups, return_counts=True)
    return ds.subset_classes(np.flatnonzero(np.isin(groups, names[sizes >= ways])))


def retrieval(ds: ClassDataset, tasks: int, seed: int) -> list[dict[str, object]]:
    """precision@k for each encoder setting, through a real knowledge base."""
    sampler = EpisodeSampler(ds, ways=5, shots=5, queries=1, within_group=True, seed=seed)
    episodes = [sampler.episode(i) for i in range(tasks)]
    labels = np.array([ds.class_groups[int(t.classes[0])] for t in episodes])  # type: ignore[index]
    same = np.array([(labels == g).sum() - 1 for g in labels]) / (len(labels) - 1)
    rows = []
    for label, options, metric in SETTINGS:
        encoder = TaskEncoder(input_shape=ds.shape, **options)  # type: ignore[arg-type]
        with tempfile.TemporaryDirectory() as folder:
            kb = KnowledgeBase(folder, create=True, encoder=encoder)
            vectors = [encoder.encode_task(t) for t in episodes]
            ids = [_bulk_add(kb, v, {"group": g}) for v, g in zip(vectors, labels, strict=True)]
            hits = {k: [] for k in KS}  # type: dict[int, list[float]]
            for i, v in enumerate(vectors):
                found = kb.nearest(v, k=max(KS), metric=metric, exclude=[ids[i]])  # type: ignore[arg-type]
                groups = [n.entry.metadata["group"] for n in found]
                for k in KS:
                    hits[k].append(float(np.mean([g == labels[i] for g in groups[:k]])))
            kb.close()
        row: dict[str, object] = {"setting": label, "chance": float(same.mean())}
        for k in KS:
            h = np.array(hits[k])
            row[f"p@{k}"] = (float(h.mean()), float(1.96 * h.std(ddof=1) / np.sqrt(len(h))))
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def _bulk_add(kb: KnowledgeBase, vector: np.ndarray, metadata: dict[str, object]) -> int:
    """One entry with a shared dummy weights file name: retrieval needs no models."""
    entry = kb.add({"w": np.zeros(1, np.float32)}, representation=vector, metadata=metadata)
    return entry.id


def encode_times(ds: ClassDataset, repeats: int = 30) -> dict[str, float]:
    """Median milliseconds to encode one task."""
    out = {}
    for shots in (1, 5):
        sampler = EpisodeSampler(ds, ways=5, shots=shots, queries=1, seed=0)
        for fisher in (False, True):
            encoder = TaskEncoder(input_shape=ds.shape, fisher=fisher)
            times = []
            for i in range(repeats):
                task = sampler.episode(i)
                start = time.perf_counter()
                encoder.encode_task(task)
                times.append(time.perf_counter() - start)
            out[f"5-way {shots}-shot{' + Fisher' if fisher else ''}"] = 1000 * statistics.median(
                times[3:]
            )
    return out


def query_time(entries: int = 100_000, dim: int = 128, repeats: int = 50) -> dict[str, float]:
    """Exact brute-force query milliseconds at ``entries`` entries (cold first query, then median)."""
    rng = np.random.default_rng(0)
    vectors = rng.random((entries, dim), dtype=np.float32)
    with tempfile.TemporaryDirectory() as folder:
        kb = KnowledgeBase(folder, create=True)
        kb.add({"w": np.zeros(1, np.float32)}, representation=vectors[0])  # records the dimension
        with kb._write() as db:
            for v in vectors[1:]:
                uid = uuid.uuid4().hex
                kb._insert_row(db, {
                    "uid": uid, "created": "", "name": uid[:12], "dataset": "", "classes": "[]",
                    "ways": 5, "shots": 1, "metadata": "{}", "representation": v.tobytes(),
                    "config": None, "model_spec": None, "metrics": "{}",
                    "weights_file": f"{uid}.safetensors", "weights_sha256": "", "weights_bytes": 0,
                })  # fmt: skip
        queries = rng.random((repeats + 1, dim), dtype=np.float32)
        start = time.perf_counter()
        first = kb.nearest(queries[0], k=10)
        cold = time.perf_counter() - start
        times = {"euclidean": [], "cosine": []}  # type: dict[str, list[float]]
        for metric in times:
            for q in queries[1:]:
                start = time.perf_counter()
                kb.nearest(q, k=10, metric=metric)  # type: ignore[arg-type]
                times[metric].append(time.perf_counter() - start)
        # sanity: the exact answer by hand
        d = np.sqrt(((vectors.astype(np.float64) - queries[0]) ** 2).sum(1))
        assert [n.entry.id for n in first] == (np.argsort(d, kind="stable")[:10] + 1).tolist()
        n = len(kb)
        kb.close()
    return {"entries": n, "cold_ms": 1000 * cold,
            **{f"{m}_median_ms": 1000 * statistics.median(t) for m, t in times.items()},
            **{f"{m}_p95_ms": 1000 * float(np.percentile(t, 95)) for m, t in times.items()}}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--omniglot", default=str(Path(__file__).resolve().parents[2] / "shared/data/omniglot")
    )
    parser.add_argument("--tasks", type=int, default=400)
    parser.add_argument("--record", action="store_true", help="append the results to RESULTS.md")
    args = parser.parse_args()
    torch.set_num_threads(1)
    threadpool_limits(1)  # one BLAS thread: the shared machine's other jobs hold the cores
    datasets = {
        "Omniglot-small": load("omniglot-small", root=args.omniglot),
        "glyphs": load("glyphs"),
    }
    results: dict[str, dict[str, Any]] = {}
    for name, ds in datasets.items():
        assert isinstance(ds, ClassDataset)
        ds = groups_with(ds, 5)
        print(f"{name}: {ds}", flush=True)
        results[name] = {"dataset": str(ds), "rows": retrieval(ds, args.tasks, seed=0)}
    omniglot = datasets["Omniglot-small"]
    assert isinstance(omniglot, ClassDataset)
    timing = encode_times(omniglot)
    print(json.dumps(timing), flush=True)
    query = query_time()
    print(json.dumps(query), flush=True)
    if args.record:
        append_section(
            "Task representations and knowledge-base search",
            report(results, timing, query, args.tasks),
        )


def report(
    results: dict[str, dict[str, object]],
    timing: dict[str, float],
    query: dict[str, float],
    tasks: int,
) -> str:
    lines = [
        f"`python -m benchmarks.kb_retrieval --record`: {tasks} 5-way 5-shot tasks per dataset, each drawn",
        "within one alphabet (seed 0), stored in a knowledge base; each task queries it with itself left",
        "out. precision@k = share of its k nearest tasks from its own alphabet, mean ± 95% CI over the",
        "query tasks. Reference backbone: conv4 with random weights (seed 0), no training.",
        "One torch thread and one BLAS thread.",
        f"Machine: {machine()}.",
        "",
    ]
    for name, res in results.items():
        lines += [f"{name} ({res['dataset']}):", "",
                  "| representation, metric | " + " | ".join(f"p@{k}" for k in KS) + " | chance |",
                  "|---|" + "---|" * (len(KS) + 1)]  # fmt: skip
        for row in res["rows"]:  # type: ignore[attr-defined]
            cells = " | ".join(f"{row[f'p@{k}'][0]:.3f} ± {row[f'p@{k}'][1]:.3f}" for k in KS)
            lines.append(f"| {row['setting']} | {cells} | {row['chance']:.3f} |")
        lines.append("")
    lines += ["Encoding time per task (median, one thread, Omniglot 28x28):", ""]
    lines += [f"- {k}: {v:.1f} ms" for k, v in timing.items()]
    lines += ["", f"Exact brute-force search, {query['entries']:,} entries, 128-d, k=10 (one thread):", "",
              f"- median query {query['euclidean_median_ms']:.1f} ms euclidean "
              f"(p95 {query['euclidean_p95_ms']:.1f}), {query['cosine_median_ms']:.1f} ms cosine "
              f"(p95 {query['cosine_p95_ms']:.1f}); first query with the cache cold "
              f"(reads all vectors from SQLite): {query['cold_ms']:.0f} ms"]  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    main()
