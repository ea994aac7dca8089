"""metaml.functional against independent computations: hand-written steps, torch.optim, loops."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn
from torch.func import functional_call

from metaml.errors import UserError
from metaml.functional import (
    VectorizeChooser,
    adam_init,
    adam_step,
    inner_gradients,
    inner_loop,
    map_tasks,
    recomputed_inner_loop,
    sgd_step,
    use_batch_statistics_,
    vmap_safe,
)
from metaml.nn import BatchNorm2d
from metaml.nn.backbones import batch_norm_batch_stats


def test_inner_loop_matches_hand_written_sgd_on_a_quadratic() -> None:
    # loss = (w*x - y)^2, dloss/dw = 2x(wx - y)
    x, y, lr = 2.0, 3.0, 0.05
    w0 = torch.tensor(0.5, requires_grad=True)
    fast = inner_loop(lambda p, s: (p["w"] * x - y) ** 2, {"w": w0}, steps=3, lr=lr)
    w = 0.5
    for _ in range(3):
        w -= lr * 2 * x * (w * x - y)
    assert fast["w"].item() == pytest.approx(w)
    # d w3 / d w0 = (1 - 2 lr x^2)^3 (second-order, differentiated through the steps)
    (dw,) = torch.autograd.grad(fast["w"], w0)
    assert dw.item() == pytest.approx((1 - 2 * lr * x * x) ** 3)


def test_first_order_detaches_the_inner_gradient() -> None:
    w0 = torch.tensor(0.5, requires_grad=True)
    fast = inner_loop(
        lambda p, s: (p["w"] * 2.0 - 3.0) ** 2, {"w": w0}, steps=2, lr=0.05, first_order=True
    )
    (dw,) = torch.autograd.grad(fast["w"], w0)
    assert dw.item() == 1.0  # only the identity path w0 -> w0 - lr*g survives


def test_per_step_and_per_tensor_rates() -> None:
    rates = torch.tensor([0.1, 0.2], requires_grad=True)
    params = {"a": torch.tensor(1.0), "b": torch.tensor(1.0)}
    fast = inner_loop(
        lambda p, s: p["a"] + 2 * p["b"], params, steps=2, lr=lambda s: {"a": rates[s], "b": 0.5}
    )
    assert fast["a"].item() == pytest.approx(1 - 0.1 - 0.2)
    assert fast["b"].item() == pytest.approx(1 - 2 * 0.5 * 2)
    (g,) = torch.autograd.grad(fast["a"], rates)
    assert g.tolist() == [-1.0, -1.0]


def test_sgd_step_returns_new_tensors() -> None:
    p = {"w": torch.ones(2)}
    q = sgd_step(p, {"w": torch.ones(2)}, 0.5)
    assert p["w"].tolist() == [1.0, 1.0] and q["w"].tolist() == [0.5, 0.5]


def test_adam_matches_torch_optim() -> None:
    torch.manual_seed(0)
    w = torch.randn(3, requires_grad=True)
    opt = torch.optim.Adam([w], lr=0.1, betas=(0.0, 0.999))
    params, state = {"w": w.detach().clone()}, adam_init({"w": w.detach()})
    for _ in range(4):
        target = torch.randn(3)
        opt.zero_grad()
        ((w - target) ** 2).sum().backward()
        opt.step()
        grads = inner_gradients(lambda p, s, t=target: ((p["w"] - t) ** 2).sum(), params, 0)
        params, state = adam_step(params, grads, state, lr=0.1, betas=(0.0, 0.999))
    torch.testing.assert_close(params["w"], w.detach())
    assert state.step == 4


def test_map_tasks_vmap_equals_loop_with_pytrees() -> None:
    xs = torch.randn(3, 4, 2)
    fn = lambda x: {"s": x.sum(), "m": x.mean(0)}  # noqa: E731
    a, b = map_tasks(fn, [xs], "vmap"), map_tasks(fn, [xs], "loop")
    torch.testing.assert_close(a, b)
    assert a["m"].shape == (3, 2)
    with pytest.raises(UserError):
        map_tasks(fn, [xs], "fast")


def test_vmapped_second_order_through_batch_norm_equals_loop_and_finite_differences() -> None:
    # Regression test: native batch_norm's double backward under vmap is wrong in torch 2.13;
    # metaml's BatchNorm must give the loop's (and finite differences') meta-gradient.
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1),
        BatchNorm2d(2, track_running_stats=False),
        nn.Flatten(),
        nn.Linear(32, 1),
    ).double()
    params = {k: v.detach().requires_grad_() for k, v in net.named_parameters()}
    sx, qx = (
        torch.randn(3, 4, 1, 4, 4, dtype=torch.float64),
        torch.randn(3, 4, 1, 4, 4, dtype=torch.float64),
    )

    def task(p: dict[str, torch.Tensor], s: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        fast = inner_loop(
            lambda f, _: functional_call(net, f, (s,)).pow(2).mean(), p, steps=2, lr=0.3
        )
        return functional_call(net, fast, (q,)).pow(2).mean()

    total = lambda p, mode: map_tasks(lambda s, q: task(p, s, q), [sx, qx], mode).sum()  # noqa: E731
    g_vmap = torch.autograd.grad(total(params, "vmap"), params["0.weight"])[0]
    g_loop = torch.autograd.grad(total(params, "loop"), params["0.weight"])[0]
    torch.testing.assert_close(g_vmap, g_loop, rtol=1e-9, atol=1e-12)
    eps = 1e-6
    with torch.no_grad():
        bumped = {k: v.clone() for k, v in params.items()}
        bumped["0.weight"].view(-1)[0] += eps
        up = total(bumped, "loop").item()
        bumped["0.weight"].view(-1)[0] -= 2 * eps
        down = total(bumped, "loop").item()
    assert g_loop.view(-1)[0].item() == pytest.approx((up - down) / (2 * eps), rel=1e-6)


def test_batch_norm_batch_stats_equals_native() -> None:
    x, w, b = torch.randn(5, 3, 4), torch.randn(3), torch.randn(3)
    ref = torch.nn.functional.batch_norm(x, None, None, w, b, training=True, eps=1e-5)
    torch.testing.assert_close(batch_norm_batch_stats(x, w, b, 1e-5), ref)


def test_use_batch_statistics_converts_in_place() -> None:
    net = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3), nn.Linear(3, 1))
    state_keys = set(net.state_dict())
    assert not vmap_safe(net)
    assert use_batch_statistics_(net) is net
    assert vmap_safe(net)
    assert net[1].running_mean is None and not net[1].track_running_stats
    assert set(net.state_dict()) == state_keys - {
        "1.running_mean",
        "1.running_var",
        "1.num_batches_tracked",
    }
    net.eval()  # batch statistics even in eval mode
    x = torch.randn(6, 2)
    h = net[0](x)
    torch.testing.assert_close(
        net[1](h),
        torch.nn.functional.batch_norm(h, None, None, net[1].weight, net[1].bias, training=True),
    )


def test_chooser_times_both_then_keeps_the_faster(caplog: pytest.LogCaptureFixture) -> None:
    chooser = VectorizeChooser("auto", trials=2)
    modes = []
    with caplog.at_level(logging.INFO, logger="metaml.functional"):
        for _ in range(8):
            mode = chooser.next_mode()
            modes.append(mode)
            if mode == "loop":  # make the loop iterations measurably slower
                t = torch.randn(300, 300)
                for _ in range(20):
                    t = t @ t.T / 300
    assert modes[:6] == ["loop", "vmap"] * 3
    assert chooser.choice == "vmap" and modes[6:] == ["vmap", "vmap"]
    assert len(chooser.seconds["loop"]) == 2 and len(chooser.seconds["vmap"]) == 2
    assert "chose vmap" in caplog.text


def test_chooser_fixed_modes_and_errors() -> None:
    assert VectorizeChooser("loop").next_mode() == "loop"
    assert VectorizeChooser("auto", can_vmap=False).choice == "loop"
    with pytest.raises(UserError, match="vectorize"):
        VectorizeChooser("fast")  # type: ignore[arg-type]
    with pytest.raises(UserError, match="BatchNorm"):
        VectorizeChooser("vmap", can_vmap=False)


def _meta_gradients(first_order: bool, autograd: bool, monkeypatch: pytest.MonkeyPatch) -> list:
    """Meta-gradients of a 2-step inner loop on a small conv net with BatchNorm, float64."""
    monkeypatch.setattr("metaml.functional._AUTOGRAD_OUTSIDE_TRANSFORMS", autograd)
    torch.manual_seed(0)
    net = use_batch_statistics_(
        nn.Sequential(
            nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(12, 2)
        )
    ).double()
    unused = torch.randn(2, dtype=torch.float64, requires_grad=True)  # gets a zero gradient
    rate = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    x, y = torch.randn(4, 1, 4, 4, dtype=torch.float64), torch.tensor([0, 1, 0, 1])
    params = {**dict(net.named_parameters()), "unused": unused}

    def loss_at(p: dict, step: int) -> torch.Tensor:
        out = functional_call(net, {k: v for k, v in p.items() if k != "unused"}, (x,))
        return nn.functional.cross_entropy(out, y)

    fast = inner_loop(loss_at, params, steps=2, lr=rate, first_order=first_order)
    query = loss_at(fast, 2) + fast["unused"].sum()
    return list(torch.autograd.grad(query, [*net.parameters(), unused, rate], allow_unused=True))


@pytest.mark.parametrize("first_order", [False, True])
def test_autograd_inner_gradients_equal_torch_func_grad(
    first_order: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Outside vmap, inner gradients come from torch.autograd.grad (faster); the meta-gradients
    (to the initial parameters and to the inner rate) equal torch.func.grad's."""
    by_func = _meta_gradients(first_order, autograd=False, monkeypatch=monkeypatch)
    by_autograd = _meta_gradients(first_order, autograd=True, monkeypatch=monkeypatch)
    for a, b in zip(by_autograd, by_func, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert by_func[-1].abs() > 0  # the rate is reached through p - rate * g in both orders


@pytest.mark.parametrize("autograd", [False, True])
def test_inner_gradients_ignore_an_outer_no_grad(
    autograd: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Test-time adaptation runs under no_grad: the steps still move, no graph is recorded."""
    monkeypatch.setattr("metaml.functional._AUTOGRAD_OUTSIDE_TRANSFORMS", autograd)
    w0 = torch.tensor(0.5, requires_grad=True)
    with torch.no_grad():
        fast = inner_loop(lambda p, s: (p["w"] * 2.0 - 3.0) ** 2, {"w": w0}, steps=2, lr=0.05)
    w = 0.5
    for _ in range(2):
        w -= 0.05 * 4 * (w * 2 - 3)
    assert fast["w"].item() == pytest.approx(w)
    assert not fast["w"].requires_grad


def _recomputable_problem() -> tuple[
    dict[str, torch.Tensor], dict[str, torch.Tensor], torch.Tensor
]:
    """A two-layer tanh net whose second layer's bias is meta-learned but not adapted (a
    ``fixed`` tensor), one unused parameter, and a learned per-step rate: float64."""
    torch.manual_seed(0)
    params = {
        "w1": torch.randn(4, 3, dtype=torch.float64, requires_grad=True),
        "w2": torch.randn(2, 4, dtype=torch.float64, requires_grad=True),
        "unused": torch.randn(2, dtype=torch.float64, requires_grad=True),
    }
    fixed = {"b2": torch.randn(2, dtype=torch.float64, requires_grad=True)}
    rates = torch.tensor([0.3, 0.2], dtype=torch.float64, requires_grad=True)
    return params, fixed, rates


def _recomputable_loss(x: torch.Tensor, y: torch.Tensor):  # type: ignore[no-untyped-def]
    def loss_at(t: dict[str, torch.Tensor], step: int) -> torch.Tensor:
        out = torch.tanh(x @ t["w1"].T) @ t["w2"].T + t["b2"]
        return (out - y).pow(2).mean()

    return loss_at


def test_recomputed_inner_loop_gives_inner_loops_values_and_meta_gradient() -> None:
    """Same fast weights, and the same gradients w.r.t. the initial parameters, a fixed
    (meta-learned, not adapted) tensor and learned elementwise and per-step rates."""
    params, fixed, rates = _recomputable_problem()
    sx, sy, qx, qy = (torch.randn(6, n, dtype=torch.float64) for n in (3, 2, 3, 2))
    elementwise = torch.full((4, 3), 0.25, dtype=torch.float64, requires_grad=True)
    lr = lambda step: {"w1": elementwise, "w2": rates[step], "unused": 0.1}  # noqa: E731
    support, query = _recomputable_loss(sx, sy), _recomputable_loss(qx, qy)
    inputs = [*params.values(), *fixed.values(), rates, elementwise]

    def meta_gradient(recompute: bool) -> tuple[torch.Tensor, ...]:
        if recompute:
            fast = recomputed_inner_loop(
                support, params, steps=2, lr=lr, fixed_at=lambda step: fixed
            )
        else:
            fast = inner_loop(lambda p, step: support({**p, **fixed}, step), params, steps=2, lr=lr)
        loss = query({**fast, **fixed}, 2)
        return (loss, *torch.autograd.grad(loss, inputs, allow_unused=True))

    ref, got = meta_gradient(False), meta_gradient(True)
    for a, b in zip(got, ref, strict=True):
        if b is None:
            assert a is None or torch.count_nonzero(a) == 0
        else:
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_recomputed_inner_loop_passes_gradcheck() -> None:
    """Against finite differences, not only against inner_loop."""
    params, fixed, rates = _recomputable_problem()
    sx, sy, qx = (torch.randn(5, n, dtype=torch.float64) for n in (3, 2, 3))
    support = _recomputable_loss(sx, sy)

    def query_outputs(w1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor, r: torch.Tensor):  # type: ignore[no-untyped-def]
        fast = recomputed_inner_loop(
            support, {"w1": w1, "w2": w2}, steps=2, lr=lambda step: r[step],
            fixed_at=lambda step: {"b2": b2},
        )  # fmt: skip
        return torch.tanh(qx @ fast["w1"].T) @ fast["w2"].T + b2

    assert torch.autograd.gradcheck(query_outputs, (params["w1"], params["w2"], fixed["b2"], rates))


def test_recomputed_inner_loop_replays_dropout_and_autocast() -> None:
    """The backward recomputes each step with the forward's random draws (dropout masks) and
    under its autocast mode, so the meta-gradient is that of the function computed."""
    params, fixed, _ = _recomputable_problem()
    sx, sy, qx, qy = (torch.randn(6, n, dtype=torch.float64) for n in (3, 2, 3, 2))
    modes: list[bool] = []

    def dropped(x: torch.Tensor, y: torch.Tensor):  # type: ignore[no-untyped-def]
        def loss_at(t: dict[str, torch.Tensor], step: int) -> torch.Tensor:
            modes.append(torch.is_autocast_enabled("cpu"))
            hidden = torch.nn.functional.dropout(torch.tanh(x @ t["w1"].T), 0.5, training=True)
            return ((hidden @ t["w2"].T + t["b2"] - y) ** 2).mean()

        return loss_at

    support, query = dropped(sx, sy), dropped(qx, qy)

    def meta_gradient(recompute: bool) -> tuple[torch.Tensor, ...]:
        torch.manual_seed(3)
        if recompute:
            fast = recomputed_inner_loop(support, params, steps=2, lr=0.3, fixed_at=lambda s: fixed)
        else:
            fast = inner_loop(lambda p, s: support({**p, **fixed}, s), params, steps=2, lr=0.3)
        loss = query({**fast, **fixed}, 2)
        return torch.autograd.grad(loss, [params["w1"], params["w2"], fixed["b2"]])

    for a, b in zip(meta_gradient(True), meta_gradient(False), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    modes.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        meta_gradient(True)
    assert len(modes) == 5 and all(modes)  # 2 forward steps, the query, 2 recomputed steps
