"""Gradient-based meta-learners: MAML, FOMAML, Meta-SGD and ANIL.

All four are thin layers over one core (:class:`GradientBasedLearner`) built on
:mod:`metaml.functional`: a per-task function adapts *fast* parameters on the support set with
``inner_steps`` of gradient descent and returns the query loss at the adapted parameters; the
meta-batch is processed with ``vmap`` or a Python loop (``vectorize``), and the trainer's
``loss.backward()`` differentiates through the inner updates (second order unless
``first_order=True``).

Memory: while training, the loop path computes each task's meta-gradient as soon as its query
loss is known and frees its graph, so one task's graph (one per task thread) is alive at a time
instead of the whole meta-batch's; the meta-gradient is the same as ``vmap``'s (tested).
``low_memory=True`` always takes that path (never ``vmap``, whose batched graph holds every
task, nor ``compile``), and its second-order inner steps that run the backbone keep no graph:
each step keeps its inputs, and the backward recomputes it, one step at a time
(:func:`~metaml.functional.recomputed_inner_loop`). On 5-step conv4 MAML that takes the
tensors alive at the peak from 47 to 19 MiB, for one more support pass per step (docs/speed.md).

Task threads: ``task_threads=N`` computes N of the meta-batch's tasks at once on the loop
path while training (N > 1 always takes the loop, and excludes ``compile`` and ``vmap``), and
:func:`metaml.evaluate.evaluate` adapts N episodes at once, one per thread
(:mod:`metaml.threads`); the meta-gradient and the scores are those of one thread, summed in
task order. On a CPU give each task thread one core (a run does so unless its config sets
``threads``): conv4 MAML then trains about twice as fast on two cores as on one, where torch's
intra-op threads gain little on such small convolutions (docs/speed.md).

Compilation: ``compile=True`` runs the meta-batch (inner loop and query loss, with ``vmap`` or
the loop) through ``torch.compile``; the inner gradients are part of the compiled forward graph
and AOTAutograd differentiates it, so the meta-gradient stays second order (tested against eager).
The first call compiles (about a minute on a small CPU); it wins for small models where
per-op overhead dominates (the sinusoid MLP) — see docs/speed.md.

BatchNorm: every BatchNorm of the model is switched to batch statistics
(``track_running_stats=False``), as in the original MAML. In meta-training, the support
forward passes are normalised with the support set's statistics and the query pass with the query
set's. At test time it is the same: the inner steps use the support set's statistics and the
predictor normalises each batch of queries it is given with that batch's own statistics
(transductive over the query batch; pass all of a task's queries together, as the evaluation loop
does). ``per_step_bn=True`` (MAML++) gives every inner step its own BatchNorm weight and bias
(meta-learned, not adapted in the inner loop); the query pass uses the set of the last step.

Example:
    >>> from metaml.nn import create_backbone
    >>> from metaml.tasks import TaskBatch
    >>> net = create_backbone("mlp", in_shape=(1,), num_outputs=1)
    >>> maml = MAML(net, task_type="regression", inner_lr=0.01, inner_steps=1)
    >>> batch = TaskBatch(torch.randn(4, 5, 1), torch.randn(4, 5, 1), torch.randn(4, 10, 1),
    ...                   torch.randn(4, 10, 1))
    >>> loss, metrics = maml.meta_loss(batch)
    >>> loss.backward(); sorted(metrics)
    ['loss', 'mse']
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metaml.algorithms.base import MetaLearner, Predictor, TaskType, task_score
from metaml.errors import UserError
from metaml.functional import (
    Params,
    Rate,
    Vectorize,
    VectorizeChooser,
    inner_loop,
    map_tasks,
    recomputed_inner_loop,
    use_batch_statistics_,
    vmap_safe,
)
from metaml.nn.backbones import channels_last_input
from metaml.tasks import TaskBatch
from metaml.threads import call_module, check_task_threads, map_in_threads

__all__ = ["ANIL", "FOMAML", "MAML", "GradientBasedLearner", "MetaSGD", "task_loss"]


def task_loss(task_type: TaskType, outputs: Tensor, targets: Tensor) -> Tensor:
    """Cross-entropy (classification) or mean squared error (regression), as a scalar tensor.

    Example:
        >>> task_loss("regression", torch.zeros(2, 1), torch.ones(2, 1)).item()
        1.0
    """
    if task_type == "classification":
        return F.cross_entropy(outputs, targets.long())
    return F.mse_loss(outputs, targets.reshape(outputs.shape))


def _key(name: str) -> str:
    return name.replace(".", "__")  # ParameterDict keys may not contain dots


class GradientBasedLearner(MetaLearner):
    """The shared core of MAML, FOMAML, Meta-SGD and ANIL (see the module docstring).

    Subclasses choose which parameters adapt (:meth:`_fast_names`), how inputs become the
    adapted part's inputs (:meth:`_embed`) and the shape of learned rates.

    Example:
        >>> from metaml.nn import create_backbone
        >>> learner = MAML(create_backbone("conv4", num_outputs=5), inner_steps=2)
        >>> predict = learner.adapt(torch.randn(5, 1, 28, 28), torch.arange(5))
        >>> predict(torch.randn(3, 1, 28, 28)).shape
        torch.Size([3, 5])
    """

    #: Meta-SGD learns one rate per parameter element; the others at most one per tensor.
    elementwise_lr: bool = False

    def __init__(
        self,
        model: nn.Module,
        task_type: TaskType = "classification",
        inner_lr: float = 0.01,
        inner_steps: int = 1,
        test_inner_steps: int | None = None,
        learn_inner_lr: bool = False,
        per_step_bn: bool = False,
        vectorize: Vectorize = "auto",
        first_order: bool = False,
        low_memory: bool = False,
        compile: bool = False,
        task_threads: int = 1,
    ) -> None:
        super().__init__()
        _check_args(task_type, inner_lr, inner_steps, test_inner_steps)
        self.task_threads = check_task_threads(task_threads, model)
        if self.task_threads > 1 and (compile or vectorize == "vmap"):
            raise UserError(
                "task_threads > 1 runs the meta-batch as a loop of tasks, one per thread; "
                "it excludes compile=True and vectorize='vmap' (set task_threads to 1 for those)"
            )
        self.model = use_batch_statistics_(model)
        self.task_type = task_type
        self.inner_lr = float(inner_lr)
        self.inner_steps = int(inner_steps)
        self.test_inner_steps = test_inner_steps
        self.learn_inner_lr = learn_inner_lr
        self.per_step_bn = per_step_bn
        self.first_order = first_order
        self.low_memory = low_memory
        self.use_compile = compile  # nn.Module.compile is a method
        self._compiled: dict[str, Callable[..., Any]] = {}
        self.chooser = VectorizeChooser(vectorize, can_vmap=vmap_safe(model))
        self.bn_steps = self._make_bn_steps() if per_step_bn else nn.ParameterDict()
        self.inner_lrs = self._make_inner_lrs()

    # -- what adapts, and how -------------------------------------------------------------

    def _bn_names(self) -> list[str]:
        """Names of the BatchNorm affine parameters of the model."""
        names = []
        for prefix, module in self.model.named_modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                names += [f"{prefix}.{n}" if prefix else n for n, _ in module.named_parameters()]
        return names

    def _fast_names(self) -> list[str]:
        """Names of the model parameters updated in the inner loop."""
        frozen = set(self._bn_names()) if self.per_step_bn else set()
        return [n for n, _ in self.model.named_parameters() if n not in frozen]

    def _embed(self, x: Tensor) -> Tensor:
        """The input of the adapted computation (ANIL: the backbone's features)."""
        return x

    # Whether the inner steps run the backbone (ANIL's adapt only the head), so that a
    # second-order step differentiates the backbone's support pass twice.
    _inner_steps_run_backbone = True

    def _inputs(self, x: Tensor) -> Tensor:
        """``x`` in the backbone's fastest layout (:func:`~metaml.nn.channels_last_input`)."""
        return channels_last_input(self.model, x)

    def _predict(self, fast: Params, x: Tensor, step: int) -> Tensor:
        """Model outputs at the fast parameters (plus step ``step``'s BatchNorm affine)."""
        return call_module(self.model, {**fast, **self._bn_at(step)}, x)

    def _make_bn_steps(self) -> nn.ParameterDict:
        # inner_steps + 1 sets: one per inner step, and one for the query pass.
        params = dict(self.model.named_parameters())
        shape = (self.inner_steps + 1,)
        return nn.ParameterDict(
            {
                _key(n): nn.Parameter(params[n].detach().expand(*shape, -1).clone())
                for n in self._bn_names()
            }
        )

    def _bn_at(self, step: int) -> Params:
        if not self.per_step_bn:
            return {}
        index = min(step, self.inner_steps)
        return {n: self.bn_steps[_key(n)][index] for n in self._bn_names()}

    def _make_inner_lrs(self) -> nn.ParameterDict:
        if not (self.learn_inner_lr or self.elementwise_lr):
            return nn.ParameterDict()
        params = dict(self.model.named_parameters())
        steps = max(self.inner_steps, 1) if self.learn_inner_lr else 1
        rates = {}
        for name in self._fast_names():
            shape = (steps, *params[name].shape) if self.elementwise_lr else (steps,)
            rates[_key(name)] = nn.Parameter(torch.full(shape, self.inner_lr))
        return nn.ParameterDict(rates)

    def _lr_at(self, step: int) -> Rate | dict[str, Rate]:
        if not len(self.inner_lrs):
            return self.inner_lr
        rates = {}
        for name in self._fast_names():
            table = self.inner_lrs[_key(name)]  # (steps, ...) ; later test steps reuse the last
            rates[name] = table[min(step, table.shape[0] - 1)]
        return rates

    # -- one task ---------------------------------------------------------------------------

    def _initial_fast(self) -> Params:
        params = dict(self.model.named_parameters())
        return {n: params[n] for n in self._fast_names()}

    def _adapt_fast(
        self, support_x: Tensor, support_y: Tensor, steps: int, first_order: bool
    ) -> Params:
        """Fast parameters after ``steps`` inner steps on embedded support inputs."""

        if self._recompute_steps(first_order):
            return self._adapt_fast_recomputed(support_x, support_y, steps)

        def loss_at(fast: Params, step: int) -> Tensor:
            return task_loss(self.task_type, self._predict(fast, support_x, step), support_y)

        return inner_loop(
            loss_at, self._initial_fast(), steps=steps, lr=self._lr_at, first_order=first_order
        )

    def _recompute_steps(self, first_order: bool) -> bool:
        """Whether the inner steps recompute their graphs in the backward (``low_memory``):
        while training second order, where the steps run the backbone (not ANIL's, whose
        steps' graphs are the head's, small)."""
        second_order = torch.is_grad_enabled() and not first_order
        return self.low_memory and second_order and self._inner_steps_run_backbone

    def _adapt_fast_recomputed(self, support_x: Tensor, support_y: Tensor, steps: int) -> Params:
        """:meth:`_adapt_fast` through :func:`~metaml.functional.recomputed_inner_loop`."""
        fast_names = set(self._fast_names())
        others = {n: p for n, p in self.model.named_parameters() if n not in fast_names}

        def loss_at(tensors: Params, step: int) -> Tensor:
            return task_loss(self.task_type, call_module(self.model, tensors, support_x), support_y)

        return recomputed_inner_loop(
            loss_at, self._initial_fast(), steps=steps, lr=self._lr_at,
            fixed_at=lambda step: {**others, **self._bn_at(step)},
        )  # fmt: skip

    def _task(self, sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor) -> tuple[Tensor, Tensor]:
        """One task: (query loss after adaptation, query outputs)."""
        sx, qx = self._inputs(sx), self._inputs(qx)
        fast = self._adapt_fast(self._embed(sx), sy, self.inner_steps, self.first_order)
        outputs = self._predict(fast, self._embed(qx), self.inner_steps)
        return task_loss(self.task_type, outputs, qy), outputs

    # -- the MetaLearner interface ------------------------------------------------------------

    exposes_query_outputs = True

    def meta_loss(self, batch: TaskBatch) -> tuple[Tensor, dict[str, float]]:
        """Mean query loss after adaptation over the batch, and ``{"loss", "acc" | "mse"}``.

        Example:
            >>> from metaml.nn import create_backbone
            >>> learner = MAML(create_backbone("mlp"), task_type="regression", vectorize="vmap")
            >>> b = TaskBatch(*(torch.randn(2, 5, 1) for _ in range(4)))
            >>> learner.meta_loss(b)[0].shape
            torch.Size([])
        """
        loss, metrics, _ = self.meta_loss_with_outputs(batch)
        return loss, metrics

    def meta_loss_with_outputs(self, batch: TaskBatch) -> tuple[Tensor, dict[str, float], Tensor]:
        """:meth:`meta_loss` and the query outputs ``(B, Q, outputs)`` at the adapted parameters, detached.

        Example:
            >>> from metaml.nn import create_backbone
            >>> learner = MAML(create_backbone("mlp"), task_type="regression")
            >>> b = TaskBatch(*(torch.randn(2, 5, 1) for _ in range(4)))
            >>> learner.meta_loss_with_outputs(b)[2].shape
            torch.Size([2, 5, 1])
        """
        per_task = self.low_memory or self.task_threads > 1
        mode = "loop" if per_task else self.chooser.next_mode()
        if mode == "loop" and torch.is_grad_enabled() and (per_task or not self.use_compile):
            # Each task's meta-gradient right away: one task's graph alive at a time (3.5x less
            # peak memory on 5-step conv4 MAML) and no slower than one backward at the end.
            return self._meta_loss_per_task(batch)
        tensors = [batch.support_x, batch.support_y, batch.query_x, batch.query_y]
        losses, outputs = self._tasks_fn(mode)(*tensors)  # (B,), (B, Q, outputs)
        loss = losses.mean()
        metric = "acc" if self.task_type == "classification" else "mse"
        score = task_score(self.task_type, outputs.flatten(0, 1), batch.query_y.flatten(0, 1))
        return loss, {"loss": loss.item(), metric: score}, outputs.detach()

    def _tasks_fn(self, mode: str) -> Callable[..., Any]:
        """``(sx, sy, qx, qy) -> (losses, outputs)`` for the meta-batch, compiled if asked."""

        def run(*tensors: Tensor) -> Any:
            return map_tasks(self._task, tensors, mode)

        if not self.use_compile:
            return run
        if mode not in self._compiled:  # one compiled function per mode (shapes are guarded)
            self._compiled[mode] = torch.compile(run)
        return self._compiled[mode]

    def _meta_loss_per_task(self, batch: TaskBatch) -> tuple[Tensor, dict[str, float], Tensor]:
        """``meta_loss`` with one task's graph alive at a time (the loop path while training).

        Each task's meta-gradient is computed right away with ``torch.autograd.grad`` and its
        graph freed, so one task's graph is alive at a time instead of the whole batch's (with
        ``task_threads``, one per thread, and the gradients of at most ``2 * task_threads``
        finished tasks waiting for their turn in the sum).
        (Recomputing the query pass with ``torch.utils.checkpoint`` saved no memory on top of
        that, since its activations and the inner loop's graph are alive together either way,
        and cost 30% of the time.) The returned loss has the mean query loss as its
        value and, as its gradient with respect to the learner's parameters, the summed
        per-task meta-gradients: ``loss.backward()`` in the trainer gives exactly the
        meta-gradient of the ordinary path (inputs get no gradient).
        """
        params = [p for p in self.parameters() if p.requires_grad]
        tasks = len(batch)

        def task_gradients(i: int) -> tuple[Tensor, Tensor, tuple[Tensor | None, ...]]:
            task = batch.task(i)
            loss, out = self._task(task.support_x, task.support_y, task.query_x, task.query_y)
            grads = torch.autograd.grad(loss / tasks, params, allow_unused=True)
            return loss.detach(), out.detach(), grads

        sums: list[Tensor] = [torch.zeros_like(p) for p in params]
        losses, outputs = [], []
        # In task order whatever thread computed them: the sums do not depend on task_threads.
        for loss, out, grads in map_in_threads(task_gradients, tasks, self.task_threads, params):
            for total, g in zip(sums, grads, strict=True):
                if g is not None:
                    total.add_(g)
            losses.append(loss)
            outputs.append(out)
        value = torch.stack(losses).mean()
        # value + (Σ p·g − Σ p·g detached): the value is exact, and d/dp is g.
        linear = sum(((p * g).sum() for p, g in zip(params, sums, strict=True)), torch.zeros(()))
        loss = value + (linear - linear.detach())
        metric = "acc" if self.task_type == "classification" else "mse"
        score = task_score(self.task_type, torch.cat(outputs), batch.query_y.flatten(0, 1))
        return loss, {"loss": value.item(), metric: score}, torch.stack(outputs)

    @property
    def vectorize_choice(self) -> str | None:
        """``"vmap"`` or ``"loop"`` once chosen (``None`` while ``vectorize="auto"`` is timing)."""
        return self.chooser.choice

    def _test_steps(self, steps: int | None) -> int:
        if steps is not None:
            return steps
        return self.inner_steps if self.test_inner_steps is None else self.test_inner_steps

    def adapted_params(
        self, support_x: Tensor, support_y: Tensor, steps: int | None = None
    ) -> Params:
        """All model parameters after adapting to one task (no graph; fixed ones unchanged).

        Example:
            >>> from metaml.nn import create_backbone
            >>> learner = ANIL(create_backbone("mlp"), task_type="regression")
            >>> p = learner.adapted_params(torch.randn(5, 1), torch.randn(5, 1))
            >>> torch.equal(p["features.0.weight"], learner.model.features[0].weight)
            True
        """
        fast = self._test_fast(support_x, support_y, self._test_steps(steps))
        return {n: fast.get(n, p).detach() for n, p in self.model.named_parameters()}

    def _test_fast(self, support_x: Tensor, support_y: Tensor, steps: int) -> Params:
        """The fast parameters after ``steps`` test-time inner steps, detached."""
        # torch.func.grad ignores an outer no_grad, so the inner steps still see their
        # gradients, while no graph back to the meta-parameters is recorded.
        with torch.no_grad():
            support_x = self._inputs(support_x)
            fast = self._adapt_fast(self._embed(support_x), support_y, steps, first_order=True)
        return {k: v.detach() for k, v in fast.items()}

    def adapt(self, support_x: Tensor, support_y: Tensor, steps: int | None = None) -> Predictor:
        """Adapt to one task; returns ``query_x -> outputs``.

        ``steps`` defaults to ``test_inner_steps`` (else ``inner_steps``). Works inside or outside
        ``torch.no_grad``; no graph to the meta-parameters is built. BatchNorm normalises the
        support set with its own statistics during the inner steps and each query batch given to
        the predictor with that batch's statistics.

        Example:
            >>> from metaml.nn import create_backbone
            >>> learner = MAML(create_backbone("mlp"), task_type="regression", inner_steps=1)
            >>> predict = learner.adapt(torch.randn(5, 1), torch.randn(5, 1), steps=10)
            >>> predict(torch.randn(7, 1)).shape
            torch.Size([7, 1])
        """
        steps = self._test_steps(steps)
        fast = self._test_fast(support_x, support_y, steps)

        def predict(query_x: Tensor) -> Tensor:
            return self._predict(fast, self._embed(self._inputs(query_x)), steps)

        return predict


def _check_args(
    task_type: str, inner_lr: float, inner_steps: int, test_inner_steps: int | None
) -> None:
    if task_type not in ("classification", "regression"):
        raise UserError(f"task_type must be 'classification' or 'regression', got {task_type!r}")
    if not inner_lr > 0:
        raise UserError(f"inner_lr must be > 0, got {inner_lr}")
    if inner_steps < 0 or (test_inner_steps is not None and test_inner_steps < 0):
        raise UserError(f"inner steps must be >= 0, got {inner_steps} and {test_inner_steps}")


class MAML(GradientBasedLearner):
    """Model-Agnostic Meta-Learning (Finn, Abbeel & Levine, ICML 2017).

    Inner loop, per task ``i`` on its support set: ``φ ← φ − α ∇_φ L_support_i(φ)`` for
    ``inner_steps`` steps from ``φ = θ``. Outer loss: ``mean_i L_query_i(φ_i(θ))``, differentiated
    through the inner steps (second order; ``first_order=True`` drops the second-order terms).
    MAML++ options (Antoniou et al., ICLR 2019): ``learn_inner_lr`` (LSLR, one learned rate per
    step and parameter tensor, initialised to ``inner_lr``) and ``per_step_bn``.

    Example:
        >>> from metaml.nn import create_backbone
        >>> maml = MAML(create_backbone("conv4", num_outputs=5), inner_lr=0.4, inner_steps=1,
        ...             test_inner_steps=10)
        >>> batch = TaskBatch(torch.randn(2, 5, 1, 28, 28), torch.arange(5).repeat(2, 1),
        ...                   torch.randn(2, 10, 1, 28, 28), torch.arange(5).repeat(2, 2))
        >>> loss, metrics = maml.meta_loss(batch)
        >>> loss.backward()
    """


class FOMAML(MAML):
    """First-order MAML (Finn et al. 2017, §5.2): MAML with the inner gradients detached.

    The meta-gradient is ``mean_i ∇_φ L_query_i(φ_i)`` evaluated at the adapted parameters,
    which is cheaper (no Hessian-vector products) and often nearly as good.

    Example:
        >>> from metaml.nn import create_backbone
        >>> FOMAML(create_backbone("mlp"), task_type="regression").first_order
        True
    """

    def __init__(self, model: nn.Module, **kwargs: Any) -> None:
        if kwargs.pop("first_order", True) is not True:
            raise UserError("FOMAML is first-order by definition; use MAML with first_order=False")
        super().__init__(model, first_order=True, **kwargs)


class MetaSGD(GradientBasedLearner):
    """Meta-SGD (Li, Zhou, Chen & Li, 2017): MAML with a learned learning rate per parameter.

    Inner update ``φ ← φ − α ⊙ ∇_φ L_support(φ)``, where ``α`` has the shape of ``φ``, starts at
    ``inner_lr`` and is meta-learned together with ``θ`` (``learner.inner_lrs``). With
    ``learn_inner_lr=True`` every inner step has its own ``α``.

    Example:
        >>> from metaml.nn import create_backbone
        >>> learner = MetaSGD(create_backbone("mlp", hidden=(8,)), task_type="regression")
        >>> learner.inner_lrs["head__weight"].shape  # (steps, *weight.shape)
        torch.Size([1, 1, 8])
    """

    elementwise_lr = True


class ANIL(GradientBasedLearner):
    """Almost No Inner Loop (Raghu, Raghu, Bengio & Vinyals, ICLR 2020).

    Only the head adapts: per task the backbone features ``f_θ(x)`` are computed once, then
    ``w ← w − α ∇_w L_support(head_w(f_θ(x)))``; the outer loss ``L_query(head_{w_i}(f_θ(x)))``
    is differentiated w.r.t. both the backbone ``θ`` and the head's initialisation. The model
    must have ``forward_features`` and ``head`` (every :mod:`metaml.nn` backbone does).

    Example:
        >>> from metaml.nn import create_backbone
        >>> anil = ANIL(create_backbone("conv4", num_outputs=5), inner_lr=0.1, inner_steps=5)
        >>> sorted(anil._fast_names())
        ['head.bias', 'head.weight']
    """

    def __init__(self, model: nn.Module, **kwargs: Any) -> None:
        if not hasattr(model, "forward_features") or not isinstance(
            getattr(model, "head", None), nn.Module
        ):
            raise UserError(
                "ANIL needs a model with forward_features and a head; use a metaml.nn backbone"
            )
        if kwargs.get("per_step_bn"):
            raise UserError(
                "per_step_bn has no effect with ANIL (the backbone does not adapt); set it to false"
            )
        super().__init__(model, **kwargs)

    _inner_steps_run_backbone = False

    def _fast_names(self) -> list[str]:
        return [n for n, _ in self.model.named_parameters() if n.startswith("head.")]

    def _embed(self, x: Tensor) -> Tensor:
        forward_features: Callable[[Tensor], Tensor] = self.model.forward_features  # type: ignore[assignment]
        return forward_features(x)

    def _predict(self, fast: Params, x: Tensor, step: int) -> Tensor:
        head = {n.removeprefix("head."): p for n, p in fast.items()}
        return call_module(self.model.head, head, x)  # type: ignore[arg-type]
