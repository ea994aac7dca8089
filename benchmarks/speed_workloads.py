"""The workloads of the speed suite, each with metaml and its reference implementations.

Every implementation is an object with ``step()`` doing one unit of work (one meta-iteration
including the optimizer update, or one evaluation pass) on fixed, pre-drawn inputs, so that
sampling is not timed unless it is the workload. The references are written as their users
write them:

* ``higher``: ``innerloop_ctx`` per task and ``loss.backward()`` per task, as in higher's own
  MAML example (the graph of one task is alive at a time);
* ``plain``: a hand-written PyTorch loop over tasks, ``torch.autograd.grad(create_graph=...)``
  on a parameter list and a functional forward pass, also with a backward per task;
* ``learn2learn``: ``MAML.clone()`` / ``adapt`` per task, only when the package imports.

Run through :mod:`benchmarks.run`; nothing here is imported by the package.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metaml.algorithms.gbml import MAML
from metaml.algorithms.protonet import ProtoNet
from metaml.nn import channels_last_input, create_backbone
from metaml.tasks import TaskBatch

Step = Callable[[], Any]


@dataclass
class Conv4Spec:
    """One MAML conv4 setting of workload (b)."""

    steps: int = 1
    first_order: bool = False
    ways: int = 5
    shots: int = 1
    queries: int = 15
    meta_batch: int = 16
    inner_lr: float = 0.4
    hidden: int = 64


def random_batch(spec: Conv4Spec, seed: int = 0) -> TaskBatch:
    """A 5-way 1-shot-shaped batch of random 28x28 images (speed does not depend on content).

    Example:
        >>> random_batch(Conv4Spec(meta_batch=2)).query_x.shape
        torch.Size([2, 75, 1, 28, 28])
    """
    g = torch.Generator().manual_seed(seed)
    b, n, k, q = spec.meta_batch, spec.ways, spec.shots, spec.queries
    return TaskBatch(
        torch.rand(b, n * k, 1, 28, 28, generator=g),
        torch.arange(n).repeat_interleave(k).repeat(b, 1),
        torch.rand(b, n * q, 1, 28, 28, generator=g),
        torch.arange(n).repeat_interleave(q).repeat(b, 1),
    )


def conv4_model(spec: Conv4Spec, seed: int = 0) -> nn.Module:
    """The MAML conv4 (BatchNorm with batch statistics), seeded."""
    torch.manual_seed(seed)
    return create_backbone(
        "conv4", in_shape=(1, 28, 28), num_outputs=spec.ways, hidden=spec.hidden,
        track_running_stats=False,
    )  # fmt: skip


def textbook_conv4(model: nn.Module) -> nn.Module:
    """The conv4 a higher or learn2learn user writes (torch's own layers, ReLU then max-pool),
    holding a copy of ``model``'s parameters. metaml's conv4 pools before its ReLU (the same
    function, less work), which a reference written by its users would not do.

    Example:
        >>> net = conv4_model(Conv4Spec())
        >>> x = torch.rand(5, 1, 28, 28)
        >>> torch.allclose(textbook_conv4(net)(x), net(x), atol=1e-5)
        True
    """
    layers: list[nn.Module] = []
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for conv, norm in zip(convs, norms, strict=True):
        bn = nn.BatchNorm2d(norm.num_features, track_running_stats=False)
        bn.load_state_dict(norm.state_dict(), strict=False)
        layers += [copy.deepcopy(conv), bn, nn.ReLU(), nn.MaxPool2d(2)]
    head = model.get_submodule("head")
    return nn.Sequential(*layers, nn.Flatten(), copy.deepcopy(head))


# ---- the functional conv4 of the plain loop ------------------------------------------------


def conv4_forward(params: list[Tensor], x: Tensor) -> Tensor:
    """conv4 at a list of parameters (conv w, b, bn w, b per block, then head w, b).

    Example:
        >>> net = conv4_model(Conv4Spec())
        >>> p = list(net.parameters())
        >>> x = torch.rand(5, 1, 28, 28)
        >>> torch.allclose(conv4_forward(p, x), net(x), atol=1e-5)
        True
    """
    for block in range(4):
        w, b, gamma, beta = params[4 * block : 4 * block + 4]
        x = F.conv2d(x, w, b, padding=1)
        x = F.batch_norm(x, None, None, gamma, beta, training=True)
        x = F.max_pool2d(F.relu(x), 2)
    return F.linear(x.flatten(1), params[16], params[17])


def _meta_step(optimizer: torch.optim.Optimizer, body: Callable[[], None]) -> Step:
    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        body()
        optimizer.step()

    return step


# ---- MAML implementations (shared by workloads a and b) -------------------------------------


def metaml_maml(
    model: nn.Module,
    batch: TaskBatch,
    task_type: str,
    inner_lr: float,
    steps: int,
    first_order: bool,
    vectorize: str,
    precision: str = "fp32",
    low_memory: bool = False,
    compile: bool = False,
    task_threads: int = 1,
) -> Step:
    """One metaml meta-iteration: ``meta_loss``, ``backward``, Adam."""
    learner = MAML(
        model, task_type=task_type, inner_lr=inner_lr, inner_steps=steps,  # type: ignore[arg-type]
        first_order=first_order, vectorize=vectorize, low_memory=low_memory,  # type: ignore[arg-type]
        compile=compile, task_threads=task_threads,
    )  # fmt: skip
    optimizer = torch.optim.Adam(learner.parameters(), lr=1e-3)

    def body() -> None:
        if precision == "bf16":
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss, _ = learner.meta_loss(batch)
        else:
            loss, _ = learner.meta_loss(batch)
        loss.backward()

    return _meta_step(optimizer, body)


def _loss(task_type: str, out: Tensor, y: Tensor) -> Tensor:
    if task_type == "classification":
        return F.cross_entropy(out, y)
    return F.mse_loss(out, y)


def higher_maml(
    model: nn.Module,
    batch: TaskBatch,
    task_type: str,
    inner_lr: float,
    steps: int,
    first_order: bool,
) -> Step:
    """higher's MAML example: innerloop_ctx and a backward per task."""
    import higher

    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    inner = torch.optim.SGD(model.parameters(), lr=inner_lr)
    tasks = len(batch)

    def body() -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for i in range(tasks):
                with higher.innerloop_ctx(
                    model, inner, copy_initial_weights=False, track_higher_grads=not first_order
                ) as (fmodel, diffopt):
                    for _ in range(steps):
                        diffopt.step(
                            _loss(task_type, fmodel(batch.support_x[i]), batch.support_y[i])
                        )
                    query = _loss(task_type, fmodel(batch.query_x[i]), batch.query_y[i])
                    (query / tasks).backward()

    return _meta_step(optimizer, body)


def plain_maml(
    model: nn.Module,
    batch: TaskBatch,
    task_type: str,
    inner_lr: float,
    steps: int,
    first_order: bool,
    forward: Callable[[list[Tensor], Tensor], Tensor],
) -> Step:
    """A hand-written loop: autograd.grad per inner step and a backward per task.

    First order: the inner steps run on detached copies and the query gradient at the adapted
    parameters is added to the meta-gradient by hand.
    """
    params = list(model.parameters())
    optimizer = torch.optim.Adam(params, lr=1e-3)
    tasks = len(batch)

    def body() -> None:
        for i in range(tasks):
            fast = [p.detach().requires_grad_() for p in params] if first_order else params
            for _ in range(steps):
                loss = _loss(task_type, forward(fast, batch.support_x[i]), batch.support_y[i])
                grads = torch.autograd.grad(loss, fast, create_graph=not first_order)
                fast = [p - inner_lr * g for p, g in zip(fast, grads, strict=True)]
                if first_order:
                    fast = [p.detach().requires_grad_() for p in fast]
            query = _loss(task_type, forward(fast, batch.query_x[i]), batch.query_y[i]) / tasks
            if first_order:
                for p, g in zip(params, torch.autograd.grad(query, fast), strict=True):
                    p.grad = g if p.grad is None else p.grad + g
            else:
                query.backward()

    return _meta_step(optimizer, body)


def learn2learn_maml(
    model: nn.Module,
    batch: TaskBatch,
    task_type: str,
    inner_lr: float,
    steps: int,
    first_order: bool,
) -> Step:
    """learn2learn's MAML wrapper (clone / adapt per task)."""
    import learn2learn as l2l  # type: ignore[import-not-found]

    maml = l2l.algorithms.MAML(model, lr=inner_lr, first_order=first_order)
    optimizer = torch.optim.Adam(maml.parameters(), lr=1e-3)
    tasks = len(batch)

    def body() -> None:
        for i in range(tasks):
            learner = maml.clone()
            for _ in range(steps):
                learner.adapt(_loss(task_type, learner(batch.support_x[i]), batch.support_y[i]))
            (_loss(task_type, learner(batch.query_x[i]), batch.query_y[i]) / tasks).backward()

    return _meta_step(optimizer, body)


def learn2learn_available() -> bool:
    """Whether learn2learn imports here (it is never a dependency)."""
    try:
        import learn2learn  # type: ignore[import-not-found]  # noqa: F401
    except Exception:
        return False
    return True


def conv4_impls(
    spec: Conv4Spec, batch: TaskBatch, bf16: bool = True, vmap: bool = True, low_memory: bool = True
) -> dict[str, Step]:
    """All implementations of one conv4 MAML setting, each on its own copy of one model."""
    base = conv4_model(spec)
    args = ("classification", spec.inner_lr, spec.steps, spec.first_order)
    impls: dict[str, Step] = {
        "metaml-loop": metaml_maml(copy.deepcopy(base), batch, *args, vectorize="loop"),
        "higher": higher_maml(textbook_conv4(base), batch, *args),
        "plain": plain_maml(copy.deepcopy(base), batch, *args, forward=conv4_forward),
    }
    if vmap:
        impls["metaml-vmap"] = metaml_maml(copy.deepcopy(base), batch, *args, vectorize="vmap")
    if low_memory:
        impls["metaml-lowmem"] = metaml_maml(
            copy.deepcopy(base), batch, *args, vectorize="loop", low_memory=True
        )
    if bf16:
        impls["metaml-loop-bf16"] = metaml_maml(
            copy.deepcopy(base), batch, *args, vectorize="loop", precision="bf16"
        )
    if learn2learn_available():
        impls["learn2learn"] = learn2learn_maml(textbook_conv4(base), batch, *args)
    return impls


def query_pass_floor(model: nn.Module, batch: TaskBatch) -> Step:
    """Less than any MAML meta-iteration does: one task's query pass, forward and backward,
    with no inner loop and no optimizer, in the model's leanest layout (channels-last, the
    fused kernel on the CPU). Its peak memory is a floor under every implementation's (the
    suite's ``floor`` row).

    Example:
        >>> spec = Conv4Spec(meta_batch=1, hidden=8, queries=2)
        >>> query_pass_floor(conv4_model(spec), random_batch(spec))()
    """

    images = channels_last_input(model, batch.query_x[0])

    def step() -> None:
        _loss("classification", model(images), batch.query_y[0]).backward()

    return step


def on_threads(threads: int, step: Step) -> Step:
    """``step`` with torch's intra-op thread count set to ``threads`` for each call.

    Example:
        >>> count = torch.get_num_threads()  # set again to itself: later doctests keep it
        >>> on_threads(count, torch.get_num_threads)() == count
        True
    """

    def run() -> Any:
        torch.set_num_threads(threads)
        return step()

    return run


def conv4_impls_all_cores(
    spec: Conv4Spec, batch: TaskBatch, cores: int, bf16: bool = False
) -> dict[str, Step]:
    """One conv4 MAML setting with the whole CPU: metaml's tasks on ``cores`` task threads of
    one intra-op thread each, beside metaml's plain loop and the references on ``cores``
    intra-op threads (torch's default) and on one (``-1thread``; the faster for these shapes
    here), so each reference is also measured in its own best setting. ``bf16`` adds metaml's
    task threads under bf16 autocast.

    Example:
        >>> spec = Conv4Spec(meta_batch=2, hidden=8, queries=2)
        >>> sorted(conv4_impls_all_cores(spec, random_batch(spec), cores=2))[:2]
        ['higher', 'higher-1thread']
    """
    base = conv4_model(spec)
    args = ("classification", spec.inner_lr, spec.steps, spec.first_order)
    tasks = metaml_maml(copy.deepcopy(base), batch, *args, vectorize="loop", task_threads=cores)
    impls = {
        "metaml-taskthreads": on_threads(1, tasks),
        "metaml-loop": on_threads(
            cores, metaml_maml(copy.deepcopy(base), batch, *args, vectorize="loop")
        ),
    }
    if bf16:
        impls["metaml-taskthreads-bf16"] = on_threads(
            1,
            metaml_maml(
                copy.deepcopy(base), batch, *args, vectorize="loop", task_threads=cores,
                precision="bf16",
            ),
        )  # fmt: skip
    for threads, suffix in ((cores, ""), (1, "-1thread")):
        impls[f"higher{suffix}"] = on_threads(
            threads, higher_maml(textbook_conv4(base), batch, *args)
        )
        impls[f"plain{suffix}"] = on_threads(
            threads, plain_maml(copy.deepcopy(base), batch, *args, forward=conv4_forward)
        )
    return impls


# ---- workload (a): sinusoid ------------------------------------------------------------------


def sinusoid_batch(meta_batch: int = 25, shots: int = 10, seed: int = 0) -> TaskBatch:
    """A meta-batch of sinusoid tasks, K support and K query points each."""
    from metaml.data import Sinusoid
    from metaml.tasks import EpisodeSampler

    sampler = EpisodeSampler(
        Sinusoid(), shots=shots, queries=shots, meta_batch_size=meta_batch, seed=seed
    )
    return sampler.batch(0)


def mlp_forward(params: list[Tensor], x: Tensor) -> Tensor:
    """The 40-40 ReLU MLP at a parameter list (w1, b1, w2, b2, w_out, b_out)."""
    x = F.relu(F.linear(x, params[0], params[1]))
    x = F.relu(F.linear(x, params[2], params[3]))
    return F.linear(x, params[4], params[5])


def sinusoid_impls(batch: TaskBatch, compile: bool = True) -> dict[str, Step]:
    """metaml (vmap, loop, compiled vmap), higher, the plain loop (and learn2learn)."""
    torch.manual_seed(0)
    base = create_backbone("mlp", in_shape=(1,), num_outputs=1)
    assert len(list(base.parameters())) == 6, "expected the 40-40 MLP"
    args = ("regression", 0.01, 1, False)
    impls: dict[str, Step] = {
        "metaml-vmap": metaml_maml(copy.deepcopy(base), batch, *args, vectorize="vmap"),
        "metaml-loop": metaml_maml(copy.deepcopy(base), batch, *args, vectorize="loop"),
        "higher": higher_maml(copy.deepcopy(base), batch, *args),
        "plain": plain_maml(copy.deepcopy(base), batch, *args, forward=mlp_forward),
    }
    if compile:
        impls["metaml-vmap-compiled"] = metaml_maml(
            copy.deepcopy(base), batch, *args, vectorize="vmap", compile=True
        )
    if learn2learn_available():
        impls["learn2learn"] = learn2learn_maml(copy.deepcopy(base), batch, *args)
    return impls


# ---- workload (c): ProtoNet --------------------------------------------------------------------


def protonet_impl(ways: int = 20, shots: int = 1, queries: int = 15) -> tuple[Step, TaskBatch]:
    """One ProtoNet conv4 training episode (meta-batch 1): ``meta_loss``, backward, Adam."""
    spec = Conv4Spec(ways=ways, shots=shots, queries=queries, meta_batch=1)
    batch = random_batch(spec)
    torch.manual_seed(0)
    learner = ProtoNet(create_backbone("conv4", in_shape=(1, 28, 28), num_outputs=0))
    optimizer = torch.optim.Adam(learner.parameters(), lr=1e-3)

    def body() -> None:
        learner.meta_loss(batch)[0].backward()

    return _meta_step(optimizer, body), batch


# ---- workload (d): test-time adaptation ----------------------------------------------------------


def adaptation_impls(
    episodes: list[Any], steps: int = 10, hidden: int = 64, task_threads: int = 1
) -> dict[str, Step]:
    """Adapt to each episode with ``steps`` inner steps and score its queries.

    ``metaml``: :func:`metaml.evaluate.evaluate`'s per-episode ``adapt``; ``metaml-batched``:
    all episodes' adaptation at once with ``vmap`` (no graph); ``higher`` and ``plain``: per
    episode, without higher-order graphs. With ``task_threads > 1``, ``metaml-taskthreads``
    (episodes on task threads, as ``evaluate`` runs them) replaces ``metaml-batched``.
    """
    import higher

    from metaml.functional import functional_call, map_tasks
    from metaml.threads import map_in_threads

    spec = Conv4Spec(hidden=hidden)
    base = conv4_model(spec)
    learner = MAML(copy.deepcopy(base), inner_lr=0.4, inner_steps=1, vectorize="loop")
    learner.eval()

    def score(i: int) -> float:
        t = episodes[i]
        predict = learner.adapt(t.support_x, t.support_y, steps=steps)
        with torch.no_grad():
            return learner.score(predict(t.query_x), t.query_y)

    def run_metaml() -> float:
        return sum(map(score, range(len(episodes)))) / len(episodes)

    stacked = TaskBatch.stack(episodes)

    def run_batched() -> float:
        def one(sx: Tensor, sy: Tensor, qx: Tensor) -> Tensor:
            fast = learner.adapted_params(sx, sy, steps=steps)
            return functional_call(learner.model, fast, (qx,))

        chunks = []
        for start in range(0, len(stacked), 50):
            part = [t[start : start + 50] for t in (stacked.support_x, stacked.support_y)]
            outs = map_tasks(one, [*part, stacked.query_x[start : start + 50]], "vmap")
            chunks.append(outs.detach())
        outputs = torch.cat(chunks)
        return float((outputs.argmax(-1) == stacked.query_y).float().mean())

    model_h = textbook_conv4(base)
    inner = torch.optim.SGD(model_h.parameters(), lr=0.4)

    def run_higher() -> float:
        correct = 0.0
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for t in episodes:
                with higher.innerloop_ctx(model_h, inner, track_higher_grads=False) as (fm, opt):
                    for _ in range(steps):
                        opt.step(F.cross_entropy(fm(t.support_x), t.support_y))
                    with torch.no_grad():
                        out = fm(t.query_x)
                correct += float((out.argmax(-1) == t.query_y).float().mean())
        return correct / len(episodes)

    params = [p.detach() for p in base.parameters()]

    def run_plain() -> float:
        correct = 0.0
        for t in episodes:
            fast = [p.clone().requires_grad_() for p in params]
            for _ in range(steps):
                loss = F.cross_entropy(conv4_forward(fast, t.support_x), t.support_y)
                grads = torch.autograd.grad(loss, fast)
                fast = [
                    (p - 0.4 * g).detach().requires_grad_()
                    for p, g in zip(fast, grads, strict=True)
                ]
            with torch.no_grad():
                out = conv4_forward(fast, t.query_x)
            correct += float((out.argmax(-1) == t.query_y).float().mean())
        return correct / len(episodes)

    def run_metaml_threads() -> float:
        scores = map_in_threads(score, len(episodes), task_threads, learner.parameters())
        return sum(scores) / len(episodes)

    if task_threads > 1:  # the whole CPU: see adaptation_impls_all_cores
        return {"metaml-taskthreads": run_metaml_threads, "metaml": run_metaml,
                "higher": run_higher, "plain": run_plain}  # fmt: skip
    return {
        "metaml": run_metaml,
        "metaml-batched": run_batched,
        "higher": run_higher,
        "plain": run_plain,
    }


def adaptation_impls_all_cores(episodes: list[Any], cores: int, **kwargs: Any) -> dict[str, Step]:
    """:func:`adaptation_impls` with the whole CPU: metaml's episodes on ``cores`` task threads
    (what ``evaluate`` does with ``task_threads``) of one intra-op thread each, beside metaml's
    plain loop and the references on ``cores`` intra-op threads and on one (``-1thread``).

    Example:
        >>> # adaptation_impls_all_cores(episodes, cores=2, steps=10)["metaml-taskthreads"]()
    """
    impls = adaptation_impls(episodes, task_threads=cores, **kwargs)
    timed = {"metaml-taskthreads": on_threads(1, impls["metaml-taskthreads"])}
    for name in ("metaml", "higher", "plain"):
        timed[name] = on_threads(cores, impls[name])
    for name in ("higher", "plain"):
        timed[f"{name}-1thread"] = on_threads(1, impls[name])
    return timed
