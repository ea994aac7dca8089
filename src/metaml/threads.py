"""Task threads: the tasks of a meta-batch computed concurrently, one per CPU core.

A meta-batch's tasks are independent until their meta-gradients are summed. On a CPU, one
task of a small network (conv4 on 28x28 images: 1-64 channels, maps down to 3x3) keeps one
core busy but gains little or loses from more intra-op threads, whose per-operation hand-offs
cost about what they save; two tasks on two threads run 1.6-2.1x as fast as one after the other
(docs/speed.md). PyTorch releases the GIL inside its kernels and runs a CPU backward on the
calling thread, so Python threads are enough.

Two things are per thread and handled here:

* ``torch.func.functional_call`` swaps the tensors of the module it calls while it runs, so
  two threads must not call one module: in a task thread :func:`call_module` calls a replica of
  it that owns no tensors, with every tensor of the real module passed in.
* grad and inference mode, autocast, the intra-op thread count and the CUDA device and stream
  are thread-local: :func:`map_in_threads` hands the caller's to its threads.

And one thing is shared: a leaf tensor's gradient accumulator, which torch creates the first
time an operation records the leaf, under a lock of the tensor's, and which torch 2.13 creates
needing the GIL. An operation records its inputs without the GIL, a custom autograd function
(metaml's fused kernel) with it, so two threads recording one fresh leaf at once can deadlock,
each holding what the other waits for. :func:`map_in_threads` creates the accumulators of the
``leaves`` it is given (the learner's parameters) before its threads start and keeps them until
its last result: a lookup of an existing one takes neither.

Results come back in task order, so sums over tasks are formed in the same order as in a plain
loop, whatever order the threads finish in.

Example:
    >>> net = torch.nn.Linear(2, 1)
    >>> x = torch.randn(4, 3, 2)
    >>> outputs = list(map_in_threads(lambda i: call_module(net, {}, x[i]), 4, threads=2))
    >>> all(torch.equal(o, net(x[i])) for i, o in enumerate(outputs))
    True
"""

from __future__ import annotations

import contextlib
import copy
import threading
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from itertools import islice
from typing import TypeVar

import torch
from torch import Tensor, nn
from torch.func import functional_call

from metaml.errors import UserError

__all__ = ["call_module", "check_task_threads", "map_in_threads"]

T = TypeVar("T")

_POOLS: dict[int, ThreadPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()
# In a task thread: ``in_task`` is set and ``replicas`` maps a module to its replica.
_LOCAL = threading.local()


def check_task_threads(task_threads: int, model: nn.Module) -> int:
    """``task_threads`` as an int, or a :class:`~metaml.UserError` saying what to change.

    A model with dropout is refused for more than one thread: its random draws would be taken
    in whatever order the threads run, so a seeded run would not reproduce.

    Example:
        >>> check_task_threads(2, torch.nn.Linear(2, 2))
        2
    """
    if int(task_threads) != task_threads or task_threads < 1:
        raise UserError(f"task_threads must be a whole number >= 1, got {task_threads!r}")
    if task_threads > 1 and any(
        isinstance(m, nn.modules.dropout._DropoutNd) for m in model.modules()
    ):
        raise UserError(
            "task_threads > 1 needs a model without dropout (its random draws would follow the "
            "threads' order and a seeded run would not reproduce); set task_threads to 1"
        )
    return int(task_threads)


def map_in_threads(
    fn: Callable[[int], T], count: int, threads: int, leaves: Iterable[Tensor] = ()
) -> Iterator[T]:
    """``fn(0), ..., fn(count - 1)`` on ``threads`` threads, yielded in that order.

    With ``threads=1``, or when called from a task thread (nested calls run there, in turn),
    this is ``map(fn, range(count))`` on the calling thread. Otherwise the calls run on a pool
    of ``threads`` threads kept for the process, under the caller's grad and inference modes,
    autocast, intra-op thread count and CUDA device and stream. At most ``2 * threads`` calls
    are handed out ahead of the one being yielded, so finished results do not pile up. An
    exception in a call is raised when its result is reached. ``leaves`` are the tensors that
    require grad which the calls share (a model's parameters): their gradient accumulators are
    made up front and kept while the calls run, since torch deadlocks when two threads make
    one at once (see the module's docstring).

    Example:
        >>> list(map_in_threads(lambda i: i * i, 4, threads=2))
        [0, 1, 4, 9]
    """
    if threads == 1 or getattr(_LOCAL, "in_task", False):
        return map(fn, range(count))
    enter_callers_modes = _callers_modes()
    accumulators = _grad_accumulators(leaves)

    def run(index: int) -> T:
        _LOCAL.in_task = True
        with enter_callers_modes():
            return fn(index)

    return _in_order(_pool(threads), run, count, ahead=2 * threads, keep=accumulators)


def _grad_accumulators(leaves: Iterable[Tensor]) -> list[Tensor]:
    """Views of each leaf that requires grad, which hold its gradient accumulator, made now.

    Held through a view's graph, not as a Python object: an accumulator with a Python object
    would need the GIL again at every lookup."""
    if torch.is_inference_mode_enabled():  # nothing is recorded: no accumulator is made
        return []
    with torch.enable_grad():
        return [t.view_as(t) for t in leaves if t.requires_grad and t.is_leaf]


def _in_order(
    pool: ThreadPoolExecutor,
    run: Callable[[int], T],
    count: int,
    ahead: int,
    keep: list[Tensor],
) -> Iterator[T]:
    # ``keep`` (the leaves' gradient accumulators) lives as long as this generator runs
    indices = iter(range(count))
    pending: deque[Future[T]] = deque(pool.submit(run, i) for i in islice(indices, ahead))
    while pending:
        done = pending.popleft()
        for index in islice(indices, 1):
            pending.append(pool.submit(run, index))
        yield done.result()


def call_module(module: nn.Module, tensors: dict[str, Tensor], x: Tensor) -> Tensor:
    """``functional_call(module, tensors, (x,))``, safe in a task thread.

    On the calling thread of :func:`map_in_threads` (or anywhere else) this is exactly
    ``functional_call``. In a task thread it calls this thread's replica of ``module``, passing
    ``module``'s own parameters and buffers under ``tensors``, so the result is the same and the
    shared module is never swapped. The buffers themselves are shared: a forward that writes to
    them (BatchNorm updating running statistics in training mode) is not safe on task threads;
    the gradient-based learners normalise with batch statistics and write none.

    Example:
        >>> net = torch.nn.Linear(2, 1)
        >>> w = {"weight": torch.zeros(1, 2)}
        >>> call_module(net, w, torch.ones(1, 2)).item() == net.bias.item()
        True
    """
    if not getattr(_LOCAL, "in_task", False):
        return functional_call(module, tensors, (x,))
    every = {**dict(module.named_parameters()), **dict(module.named_buffers()), **tensors}
    return functional_call(_replica(module), every, (x,))


def _replica(module: nn.Module) -> nn.Module:
    """This thread's copy of ``module``'s structure, in ``module``'s train/eval modes.

    Made on the thread's first call of ``module`` and kept while ``module`` lives: a change to
    its structure after that (new submodules, hooks) is not seen by the replica.
    """
    replicas: weakref.WeakKeyDictionary[nn.Module, nn.Module]
    replicas = _LOCAL.__dict__.setdefault("replicas", weakref.WeakKeyDictionary())
    replica = replicas.get(module)
    if replica is None:
        replica = replicas[module] = _tensorless_copy(module)
    for mine, theirs in zip(replica.modules(), module.modules(), strict=True):
        mine.training = theirs.training
    return replica


def _tensorless_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` whose parameters and buffers are empty placeholders (no memory:
    every tensor is passed in at each call)."""
    memo: dict[int, object] = {
        id(p): nn.Parameter(torch.empty(0), requires_grad=p.requires_grad)
        for p in module.parameters()
    }
    memo.update({id(b): torch.empty(0) for b in module.buffers()})
    return copy.deepcopy(module, memo)


def _pool(threads: int) -> ThreadPoolExecutor:
    with _POOLS_LOCK:
        if threads not in _POOLS:
            _POOLS[threads] = ThreadPoolExecutor(threads, thread_name_prefix="metaml-task")
        return _POOLS[threads]


def _callers_modes() -> Callable[[], contextlib.ExitStack]:
    """A context factory that enters, on another thread, the thread-local modes of this one:
    grad and inference mode, autocast, the intra-op thread count (a pool thread keeps the
    count it first ran with otherwise) and the current CUDA device and stream."""
    grad_enabled = torch.is_grad_enabled()
    inference = torch.is_inference_mode_enabled()
    intra_op = torch.get_num_threads()
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    device_types = ["cpu", *(["cuda"] if cuda else [])]
    autocasts = [
        (kind, torch.get_autocast_dtype(kind))
        for kind in device_types
        if torch.is_autocast_enabled(kind)
    ]
    stream = torch.cuda.current_stream() if cuda else None

    def enter() -> contextlib.ExitStack:
        if torch.get_num_threads() != intra_op:
            torch.set_num_threads(intra_op)
        stack = contextlib.ExitStack()
        if inference:  # first: inference_mode also sets grad mode
            stack.enter_context(torch.inference_mode())
        stack.enter_context(torch.set_grad_enabled(grad_enabled))
        for kind, dtype in autocasts:
            stack.enter_context(torch.autocast(kind, dtype=dtype))
        if stream is not None:
            stack.enter_context(torch.cuda.device(stream.device))
            stack.enter_context(torch.cuda.stream(stream))
        return stack

    return enter
