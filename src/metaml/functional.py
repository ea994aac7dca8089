"""Inner-loop primitives on ``torch.func``: pure functions of parameter dicts.

Parameters are plain ``dict[str, Tensor]`` (:data:`Params`); every step returns new tensors and
never mutates its inputs (optax / TorchOpt style), and a network is evaluated at any parameters
with :func:`torch.func.functional_call` — no monkeypatched modules, no per-task deepcopy.

* :func:`inner_loop` runs ``steps`` of gradient descent. The inner gradients come from
  :func:`torch.func.grad`, which outer autograd differentiates through, so ``loss.backward()`` on
  a query loss gives the exact second-order meta-gradient; ``first_order=True`` detaches them.
* :func:`map_tasks` applies a per-task function over a meta-batch either vectorized with
  :func:`torch.func.vmap` or with a Python loop; both give the same values and meta-gradients.
* :class:`VectorizeChooser` picks the faster of the two by timing the first training iterations.
* :func:`adam_init` / :func:`adam_step`: a functional Adam for inner loops (Reptile).

Example:
    >>> net = torch.nn.Linear(1, 1)
    >>> x, y = torch.randn(8, 1), torch.randn(8, 1)
    >>> loss_at = lambda p, step: ((functional_call(net, p, (x,)) - y) ** 2).mean()
    >>> fast = inner_loop(loss_at, dict(net.named_parameters()), steps=3, lr=0.1)
    >>> sorted(fast), fast["weight"].requires_grad  # differentiable w.r.t. the initial params
    (['bias', 'weight'], True)
"""

from __future__ import annotations

import contextlib
import logging
import statistics
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Literal, NamedTuple, TypeAlias

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.utils import _pytree as pytree

from metaml.errors import UserError
from metaml.nn.backbones import BatchNorm1d, BatchNorm2d, BatchNorm3d, _inside_transform

Params: TypeAlias = dict[str, Tensor]
Rate: TypeAlias = float | Tensor
# A learning rate: one number, one rate per tensor (Tensor broadcastable to it), or per step.
LearningRate: TypeAlias = Rate | Mapping[str, Rate] | Callable[[int], Rate | Mapping[str, Rate]]
LossAt: TypeAlias = Callable[[Params, int], Tensor]
Vectorize: TypeAlias = Literal["auto", "vmap", "loop"]

__all__ = [
    "AdamState",
    "LearningRate",
    "Params",
    "VectorizeChooser",
    "adam_init",
    "adam_step",
    "functional_call",
    "inner_gradients",
    "inner_loop",
    "map_tasks",
    "recomputed_inner_loop",
    "sgd_step",
    "use_batch_statistics_",
    "vmap_safe",
]

log = logging.getLogger("metaml.functional")


def inner_gradients(
    loss_at: LossAt, params: Params, step: int, first_order: bool = False
) -> Params:
    """``∂ loss_at(params, step) / ∂ params`` as a dict, differentiable by outer autograd.

    With ``first_order=True`` the gradients are detached from the outer graph (FOMAML).

    Example:
        >>> p = {"w": torch.tensor(3.0, requires_grad=True)}
        >>> g = inner_gradients(lambda q, step: q["w"] ** 2, p, 0)
        >>> g["w"].item(), torch.autograd.grad(g["w"], p["w"])[0].item()  # 2w and d(2w)/dw
        (6.0, 2.0)
    """
    if _AUTOGRAD_OUTSIDE_TRANSFORMS and not _inside_transform():
        return _autograd_gradients(loss_at, params, step, first_order)
    grads: Params = grad(loss_at)(params, step)
    if first_order:
        grads = {k: g.detach() for k, g in grads.items()}
    return grads


# Outside vmap (the loop path, test-time adaptation) plain autograd gives the same gradients
# as torch.func.grad without its per-operation dispatch through the functorch layer.
_AUTOGRAD_OUTSIDE_TRANSFORMS = True


def _autograd_gradients(loss_at: LossAt, params: Params, step: int, first_order: bool) -> Params:
    """:func:`inner_gradients` with ``torch.autograd.grad``; only outside torch.func transforms.

    Like ``torch.func.grad`` it ignores an outer ``no_grad``: tensors that do not require
    gradients become fresh leaves, so only a graph from them onwards is recorded. The graph to
    meta-parameters is kept (``create_graph``) only for a second-order step outside ``no_grad``.
    """
    with torch.enable_grad():
        leaves = {
            k: p if p.requires_grad else p.detach().requires_grad_() for k, p in params.items()
        }
        loss = loss_at(leaves, step)
    create = torch.is_grad_enabled() and not first_order
    found = torch.autograd.grad(loss, list(leaves.values()), create_graph=create, allow_unused=True)
    return {
        k: torch.zeros_like(p) if g is None else g
        for (k, p), g in zip(leaves.items(), found, strict=True)
    }


def _rate(lr: Rate | Mapping[str, Rate], name: str) -> Rate:
    return lr[name] if isinstance(lr, Mapping) else lr


def sgd_step(params: Params, grads: Params, lr: Rate | Mapping[str, Rate]) -> Params:
    """One gradient-descent step ``p - lr * g``; ``lr`` is a number or a dict of per-tensor rates.

    Example:
        >>> sgd_step({"w": torch.tensor(1.0)}, {"w": torch.tensor(2.0)}, 0.25)["w"].item()
        0.5
    """
    return {k: p - _rate(lr, k) * grads[k] for k, p in params.items()}


def inner_loop(
    loss_at: LossAt,
    params: Params,
    *,
    steps: int,
    lr: LearningRate,
    first_order: bool = False,
) -> Params:
    """``steps`` of gradient descent on ``loss_at(params, step)``, returning new parameters.

    ``lr`` may be a number, a dict of per-tensor (or elementwise) rates, or a function of the
    step returning either. The result stays a differentiable function of ``params`` and of any
    learned rates, so an outer ``backward()`` gives the second-order meta-gradient; under
    ``torch.no_grad()`` (test-time adaptation) no outer graph is built at all.

    Example:
        >>> w = {"w": torch.tensor(0.0, requires_grad=True)}
        >>> fast = inner_loop(lambda p, s: (p["w"] - 1.0) ** 2, w, steps=2, lr=0.25)
        >>> round(fast["w"].item(), 4)  # 0 -> 0.5 -> 0.75
        0.75
    """
    for step in range(steps):
        grads = inner_gradients(loss_at, params, step, first_order)
        rates = lr(step) if callable(lr) else lr
        params = sgd_step(params, grads, rates)
    return params


def recomputed_inner_loop(
    loss_at: LossAt,
    params: Params,
    *,
    steps: int,
    lr: LearningRate,
    fixed_at: Callable[[int], Params],
) -> Params:
    """:func:`inner_loop`, second order, holding no step's graph between forward and backward.

    Each step keeps only its inputs; the backward recomputes the step's support pass with
    ``create_graph`` and takes the vector-Hessian product it needs from it, one step at a
    time. Peak memory is one step's double-backward graph instead of ``steps`` of them, for
    one more support pass (forward and backward) per step. The meta-gradient is the same as
    :func:`inner_loop`'s (tested in float64).

    ``loss_at(tensors, step)`` must read every tensor it differentiates through from
    ``tensors``: the adapted ``params`` merged with ``fixed_at(step)``, the other tensors of
    the step that need a gradient (meta-learned but not adapted: MAML++'s per-step BatchNorm
    affine, a frozen layer). A tensor it closes over instead would get no gradient. Learned
    rates (tensors in ``lr``) get theirs. Differentiable once: the meta-gradient itself has
    no graph.

    Example:
        >>> w = {"w": torch.tensor(0.0, requires_grad=True)}
        >>> loss_at = lambda p, s: (p["w"] - 1.0) ** 2
        >>> fast = recomputed_inner_loop(loss_at, w, steps=2, lr=0.25, fixed_at=lambda s: {})
        >>> round(fast["w"].item(), 4), round(torch.autograd.grad(fast["w"], w["w"])[0].item(), 4)
        (0.75, 0.25)
    """
    names = list(params)
    for step in range(steps):
        rates = lr(step) if callable(lr) else lr
        fixed = fixed_at(step)
        layout = _StepLayout(loss_at, step, names, list(fixed), [_rate(rates, n) for n in names])
        tensor_rates = [r for r in layout.rates if isinstance(r, Tensor)]
        new = _RecomputedStep.apply(layout, *params.values(), *fixed.values(), *tensor_rates)
        params = dict(zip(names, new, strict=True))
    return params


class _StepLayout(NamedTuple):
    """What :class:`_RecomputedStep` needs besides its tensors, and how they are laid out:
    ``params`` then ``fixed`` then the rates that are tensors, in ``rates`` order."""

    loss_at: LossAt
    step: int
    names: list[str]
    fixed_names: list[str]
    rates: list[Rate]

    def split(self, tensors: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor], list[Rate]]:
        count, fixed = len(self.names), len(self.fixed_names)
        params, rest = list(tensors[:count]), iter(tensors[count + fixed :])
        rates = [next(rest) if isinstance(r, Tensor) else r for r in self.rates]
        return params, list(tensors[count : count + fixed]), rates

    def loss(self, params: Sequence[Tensor], fixed: Sequence[Tensor]) -> Tensor:
        tensors = dict(zip(self.names, params, strict=True))
        tensors.update(zip(self.fixed_names, fixed, strict=True))
        return self.loss_at(tensors, self.step)


class _RecomputedStep(torch.autograd.Function):
    """``p - rate * ∂loss/∂p`` whose backward recomputes the step (:func:`recomputed_inner_loop`)."""

    @staticmethod
    def forward(ctx: Any, layout: _StepLayout, *tensors: Tensor) -> tuple[Tensor, ...]:
        params, fixed, rates = layout.split(tensors)
        ctx.replay = _Replay(params[0].device)
        with torch.enable_grad():  # a first-order gradient: no graph kept past this line
            leaves = [p.detach().requires_grad_() for p in params]
            loss = layout.loss(leaves, [f.detach() for f in fixed])
            grads = torch.autograd.grad(loss, leaves, allow_unused=True)
        ctx.layout = layout
        ctx.save_for_backward(*tensors)
        return tuple(
            p.clone() if g is None else p - _detached(r) * g
            for p, g, r in zip(params, grads, rates, strict=True)
        )

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, *grad_new: Tensor | None) -> tuple[Tensor | None, ...]:
        layout: _StepLayout = ctx.layout
        params, fixed, rates = layout.split(ctx.saved_tensors)
        vs = [
            torch.zeros_like(p) if v is None else v for p, v in zip(params, grad_new, strict=True)
        ]
        with torch.enable_grad(), ctx.replay():
            leaves = [p.detach().requires_grad_() for p in params]
            wanted = ctx.needs_input_grad[1 + len(params) : 1 + len(params) + len(fixed)]
            fixed_leaves = [
                f.detach().requires_grad_(w) for f, w in zip(fixed, wanted, strict=True)
            ]
            loss = layout.loss(leaves, fixed_leaves)
            grads = torch.autograd.grad(loss, leaves, create_graph=True, allow_unused=True)
            # new = p - r * g(p, fixed): d<v, new>/dp = v - ∂<r v, g>/∂p, d/dfixed = -∂<r v, g>/∂fixed
            used = [
                (g, _detached(r) * v)
                for g, r, v in zip(grads, rates, vs, strict=True)
                if g is not None
            ]
            inner = sum(((g * rv).sum() for g, rv in used), torch.zeros((), device=vs[0].device))
            targets = leaves + [f for f in fixed_leaves if f.requires_grad]
            found: Sequence[Tensor | None] = (
                torch.autograd.grad(inner, targets, allow_unused=True)
                if inner.requires_grad
                else [None] * len(targets)
            )
        d_params = [v if c is None else v - c for v, c in zip(vs, found[: len(vs)], strict=True)]
        of_fixed = iter(found[len(vs) :])
        d_fixed = [
            (None if (c := next(of_fixed)) is None else -c) if f.requires_grad else None
            for f in fixed_leaves
        ]
        d_rates = [
            None if g is None else -(v * g.detach()).sum_to_size(r.shape)
            for g, v, r in zip(grads, vs, rates, strict=True)
            if isinstance(r, Tensor)
        ]
        return (None, *d_params, *d_fixed, *d_rates)


class _Replay:
    """The autocast mode and random state a step's forward ran under, to recompute it under
    the same in the backward (as ``torch.utils.checkpoint`` does): the same precision and the
    same dropout masks."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        kind = device.type
        self.autocast = (torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind))
        self.cpu_rng = torch.get_rng_state()
        self.cuda_rng = torch.cuda.get_rng_state(device) if kind == "cuda" else None

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        enabled, dtype = self.autocast
        with torch.random.fork_rng(devices=[self.device] if self.cuda_rng is not None else []):
            torch.set_rng_state(self.cpu_rng)
            if self.cuda_rng is not None:
                torch.cuda.set_rng_state(self.cuda_rng, self.device)
            with torch.autocast(self.device.type, dtype=dtype, enabled=enabled):
                yield


def _detached(rate: Rate) -> Rate:
    return rate.detach() if isinstance(rate, Tensor) else rate


class AdamState(NamedTuple):
    """Adam's state: the step count and the first and second moment estimates."""

    step: int
    mu: Params
    nu: Params


def adam_init(params: Params) -> AdamState:
    """Zero Adam state for ``params``.

    Example:
        >>> adam_init({"w": torch.ones(2)}).mu["w"].tolist()
        [0.0, 0.0]
    """
    zeros = {k: torch.zeros_like(p) for k, p in params.items()}
    return AdamState(0, zeros, dict(zeros))


def adam_step(
    params: Params,
    grads: Params,
    state: AdamState,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> tuple[Params, AdamState]:
    """One Adam step (Kingma & Ba 2015, with bias correction); returns new params and state.

    Example:
        >>> p, s = adam_step({"w": torch.tensor(1.0)}, {"w": torch.tensor(5.0)},
        ...                  adam_init({"w": torch.tensor(1.0)}), lr=0.1)
        >>> round(p["w"].item(), 4), s.step  # the first Adam step moves by lr
        (0.9, 1)
    """
    b1, b2 = betas
    count = state.step + 1
    mu = {k: b1 * state.mu[k] + (1 - b1) * g for k, g in grads.items()}
    nu = {k: b2 * state.nu[k] + (1 - b2) * g * g for k, g in grads.items()}
    c1, c2 = 1 - b1**count, 1 - b2**count
    new = {k: p - lr * (mu[k] / c1) / ((nu[k] / c2).sqrt() + eps) for k, p in params.items()}
    return new, AdamState(count, mu, nu)


def map_tasks(fn: Callable[..., Any], tensors: Sequence[Tensor], vectorize: str) -> Any:
    """Apply ``fn`` to each task's slice of ``tensors`` (dim 0) and stack the results.

    ``vectorize="vmap"`` runs all tasks at once with :func:`torch.func.vmap`; ``"loop"`` calls
    ``fn`` once per task. ``fn`` returns a tensor or a pytree (tuple, dict) of tensors; the
    result has the same structure with a leading task dimension.

    Example:
        >>> xs = torch.arange(6.0).view(3, 2)
        >>> map_tasks(lambda x: (x.sum(), x * 2), [xs], "vmap")[0].tolist()
        [1.0, 5.0, 9.0]
    """
    if vectorize == "vmap":
        return vmap(fn, randomness="different")(*tensors)
    if vectorize != "loop":
        raise UserError(f"vectorize must be 'vmap' or 'loop' here, got {vectorize!r}")
    outputs = [fn(*(t[i] for t in tensors)) for i in range(tensors[0].shape[0])]
    flat, spec = zip(*(pytree.tree_flatten(o) for o in outputs), strict=True)
    stacked = [torch.stack(column) for column in zip(*flat, strict=True)]
    return pytree.tree_unflatten(stacked, spec[0])


class VectorizeChooser:
    """Chooses ``vmap`` or ``loop`` for a meta-learner by timing whole training iterations.

    With ``mode="auto"``, :meth:`next_mode` hands out ``loop, vmap`` once as warm-up and then
    alternates ``trials`` times; each iteration is timed from one call to the next, so the
    outer backward pass and the optimizer step are included. The faster median wins, is kept for
    the rest of the run, is logged on ``metaml.functional``, and is readable as :attr:`choice`.
    ``"vmap"`` / ``"loop"`` fix the mode; a model that is not :func:`vmap_safe` always loops.

    Example:
        >>> chooser = VectorizeChooser("auto", trials=1)
        >>> [chooser.next_mode() for _ in range(5)]
        ['loop', 'vmap', 'loop', 'vmap', 'loop']
        >>> chooser.choice in ("vmap", "loop")
        True
    """

    def __init__(self, mode: Vectorize = "auto", trials: int = 3, can_vmap: bool = True) -> None:
        if mode not in ("auto", "vmap", "loop"):
            raise UserError(f"vectorize must be 'auto', 'vmap' or 'loop', got {mode!r}")
        if mode == "vmap" and not can_vmap:
            raise UserError(
                "vectorize='vmap' needs BatchNorm layers of type torch.nn.BatchNorm1d/2d/3d "
                "(or the metaml.nn ones); use vectorize='loop' or 'auto'"
            )
        self.mode = mode
        self.choice: str | None = None if mode == "auto" else mode
        if mode == "auto" and not can_vmap:
            self.choice = "loop"
        self.seconds: dict[str, list[float]] = {"vmap": [], "loop": []}
        self._schedule = ["loop", "vmap"] * (trials + 1)
        self._calls = 0
        self._last: tuple[str, float] | None = None

    def next_mode(self) -> str:
        """The mode for this iteration (and the end of the timing of the previous one)."""
        if self.choice is not None:
            return self.choice
        now = time.perf_counter()
        if self._last is not None and self._calls > 2:  # the first loop/vmap pair is warm-up
            self.seconds[self._last[0]].append(now - self._last[1])
        if self._calls < len(self._schedule):
            mode = self._schedule[self._calls]
            self._calls += 1
            self._last = (mode, now)
            return mode
        self.choice = self._decide()
        return self.choice

    def _decide(self) -> str:
        vmap_s, loop_s = (statistics.median(self.seconds[m]) for m in ("vmap", "loop"))
        choice = "vmap" if vmap_s < loop_s else "loop"
        log.info(
            "vectorize=auto chose %s (median seconds per iteration: vmap %.4f, loop %.4f)",
            choice,
            vmap_s,
            loop_s,
        )
        return choice


_BATCH_STATS_CLASSES: dict[type[nn.Module], type[nn.modules.batchnorm._BatchNorm]] = {
    nn.BatchNorm1d: BatchNorm1d,
    nn.BatchNorm2d: BatchNorm2d,
    nn.BatchNorm3d: BatchNorm3d,
}


def use_batch_statistics_(model: nn.Module) -> nn.Module:
    """Make every BatchNorm of ``model`` normalise with the current batch's statistics, in place.

    Running statistics are dropped (``track_running_stats=False``), as the original MAML does:
    train and test batches are both normalised with their own mean and variance. Plain
    ``nn.BatchNorm1d/2d/3d`` become the ``metaml.nn`` subclasses (same parameters and state dict)
    whose forward is correct under ``vmap`` to second order. Returns ``model``.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.BatchNorm1d(3))
        >>> _ = use_batch_statistics_(net)
        >>> net[1].track_running_stats, net[1].running_mean, type(net[1]).__module__
        (False, None, 'metaml.nn.backbones')
    """
    for module in model.modules():
        if not isinstance(module, nn.modules.batchnorm._BatchNorm):
            continue
        if module.track_running_stats:
            module.track_running_stats = False
            module.register_buffer("running_mean", None)
            module.register_buffer("running_var", None)
            module.register_buffer("num_batches_tracked", None)
        # Same attributes and state, only forward differs, so swapping the class is safe.
        replacement = _BATCH_STATS_CLASSES.get(type(module))
        if replacement is not None:
            module.__class__ = replacement
    return model


def vmap_safe(model: nn.Module) -> bool:
    """Whether ``model``'s normalisation layers give correct meta-gradients under ``vmap``.

    Example:
        >>> vmap_safe(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2)))
        False
        >>> vmap_safe(use_batch_statistics_(torch.nn.Sequential(torch.nn.BatchNorm1d(2))))
        True
    """
    safe = (BatchNorm1d, BatchNorm2d, BatchNorm3d)
    for module in model.modules():
        is_norm = isinstance(module, nn.modules.batchnorm._BatchNorm)
        if is_norm and (not isinstance(module, safe) or module.running_mean is not None):
            return False
    return True
