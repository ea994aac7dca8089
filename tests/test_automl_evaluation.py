"""Leave-one-dataset-out judged on held-out repeats, checked by hand-unrolled computations."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from helpers import four_kinds_knowledge

from metaml.automl.evaluation import aligned_repeats, judged_so_far, leave_one_dataset_out
from metaml.automl.knowledge import MetaKnowledge
from metaml.automl.recommend import (
    ActiveTesting,
    RandomOrder,
    StaticPortfolio,
    evaluation_order,
    normalised_scores,
)


def _repeat(kb: MetaKnowledge, seed: int, noise: float = 0.03) -> MetaKnowledge:
    rng = np.random.default_rng(seed)
    return dataclasses.replace(kb, scores=kb.scores + rng.normal(0, noise, kb.scores.shape))


def test_judged_so_far_returns_the_best_seen_and_scores_it_by_the_judge() -> None:
    kb = four_kinds_knowledge()
    rec = StaticPortfolio().fit(kb.subset(range(1, len(kb.names))))
    order = evaluation_order(rec, kb, 0, 8)
    seen = np.array([0.5, 0.9, 0.7, np.nan, 0.9, 0.6, 0.8, 0.4])
    judge = np.linspace(0.0, 1.0, 8)[::-1]  # candidate j judged 1 - j/7
    got = judged_so_far(rec, kb, 0, seen, judge)
    # Unrolled: after b evaluations the search returns the first of the highest seen scores
    # among order[:b] (a missing score is a failure, never returned while another exists).
    for b in range(1, 9):
        firsts = order[:b]
        values = np.nan_to_num(seen[firsts], nan=-np.inf)
        returned = firsts[int(np.argmax(values))]
        assert got[b - 1] == pytest.approx(judge[returned])


def test_adaptive_search_reads_the_seen_scores_not_the_stored_row() -> None:
    kb = four_kinds_knowledge()  # datasets 0-13 are of kind 0, 14-25 of kind 1
    rec = ActiveTesting(beta=3.0).fit(kb.subset(range(1, len(kb.names))))
    seen = kb.scores[15]  # dataset 0 measured like one of kind 1
    swapped = dataclasses.replace(kb, scores=np.vstack([seen, kb.scores[1:]]))
    as_kind_1 = evaluation_order(rec, kb, 0, 8, scores=seen)
    assert as_kind_1 == evaluation_order(rec, swapped, 0, 8)
    assert as_kind_1 != evaluation_order(rec, kb, 0, 8)


def test_identical_repeats_reproduce_the_best_so_far() -> None:
    # The judge is the seen scores themselves: the best seen is the best normalised score.
    kb = four_kinds_knowledge()
    methods = {
        "static": lambda i: [StaticPortfolio()],
        "active": lambda i: [ActiveTesting(beta=10.0)],
        "random": lambda i: [RandomOrder(seed=i)],
    }
    plain = leave_one_dataset_out(kb, methods)
    judged = leave_one_dataset_out(kb, methods, repeats=[kb, kb, kb])
    for name in methods:
        np.testing.assert_allclose(judged[name], plain[name])


def test_each_repeat_is_seen_in_turn_and_judged_by_the_others_mean() -> None:
    kb = four_kinds_knowledge()
    repeats = [_repeat(kb, s) for s in (1, 2, 3)]
    methods = {"active": lambda i: [ActiveTesting(beta=10.0)]}
    got = leave_one_dataset_out(kb, methods, test=[4, 7], repeats=repeats)["active"]
    for row, i in enumerate([4, 7]):
        rec = ActiveTesting(beta=10.0).fit(kb.subset([d for d in range(len(kb.names)) if d != i]))
        curves = []
        for r in range(3):
            others = [repeats[o].scores[i] for o in range(3) if o != r]
            judge = normalised_scores(np.mean(others, axis=0)[None])[0]
            curves.append(judged_so_far(rec, kb, i, repeats[r].scores[i], judge))
        np.testing.assert_allclose(got[row], np.mean(curves, axis=0))
    # Noise in the scores the search reads costs something: the judged curve sits below 1.
    assert got[:, -1].max() <= 1.0
    assert (got[:, 0] < 1.0).any()


def test_aligned_repeats_reorders_and_refuses_what_does_not_match() -> None:
    kb = four_kinds_knowledge().subset([0, 14, 26, 36])
    shuffled = kb.subset([2, 0, 3, 1])
    order = [5, 1, 0, 7, 2, 3, 6, 4]
    permuted = dataclasses.replace(
        shuffled,
        configurations=[kb.configurations[j] for j in order],
        scores=shuffled.scores[:, order],
        fit_times=shuffled.fit_times[:, order],
    )
    np.testing.assert_array_equal(aligned_repeats(kb, [kb, permuted]), [kb.scores, kb.scores])
    with pytest.raises(ValueError, match="at least two"):
        aligned_repeats(kb, [kb])
    with pytest.raises(ValueError, match="repeat 1 lacks 1 of the datasets"):
        aligned_repeats(kb, [kb, kb.subset([0, 1, 2])])
