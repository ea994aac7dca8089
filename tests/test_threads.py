"""Task threads: the meta-batch's tasks on several threads give the one-thread meta-gradient."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
import torch
from helpers import GRADIENT_LEARNER_CASES, conv_batch, meta_gradient

from metaml import UserError
from metaml.algorithms.gbml import MAML
from metaml.nn import create_backbone
from metaml.threads import call_module, map_in_threads


@pytest.fixture
def one_intra_op_thread() -> Iterator[None]:
    """One intra-op thread everywhere, so each convolution sums in one fixed order and the
    threaded and plain runs can be compared bit for bit."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.usefixtures("one_intra_op_thread")
@pytest.mark.parametrize(("cls", "kwargs"), GRADIENT_LEARNER_CASES)
def test_task_threads_give_the_one_thread_meta_gradient_exactly(cls: type, kwargs: dict) -> None:
    batch = conv_batch(5)
    results, callers = [], []
    for threads in (1, 2, 3):
        torch.manual_seed(0)
        net = create_backbone("conv4", num_outputs=5, hidden=8, track_running_stats=False)
        learner = cls(net.double(), inner_lr=0.4, vectorize="loop", task_threads=threads, **kwargs)
        # The hook is copied into the replicas: it records which threads ran the head.
        names: set[str] = set()
        net.head.register_forward_pre_hook(
            lambda *_, names=names: names.add(threading.current_thread().name)
        )
        results.append(meta_gradient(learner.double(), batch))
        callers.append(names)
    (metrics, reference), *threaded = results
    assert any(g.abs().sum() > 0 for g in reference)
    assert callers[0] == {threading.current_thread().name}
    assert all(n and all(name.startswith("metaml-task") for name in n) for n in callers[1:])
    for got_metrics, got in threaded:
        assert got_metrics == metrics
        assert all(torch.equal(a, b) for a, b in zip(got, reference, strict=True))


def test_task_threads_leave_the_shared_model_untouched() -> None:
    """Task threads call replicas; the learner's own modules keep their tensors and modes."""
    net = create_backbone("conv4", num_outputs=5, hidden=8, track_running_stats=False).double()
    learner = MAML(net, inner_lr=0.4, vectorize="loop", task_threads=2)
    before = {n: (p, p.detach().clone()) for n, p in learner.named_parameters()}
    learner.meta_loss(conv_batch(4))[0].backward()
    for name, p in learner.named_parameters():
        same_tensor, value = before[name]
        assert p is same_tensor and torch.equal(p, value) and p.grad is not None


def test_task_threads_inherit_the_callers_autocast() -> None:
    net = torch.nn.Linear(3, 2)
    x = torch.randn(4, 5, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        dtypes = [o.dtype for o in map_in_threads(lambda i: call_module(net, {}, x[i]), 4, 2)]
    plain = [o.dtype for o in map_in_threads(lambda i: call_module(net, {}, x[i]), 4, 2)]
    assert dtypes == [torch.bfloat16] * 4 and plain == [torch.float32] * 4


def test_task_threads_take_the_callers_modes_and_thread_count() -> None:
    before = torch.get_num_threads()
    try:
        for count in (1, 2):
            torch.set_num_threads(count)  # the pool's threads keep their first count otherwise
            seen = set(map_in_threads(lambda i: torch.get_num_threads(), 4, threads=2))
            assert seen == {count}
    finally:
        torch.set_num_threads(before)
    with torch.inference_mode():
        assert all(map_in_threads(lambda i: torch.is_inference_mode_enabled(), 4, threads=2))
    with torch.no_grad():
        assert not any(map_in_threads(lambda i: torch.is_grad_enabled(), 4, threads=2))


def test_nested_task_threads_run_in_turn_instead_of_waiting_on_the_pool() -> None:
    def outer(i: int) -> list[int]:
        return list(map_in_threads(lambda j: 10 * i + j, 3, threads=2))

    assert list(map_in_threads(outer, 4, threads=2)) == [
        [10 * i + j for j in range(3)] for i in range(4)
    ]


def test_task_threads_take_the_loop_and_refuse_vmap_and_compile() -> None:
    net = create_backbone("conv4", num_outputs=5, hidden=8, track_running_stats=False).double()
    learner = MAML(net, inner_lr=0.4, task_threads=2)  # vectorize="auto"
    learner.meta_loss(conv_batch(2))
    assert learner.chooser.choice is None  # never timed vmap: the loop was taken
    for options in ({"vectorize": "vmap"}, {"compile": True}):
        with pytest.raises(UserError, match="excludes compile=True and vectorize='vmap'"):
            MAML(create_backbone("mlp"), task_type="regression", task_threads=2, **options)


def test_task_thread_errors_reach_the_caller() -> None:
    def fail_on_two(i: int) -> int:
        if i == 2:
            raise ValueError("task 2 failed")
        return i

    with pytest.raises(ValueError, match="task 2 failed"):
        list(map_in_threads(fail_on_two, 4, threads=2))


def test_call_module_in_a_thread_uses_the_given_and_the_module_tensors() -> None:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
    net.eval()  # running statistics (buffers) are read, and must be the module's own
    net[1].running_mean.fill_(0.5)
    weight = {"2.weight": torch.ones(2, 4)}
    x = torch.randn(6, 3)
    expected = torch.func.functional_call(net, weight, (x,))
    got = list(map_in_threads(lambda i: call_module(net, weight, x), 2, threads=2))
    assert all(torch.equal(g, expected) for g in got)


def test_task_threads_refuse_dropout_and_bad_counts() -> None:
    net = torch.nn.Sequential(torch.nn.Linear(1, 8), torch.nn.Dropout(0.1), torch.nn.Linear(8, 1))
    with pytest.raises(UserError, match="without dropout"):
        MAML(net, task_type="regression", task_threads=2)
    assert MAML(net, task_type="regression", task_threads=1).task_threads == 1
    with pytest.raises(UserError, match="task_threads must be"):
        MAML(create_backbone("mlp"), task_type="regression", task_threads=0)


def test_task_threads_reach_the_learner_and_share_the_cores(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from metaml.config import load_config
    from metaml.runs import build_learner, build_samplers

    set_to: list[int] = []
    monkeypatch.setattr(torch, "set_num_threads", set_to.append)
    monkeypatch.setattr("metaml.runs._DEFAULT_THREADS", 8)
    cfg = load_config(None, ["algorithm.name=maml", "algorithm.task_threads=2"])
    learner = build_learner(cfg, build_samplers(cfg).train)
    assert learner.task_threads == 2 and set_to == [4]  # type: ignore[attr-defined]
    cfg = load_config(None, ["algorithm.task_threads=2", "threads=3"])
    build_learner(cfg, build_samplers(cfg).train)
    assert set_to == [4, 3]  # an explicit thread count wins


@pytest.mark.usefixtures("one_intra_op_thread")
def test_evaluation_on_task_threads_gives_the_same_scores_in_order() -> None:
    from metaml.data import Sinusoid
    from metaml.evaluate import evaluate
    from metaml.tasks import EpisodeSampler

    sampler = EpisodeSampler(Sinusoid(), shots=5, queries=10, seed=3)
    torch.manual_seed(0)
    learner = MAML(create_backbone("mlp"), task_type="regression", inner_lr=0.05, inner_steps=3)
    one = evaluate(learner, sampler, episodes=21)
    learner.task_threads = 2  # the learner's own setting is evaluate's default
    two = evaluate(learner, sampler, episodes=21)
    three = evaluate(learner, sampler, episodes=21, task_threads=3)
    assert len(set(one.scores)) > 1
    assert two.scores == one.scores and three.scores == one.scores


def test_evaluation_refuses_task_threads_for_learners_without_them() -> None:
    from metaml.algorithms import ProtoNet
    from metaml.data import Sinusoid
    from metaml.evaluate import evaluate
    from metaml.tasks import EpisodeSampler

    sampler = EpisodeSampler(Sinusoid(), shots=5, queries=10)
    learner = ProtoNet(create_backbone("mlp", num_outputs=0))
    with pytest.raises(UserError, match="does not adapt on task threads"):
        evaluate(learner, sampler, episodes=2, task_threads=2)


_FRESH_LEAF_RACE = """
import sys, torch
from metaml.threads import map_in_threads

class Scale(torch.autograd.Function):  # applied with the GIL held, as metaml's fused kernel
    @staticmethod
    def forward(ctx, x, w):
        return x * w

    @staticmethod
    def backward(ctx, g):
        return g, g

x = torch.randn(64)
for _ in range(int(sys.argv[1])):
    w = torch.randn(64, requires_grad=True)  # a fresh leaf: no gradient accumulator yet

    def call(i):  # the other thread records w in an op, which releases the GIL
        return (Scale.apply(x, w) if i % 2 else w - x).sum()

    list(map_in_threads(call, 2, threads=2, leaves=[w]))
print("finished")
"""


def test_threads_recording_one_fresh_leaf_do_not_deadlock() -> None:
    """torch 2.13 deadlocks when two threads make one leaf's gradient accumulator at once, one
    of them holding the GIL (a custom autograd function): without ``leaves`` this script hung
    within 3,000 iterations in every one of 4 tries (and within 10 in others); with it, the
    accumulators exist before the threads start. In a subprocess, so a regression fails on the
    timeout instead of hanging the suite."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", _FRESH_LEAF_RACE, "3000"],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "finished"
