"""Meta-feature extraction time: metaml against pymfe, side by side on the same corpus tasks.

Run from the repository root (pymfe is a benchmark-only comparison, not a dependency)::

    pip install pymfe
    flock /tmp/metaml-heavy.lock python -m benchmarks.metafeatures_pymfe [--tasks 30]

Both extract the same four groups (general, statistical, info-theory, landmarking; mean and sd
summaries; 10-fold landmarkers) from the same data: every ``len(corpus) // tasks``-th corpus
task, missing values imputed beforehand (pymfe does not accept them; median for numbers, a
"NA" category otherwise), categorical columns declared to pymfe. One thread; the wall time of
each extraction is the best of ``--repeats``. The agreement column counts the shared feature
names whose values agree within 1e-4 (relative) or 1e-5 (absolute), ignoring pymfe's NaNs.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
import warnings
from collections.abc import Callable
from typing import Any

from threadpoolctl import threadpool_limits

from metaml.automl.corpus import load_corpus, load_task
from metaml.data.tabular import categorical_columns
from metaml.taskrep.metafeatures import metafeatures

GROUPS = ["general", "statistical", "info-theory", "landmarking"]


def _best_time(fn: Callable[[], dict[str, float]], repeats: int) -> tuple[float, dict[str, float]]:
    best, out = math.inf, {}
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tasks", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--max-rows", type=int, default=5000)
    args = parser.parse_args()
    from pymfe.mfe import MFE

    corpus = load_corpus()
    step = max(1, len(corpus) // args.tasks)
    rows = []
    for task in corpus[::step][: args.tasks]:
        t = load_task(task, max_rows=args.max_rows)
        X = t.X.copy()
        cats = categorical_columns(X)
        for c in X.columns:
            if c in cats:
                X[c] = X[c].astype(str).where(X[c].notna(), "NA")
            else:
                X[c] = X[c].astype(float).fillna(X[c].astype(float).median()).fillna(0.0)
        cat_idx = [i for i, c in enumerate(X.columns) if c in cats]
        Xp = X.to_numpy(dtype=object) if cat_idx else X.to_numpy(dtype=float)

        def ours(X: Any = X, y: Any = t.y) -> dict[str, float]:
            return metafeatures(X, y, landmark_max_rows=None)

        def theirs(Xp: Any = Xp, y: Any = t.y, cat_idx: list[int] = cat_idx) -> dict[str, float]:
            mfe = MFE(groups=GROUPS, summary=["mean", "sd"], random_state=0)
            mfe.fit(Xp, y, cat_cols=cat_idx, suppress_warnings=True)
            names, values = mfe.extract(suppress_warnings=True)
            return dict(zip(names, values, strict=True))

        with threadpool_limits(1), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t_ours, mf = _best_time(ours, args.repeats)
            try:
                t_theirs, ref = _best_time(theirs, args.repeats)
            except Exception as exc:  # pymfe fails on some real tables; say so in the table
                t_theirs, ref = math.nan, {}
                print(f"{task.name}: pymfe failed: {type(exc).__name__}: {exc}")
        shared = [k for k in mf if k in ref and isinstance(ref[k], float) and math.isfinite(ref[k])]
        agree = sum(1 for k in shared if math.isclose(mf[k], ref[k], rel_tol=1e-4, abs_tol=1e-5))
        rows.append((task.name, len(t.y), X.shape[1], t_ours, t_theirs, agree, len(shared)))
        print(
            f"{task.name:32s} {len(t.y):6d}x{X.shape[1]:<4d} metaml {t_ours:7.3f}s "
            f"pymfe {t_theirs:7.3f}s  agree {agree}/{len(shared)}",
            flush=True,
        )
    ok = [r for r in rows if math.isfinite(r[4])]
    speedups = [r[4] / r[3] for r in ok]
    print(
        f"\n{len(rows)} tasks, pymfe ran on {len(ok)}; total metaml {sum(r[3] for r in ok):.1f} s, "
        f"pymfe {sum(r[4] for r in ok):.1f} s; median speed-up {statistics.median(speedups):.2f}x "
        f"(min {min(speedups):.2f}x, max {max(speedups):.2f}x); "
        f"agreement {sum(r[5] for r in ok)}/{sum(r[6] for r in ok)} shared values"
    )


if __name__ == "__main__":
    main()
