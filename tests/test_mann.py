"""MANN (Santoro et al. 2016): memory primitives against hand computations, then the learner."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from metaml.algorithms.mann import (
    MANN,
    accuracy_by_instance,
    content_seed,
    cosine_read_weights,
    episode_sequence,
    instance_index,
    least_used,
    lrua_write,
    read_memory,
    update_usage,
)
from metaml.errors import UserError
from metaml.tasks import Task, TaskBatch

# A 3-slot, 2-dimensional memory small enough to compute every number by hand.
MEMORY = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [3.0, 4.0]]])  # (1, 3, 2)


def tiny(**kw: int) -> MANN:
    """A small MANN on 6-dimensional vector inputs."""
    options = dict(
        ways=3, input_shape=(6,), controller_size=8, memory_slots=5, memory_size=4, read_heads=2
    )
    options.update(kw)
    return MANN(**options)  # type: ignore[arg-type]


# -- memory primitives ------------------------------------------------------------------------


def test_cosine_read_weights_match_hand_computation() -> None:
    key = torch.tensor([[[1.0, 1.0]]])  # (1, 1, 2)
    # cos(key, row): (1,0) -> 1/sqrt2, (0,2) -> 1/sqrt2, (3,4) -> 7/(5 sqrt2)
    cos = [1 / math.sqrt(2), 1 / math.sqrt(2), 7 / (5 * math.sqrt(2))]
    total = sum(math.exp(c) for c in cos)
    expected = [math.exp(c) / total for c in cos]
    got = cosine_read_weights(key, MEMORY)
    assert got.shape == (1, 1, 3)
    assert got[0, 0].tolist() == pytest.approx(expected, abs=1e-6)


def test_cosine_read_weights_ignore_key_and_row_scale() -> None:
    key = torch.tensor([[[0.3, -0.2]], [[3.0, -2.0]]])  # same direction, two scales
    memory = torch.cat([MEMORY, MEMORY * torch.tensor([[[5.0], [0.1], [2.0]]])])
    got = cosine_read_weights(key, memory)
    torch.testing.assert_close(got[0], got[1])


def test_key_strength_sharpens_the_softmax() -> None:
    key = torch.tensor([[[1.0, 0.0]]])
    cos = [1.0, 0.0, 0.6]  # against (1,0), (0,2), (3,4)
    total = sum(math.exp(3 * c) for c in cos)
    got = cosine_read_weights(key, MEMORY, strength=torch.tensor([[3.0]]))
    assert got[0, 0].tolist() == pytest.approx([math.exp(3 * c) / total for c in cos], abs=1e-6)
    net = tiny(key_strength=True)
    logits, _ = net(torch.rand(2, 4, 6), torch.randint(0, 3, (2, 4)))
    assert logits.shape == (2, 4, 3)
    # Starts sharp: with zero weights the strength is 1 + softplus(bias) = 10 for every head.
    assert torch.allclose(1 + F.softplus(net.interface.bias[-2:]), torch.full((2,), 10.0))


def test_read_memory_is_weighted_sum_of_rows() -> None:
    weights = torch.tensor([[[0.5, 0.25, 0.25], [0.0, 0.0, 1.0]]])  # two heads
    got = read_memory(weights, MEMORY)
    # head 0: 0.5*(1,0) + 0.25*(0,2) + 0.25*(3,4) = (1.25, 1.5); head 1: row 2
    assert got.tolist() == [[[1.25, 1.5], [3.0, 4.0]]]


def test_least_used_marks_the_n_smallest_usages() -> None:
    usage = torch.tensor([[0.7, 0.2, 0.9, 0.1, 0.5], [0.0, 3.0, 2.0, 1.0, 4.0]])
    assert least_used(usage, 1).tolist() == [[0, 0, 0, 1, 0], [1, 0, 0, 0, 0]]
    assert least_used(usage, 2).tolist() == [[0, 1, 0, 1, 0], [1, 0, 0, 1, 0]]
    assert least_used(usage, 3).sum(1).tolist() == [3, 3]


def test_least_used_breaks_ties_towards_lower_slots() -> None:
    # The paper's "<= n-th smallest" would mark all four; exactly n are marked, lowest first.
    assert least_used(torch.zeros(1, 4), 2).tolist() == [[1, 1, 0, 0]]


def test_lrua_write_matches_hand_computation() -> None:
    keys = torch.tensor([[[1.0, -1.0], [2.0, 0.0]]])  # two heads, (1, 2, 2)
    gate_logits = torch.tensor([[0.0, math.log(3.0)]])  # sigmoid: 0.5 and 0.75
    prev_read = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]])  # (1, 2, 3)
    prev_usage = torch.tensor([[0.3, 0.1, 0.2]])  # least used: slot 1, then slot 2
    memory, write = lrua_write(MEMORY, keys, gate_logits, prev_read, prev_usage)
    # w^lu marks the 2 least-used slots {1, 2}; w^w = s * w^r + (1 - s) * w^lu
    expected_w = [[0.5, 0.5, 0.5], [0.0, 0.25, 0.75 + 0.25]]
    torch.testing.assert_close(write[0], torch.tensor(expected_w))
    # slot 1 (the least used) is zeroed, then each head adds w^w(i) * key
    expected_m = [
        [1.0 + 0.5 * 1.0 + 0.0 * 2.0, 0.0 + 0.5 * -1.0],
        [0.0 + 0.5 * 1.0 + 0.25 * 2.0, 0.0 + 0.5 * -1.0],
        [3.0 + 0.5 * 1.0 + 1.0 * 2.0, 4.0 + 0.5 * -1.0],
    ]
    torch.testing.assert_close(memory[0], torch.tensor(expected_m))


def test_lrua_write_gate_selects_previous_read_or_least_used() -> None:
    keys = torch.tensor([[[1.0, 1.0]]])
    prev_read = torch.tensor([[[0.0, 0.0, 1.0]]])
    prev_usage = torch.tensor([[0.5, 0.1, 0.9]])
    _, to_read = lrua_write(MEMORY, keys, torch.tensor([[30.0]]), prev_read, prev_usage)
    _, to_free = lrua_write(MEMORY, keys, torch.tensor([[-30.0]]), prev_read, prev_usage)
    assert to_read[0, 0].tolist() == pytest.approx([0.0, 0.0, 1.0])
    assert to_free[0, 0].tolist() == pytest.approx([0.0, 1.0, 0.0])


def test_usage_decays_by_gamma_without_access() -> None:
    usage = torch.tensor([[1.0, 0.5, 0.0]])
    none = torch.zeros(1, 2, 3)
    for _ in range(3):
        usage = update_usage(usage, none, none, gamma=0.95)
    assert usage[0].tolist() == pytest.approx([0.95**3, 0.5 * 0.95**3, 0.0])


def test_usage_adds_reads_and_writes_of_all_heads() -> None:
    reads = torch.tensor([[[0.2, 0.3, 0.5], [1.0, 0.0, 0.0]]])
    writes = torch.tensor([[[0.0, 1.0, 0.0], [0.0, 0.0, 0.5]]])
    got = update_usage(torch.tensor([[1.0, 2.0, 4.0]]), reads, writes, gamma=0.5)
    assert got[0].tolist() == pytest.approx([0.5 + 1.2, 1.0 + 1.3, 2.0 + 1.0])


def test_gradient_flows_from_a_later_read_to_an_earlier_write() -> None:
    first_key = torch.tensor([[[1.0, 0.5]]], requires_grad=True)
    memory, _ = lrua_write(
        MEMORY, first_key, torch.zeros(1, 1), torch.zeros(1, 1, 3), torch.tensor([[0.2, 0.1, 0.3]])
    )
    read = read_memory(cosine_read_weights(torch.tensor([[[0.0, 1.0]]]), memory), memory)
    (grad,) = torch.autograd.grad(read.sum(), first_key)
    assert grad.abs().sum() > 0


# -- sequences and accuracy by instance ---------------------------------------------------------


def toy_batch(
    tasks: int = 3, ways: int = 3, shots: int = 2, queries: int = 2, dim: int = 6, seed: int = 0
) -> TaskBatch:
    """Tasks of `ways` Gaussian classes in `dim` dimensions, class-major like the sampler's."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(tasks):
        centers = torch.randn(ways, dim, generator=g)
        sy = torch.arange(ways).repeat_interleave(shots)
        qy = torch.arange(ways).repeat_interleave(queries)
        sx = centers[sy] + 0.1 * torch.randn(len(sy), dim, generator=g)
        qx = centers[qy] + 0.1 * torch.randn(len(qy), dim, generator=g)
        out.append(Task(sx, sy, qx, qy))
    return TaskBatch.stack(out)


def test_episode_sequence_shuffles_each_task_and_keeps_pairs() -> None:
    batch = toy_batch(tasks=4)
    x, y = episode_sequence(batch)
    assert x.shape == (4, 12, 6) and y.shape == (4, 12)
    all_x = torch.cat([batch.support_x, batch.query_x], 1)
    all_y = torch.cat([batch.support_y, batch.query_y], 1)
    orders = []
    for b in range(4):
        # every sequence step is one of the task's examples, with its own label
        match = (x[b, :, None] == all_x[b, None]).all(-1)  # (T, T)
        source = match.float().argmax(1)
        assert sorted(source.tolist()) == list(range(12))
        assert torch.equal(y[b], all_y[b, source])
        orders.append(tuple(source.tolist()))
    assert len(set(orders)) > 1, "tasks must not share one order"
    assert orders[0] != tuple(range(12)), "the class-major order must be shuffled"


def test_episode_sequence_is_a_function_of_the_batch() -> None:
    batch = toy_batch()
    x1, y1 = episode_sequence(batch)
    torch.manual_seed(123)  # the global RNG plays no part
    x2, y2 = episode_sequence(batch)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert content_seed(batch.support_x) != content_seed(toy_batch(seed=1).support_x)


def test_instance_index_counts_earlier_occurrences() -> None:
    labels = torch.tensor([[1, 1, 0, 1, 0, 2], [0, 0, 0, 0, 0, 0]])
    assert instance_index(labels).tolist() == [[0, 1, 0, 2, 1, 0], [0, 1, 2, 3, 4, 5]]


def test_accuracy_by_instance_matches_hand_count() -> None:
    labels = torch.tensor([[0, 1, 0, 1, 0]])
    predicted = torch.tensor([[2, 1, 0, 0, 0]])  # instances: 1 1 2 2 3
    got = accuracy_by_instance(F.one_hot(predicted, 3).float(), labels, instances=4)
    assert got[0, :3].tolist() == [0.5, 0.5, 1.0]
    assert math.isnan(got[0, 3].item())


# -- the learner --------------------------------------------------------------------------------


def test_meta_loss_shapes_and_metrics() -> None:
    torch.manual_seed(0)
    net = tiny()
    loss, metrics = net.meta_loss(toy_batch())
    assert loss.shape == () and loss.requires_grad and math.isfinite(loss.item())
    assert {"loss", "acc", "acc_inst1", "acc_inst2"} <= set(metrics)
    assert "acc_inst10" not in metrics  # 4 examples per class: no 10th instance
    assert loss.item() == pytest.approx(metrics["loss"])


def test_forward_logits_and_state_shapes() -> None:
    net = tiny()
    logits, state = net(torch.rand(2, 7, 6), torch.randint(0, 3, (2, 7)))
    assert logits.shape == (2, 7, 3)
    assert state.memory.shape == (2, 5, 4) and state.read_weights.shape == (2, 2, 5)
    assert state.usage.shape == (2, 5) and state.reads.shape == (2, 8)


def test_gradients_reach_the_controller_through_memory() -> None:
    torch.manual_seed(0)
    net = tiny()
    hidden = net.recurrent.out_features // 4
    with torch.no_grad():  # the output sees only the read vectors, not the controller
        net.output.weight[:, :hidden] = 0
    logits, _ = net(torch.rand(2, 6, 6), torch.randint(0, 3, (2, 6)))
    logits[:, -1].sum().backward()
    for name in ("input.weight", "recurrent.weight", "interface.weight"):
        grad = dict(net.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_the_first_example_reaches_the_last_prediction() -> None:
    net = tiny()
    x = torch.rand(1, 6, 6, requires_grad=True)
    logits, _ = net(x, torch.tensor([[0, 1, 2, 0, 1, 2]]))
    (grad,) = torch.autograd.grad(logits[0, -1].sum(), x)
    assert grad[0, 0].abs().sum() > 0


def test_adapt_predictions_do_not_depend_on_query_order() -> None:
    torch.manual_seed(0)
    net = tiny().eval()
    task = toy_batch(tasks=1).task(0)
    predict = net.adapt(task.support_x, task.support_y)
    with torch.no_grad():
        logits = predict(task.query_x)
        perm = torch.randperm(len(task.query_x))
        torch.testing.assert_close(predict(task.query_x[perm]), logits[perm])
        torch.testing.assert_close(predict(task.query_x[:1]), logits[:1])
    assert logits.shape == (len(task.query_x), 3)


def test_adapt_uses_the_support_labels() -> None:
    torch.manual_seed(0)
    net = tiny().eval()
    task = toy_batch(tasks=1).task(0)
    with torch.no_grad():
        a = net.adapt(task.support_x, task.support_y)(task.query_x)
        b = net.adapt(task.support_x, (task.support_y + 1) % 3)(task.query_x)
    assert not torch.allclose(a, b)


def test_regression_is_refused() -> None:
    with pytest.raises(UserError, match="classification"):
        MANN(task_type="regression", input_shape=(1,))


def test_loss_decreases_on_toy_episodes() -> None:
    """Episodes of 2 random Gaussian classes: MANN must bind them to labels within the episode."""
    torch.manual_seed(0)
    net = MANN(
        ways=2, input_shape=(8,), controller_size=32, memory_slots=16, memory_size=8, read_heads=1
    )
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    losses, late = [], []
    for step in range(60):
        loss, metrics = net.meta_loss(
            toy_batch(tasks=16, ways=2, shots=2, queries=3, dim=8, seed=step)
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(metrics["loss"])
        late.append(metrics["acc_inst5"])
    # chance: loss ln 2 = 0.69, accuracy 0.5; the 5th instance can only beat it through memory
    assert sum(losses[-20:]) / 20 < sum(losses[:20]) / 20 - 0.03
    assert sum(late[-20:]) / 20 > 0.56


@pytest.mark.slow
def test_compiled_step_trains_like_the_eager_one() -> None:
    """``compile=True`` gives the same loss and gradients as eager (compilation takes ~10 s)."""
    torch.manual_seed(0)
    eager = tiny()
    compiled = tiny(compile=True)  # type: ignore[arg-type]
    compiled.load_state_dict(eager.state_dict())
    batch = toy_batch()
    results = []
    for net in (eager, compiled):
        loss, _ = net.meta_loss(batch)
        loss.backward()
        results.append((loss.detach(), [p.grad for p in net.parameters()]))
    assert torch.allclose(results[0][0], results[1][0], atol=1e-6)
    for a, b in zip(results[0][1], results[1][1], strict=True):
        assert a is not None and b is not None and torch.allclose(a, b, atol=1e-5)
    assert compiled._compiled_step is not None  # the compiled path was the one taken
