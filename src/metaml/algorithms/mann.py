"""Memory-augmented neural network (MANN; Santoro et al., 2016, "Meta-learning with
memory-augmented neural networks").

An LSTM controller reads and writes an external memory ``M`` (``slots x size``) through
least-recently-used access (LRUA). An episode is one *sequence*: at step ``t`` the network
sees the input ``x_t`` and the label ``y_{t-1}`` of the previous step (zeros at ``t = 0``) and
predicts ``y_t``. A class is first seen without its label, so the first instance of each class
can only be guessed (1/ways); from the second on, the network has to bind images to labels in
memory within the episode. Labels are a random permutation of the classes per episode (the
:class:`~metaml.tasks.EpisodeSampler` numbers classes in the random order it drew them), so
nothing about a class's label can be stored in the weights.

One step, for ``R`` read heads (the paper's equations; ``n = R`` least-used slots)::

    h_t        = LSTM([x_t, y_{t-1}, r_{t-1}], h_{t-1})
    k_t, a_t   = tanh(W_k h_t), W_a h_t                  # R keys (size) and R write gates
    M          = M_{t-1} with its least-used row zeroed  # argmin of w^u_{t-1}
    w^w_t      = sigmoid(a_t) w^r_{t-1} + (1 - sigmoid(a_t)) w^lu_{t-1}
    M_t        = M + sum_heads w^w_t k_t^T               # the paper writes the key itself
    w^r_t      = softmax_i cos(k_t, M_t(i))              # one softmax per head
    r_t        = w^r_t M_t
    w^u_t      = gamma w^u_{t-1} + sum_heads (w^r_t + w^w_t)
    w^lu_t     = 1 on the n smallest entries of w^u_t, else 0
    logits_t   = W_o [h_t, r_t]

The building blocks (:func:`cosine_read_weights`, :func:`read_memory`, :func:`least_used`,
:func:`lrua_write`, :func:`update_usage`) are pure functions of tensors, batched over a leading
``B`` dimension, so the tests check them against hand computations.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metaml.algorithms.base import MetaLearner, Predictor, TaskType
from metaml.errors import UserError
from metaml.tasks import TaskBatch

# Memory starts at a small constant rather than zero so that cosine similarities are defined
# (and equal: the first reads are uniform), as in the reference implementations.
_MEMORY_INIT = 1e-6
_EPS = 1e-8
_INITIAL_STRENGTH = 10.0  # key strength at initialisation, with key_strength=True


def _softplus_inverse(y: float) -> float:
    return math.log(math.expm1(y))


# -- memory primitives (pure functions, batched over B) -----------------------------------------


def cosine_read_weights(keys: Tensor, memory: Tensor, strength: Tensor | None = None) -> Tensor:
    """Read weights ``(B, R, N)``: a softmax over slots of the cosine similarity to each key.

    ``keys`` is ``(B, R, D)`` (one key per read head), ``memory`` is ``(B, N, D)``. The paper
    uses the plain similarity; ``strength`` ``(B, R)`` (>= 1, the NTM's key strength) multiplies
    it first, which lets a head read one slot sharply rather than a near-uniform mix.

    Example:
        >>> m = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
        >>> w = cosine_read_weights(torch.tensor([[[2.0, 0.0]]]), m)  # softmax([1, 0])
        >>> [round(v, 4) for v in w[0, 0].tolist()]
        [0.7311, 0.2689]
    """
    dots = keys @ memory.transpose(1, 2)  # (B, R, D) @ (B, D, N) -> (B, R, N)
    # Divide the small (B, R, N) dot products, not the (B, N, D) memory: same value, less work.
    norms = keys.norm(dim=-1).unsqueeze(-1) * memory.norm(dim=-1).unsqueeze(1)  # (B, R, N)
    similarity = dots / (norms + _EPS)
    if strength is not None:
        similarity = similarity * strength.unsqueeze(-1)
    return similarity.softmax(dim=-1)


def read_memory(weights: Tensor, memory: Tensor) -> Tensor:
    """Read vectors ``(B, R, D)``: the ``weights``-weighted sums of memory rows.

    Example:
        >>> m = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])
        >>> read_memory(torch.tensor([[[0.25, 0.75]]]), m).tolist()
        [[[2.5, 3.5]]]
    """
    return weights @ memory  # (B, R, N) @ (B, N, D) -> (B, R, D)


def least_used(usage: Tensor, n: int) -> Tensor:
    """The least-used weights ``(B, N)``: 1 on the ``n`` smallest usages of each row, else 0.

    The paper sets ``w^lu(i) = 1`` where ``w^u(i) <= m(w^u, n)`` (the n-th smallest usage); ties
    could then mark more than ``n`` slots, so here exactly ``n`` are marked, ties going to the
    lower slot index (a stable sort), which also makes the choice deterministic on any device.

    Example:
        >>> least_used(torch.tensor([[0.5, 0.1, 0.9, 0.1]]), n=2).tolist()
        [[0.0, 1.0, 0.0, 1.0]]
    """
    order = torch.sort(usage, dim=-1, stable=True).indices  # (B, N), least used first
    weights = torch.zeros_like(usage)
    return weights.scatter(-1, order[..., :n], 1.0)


def lrua_write(
    memory: Tensor,
    keys: Tensor,
    gate_logits: Tensor,
    prev_read_weights: Tensor,
    prev_usage: Tensor,
) -> tuple[Tensor, Tensor]:
    """One LRUA write: the new memory ``(B, N, D)`` and the write weights ``(B, R, N)``.

    Each head ``h`` writes its key ``keys[:, h]`` (``(B, R, D)``) with weights
    ``sigmoid(a) * w^r_{t-1} + (1 - sigmoid(a)) * w^lu_{t-1}``: ``a = gate_logits[:, h]``
    interpolates between the slot it read last step (update a memory) and the least-used slots
    (store a new one). Before writing, the single least-used row (smallest ``prev_usage``) is
    zeroed, so a new memory does not mix with what that slot held.

    Example:
        >>> m = torch.ones(1, 3, 2)
        >>> new, w = lrua_write(m, torch.tensor([[[2.0, 4.0]]]), torch.zeros(1, 1),
        ...                     torch.tensor([[[1.0, 0.0, 0.0]]]), torch.tensor([[0.9, 0.1, 0.5]]))
        >>> w.tolist(), new.tolist()
        ([[[0.5, 0.5, 0.0]]], [[[2.0, 3.0], [1.0, 2.0], [1.0, 1.0]]])
    """
    heads = keys.shape[1]
    lu = least_used(prev_usage, heads)  # (B, N), computed from the usage before this step
    gate = torch.sigmoid(gate_logits).unsqueeze(-1)  # (B, R, 1)
    write_weights = gate * prev_read_weights + (1 - gate) * lu.unsqueeze(1)  # (B, R, N)
    emptiest = prev_usage.argmin(dim=-1)  # (B,); argmin returns the first minimum, as the sort
    keep = 1.0 - F.one_hot(emptiest, memory.shape[1]).to(memory.dtype)  # (B, N)
    # zeroed memory + sum over heads of outer(w^w_h, k_h): (B, N, R) @ (B, R, D) -> (B, N, D)
    memory = torch.baddbmm(memory * keep.unsqueeze(-1), write_weights.transpose(1, 2), keys)
    return memory, write_weights


def update_usage(
    usage: Tensor, read_weights: Tensor, write_weights: Tensor, gamma: float
) -> Tensor:
    """Usage weights ``(B, N)``: ``gamma * usage`` plus this step's read and write weights.

    Example:
        >>> r, w = torch.tensor([[[0.25, 0.75]]]), torch.tensor([[[1.0, 0.0]]])
        >>> update_usage(torch.tensor([[1.0, 0.5]]), r, w, gamma=0.5).tolist()
        [[1.75, 1.0]]
    """
    return gamma * usage + read_weights.sum(1) + write_weights.sum(1)


# -- episodes as sequences --------------------------------------------------------------------


def instance_index(labels: Tensor) -> Tensor:
    """For each step, how many earlier steps of the sequence had the same label (0 = first).

    ``labels`` is ``(B, T)`` with values ``0..ways-1``; the result has the same shape.

    Example:
        >>> instance_index(torch.tensor([[2, 0, 2, 2, 0]])).tolist()
        [[0, 0, 1, 2, 1]]
    """
    one_hot = F.one_hot(labels)  # (B, T, ways)
    before = one_hot.cumsum(1) - one_hot  # occurrences strictly before t, per class
    return (before * one_hot).sum(-1)


def accuracy_by_instance(logits: Tensor, labels: Tensor, instances: int = 10) -> Tensor:
    """Per-sequence accuracy ``(B, instances)`` at the 1st, 2nd, ... instance of a class.

    Entry ``[b, k]`` is the fraction of correct predictions among the steps of sequence ``b``
    that show a class for the ``k+1``-th time; NaN where no class occurs that often.

    Example:
        >>> labels = torch.tensor([[0, 1, 0, 1]])
        >>> logits = F.one_hot(torch.tensor([[1, 1, 0, 0]]), 2).float()
        >>> accuracy_by_instance(logits, labels, instances=3).tolist()
        [[0.5, 0.5, nan]]
    """
    correct = (logits.argmax(-1) == labels).float()  # (B, T)
    slot = F.one_hot(instance_index(labels).clamp(max=instances), instances + 1)[..., :instances]
    slot = slot.to(correct.dtype)  # (B, T, instances); steps beyond `instances` fall off
    hits = (correct.unsqueeze(-1) * slot).sum(1)  # (B, instances)
    counts = slot.sum(1)
    return hits / counts.where(counts > 0, torch.nan)


def episode_sequence(
    batch: TaskBatch, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """Each task's support and query examples as one shuffled sequence: ``x (B, T, ...)``, ``y (B, T)``.

    ``T = support + query`` examples; each task gets its own random order, drawn from
    ``generator`` (default: one seeded by the batch's contents, see :func:`content_seed`, so a
    batch always gives the same sequence). Support and query play the same role here: MANN's
    supervision is the label of every step, revealed one step later.

    Example:
        >>> from metaml.tasks import Task
        >>> task = Task(torch.zeros(2, 3), torch.tensor([0, 1]), torch.ones(4, 3),
        ...             torch.tensor([0, 0, 1, 1]))
        >>> x, y = episode_sequence(TaskBatch.stack([task, task]))
        >>> tuple(x.shape), sorted(y[0].tolist())
        ((2, 6, 3), [0, 0, 0, 1, 1, 1])
    """
    x = torch.cat([batch.support_x, batch.query_x], dim=1)  # (B, T, ...)
    y = torch.cat([batch.support_y, batch.query_y], dim=1)  # (B, T)
    if generator is None:
        generator = torch.Generator().manual_seed(content_seed(batch.support_x, y))
    order = torch.rand(y.shape, generator=generator).argsort(dim=1).to(y.device)  # (B, T)
    x = x.gather(1, order.view(*order.shape, *[1] * (x.dim() - 2)).expand_as(x))
    return x, y.gather(1, order)


def content_seed(*tensors: Tensor) -> int:
    """A 63-bit seed from the bytes of ``tensors``: the same contents give the same seed.

    Shuffling with it keeps ``meta_loss`` a pure function of its batch (resumed runs and
    repeated evaluations see identical sequences) without touching the global RNG.

    Example:
        >>> content_seed(torch.arange(3)) == content_seed(torch.arange(3))
        True
    """
    digest = hashlib.blake2b(digest_size=8)
    for t in tensors:
        digest.update(t.detach().cpu().contiguous().numpy().tobytes())
    return int.from_bytes(digest.digest(), "little") >> 1


# -- the learner ------------------------------------------------------------------------------


class MemoryState(NamedTuple):
    """The recurrent state of a batch of ``B`` sequences (``H`` controller units, ``R`` heads)."""

    h: Tensor  # (B, H) controller output
    c: Tensor  # (B, H) controller cell
    memory: Tensor  # (B, N, D)
    read_weights: Tensor  # (B, R, N) of the last read
    usage: Tensor  # (B, N)
    reads: Tensor  # (B, R*D) last read vectors, flattened

    def expand(self, batch_size: int) -> MemoryState:
        """The state of a single sequence (``B = 1``) repeated ``batch_size`` times (no copy)."""
        return MemoryState(*(t.expand(batch_size, *t.shape[1:]) for t in self))


class MANN(MetaLearner):
    """LSTM controller with an LRUA memory, trained on episodes shown as label-delayed sequences.

    ``backbone`` (optional) embeds each input with ``forward_features``; without one the input
    is flattened (the paper feeds raw pixels: use ``data.image_size: 20`` for its 20x20 images).

    * :meth:`meta_loss`: each task's support and query examples form one shuffled sequence
      (:func:`episode_sequence`); the loss is the cross-entropy of every step's prediction.
    * :meth:`adapt`: the support set is run as a sequence (shuffled like in training) and the
      final state kept; each query is then one more step from that state, with the last support
      label as its previous-label input (in training that step's input also carries the label
      just revealed, and it is what binds the last support example in memory). Queries run
      side by side from copies of the state, never writing into each other's memory, so a
      prediction does not depend on the other queries or their order.

    Example:
        >>> net = MANN(ways=3, input_shape=(1, 4, 4), controller_size=8, memory_slots=6,
        ...            memory_size=4, read_heads=2)
        >>> predict = net.adapt(torch.rand(3, 1, 4, 4), torch.tensor([0, 1, 2]))
        >>> predict(torch.rand(5, 1, 4, 4)).shape
        torch.Size([5, 3])
    """

    task_type: TaskType = "classification"

    def __init__(
        self,
        backbone: nn.Module | None = None,
        *,
        task_type: TaskType = "classification",
        ways: int = 5,
        input_shape: tuple[int, ...] = (1, 28, 28),
        controller_size: int = 200,
        memory_slots: int = 128,
        memory_size: int = 40,
        read_heads: int = 4,
        gamma: float = 0.95,
        key_strength: bool = False,
        compile: bool = False,
    ) -> None:
        super().__init__()
        if task_type != "classification":
            raise UserError(
                f"MANN learns classification episodes; got task_type={task_type!r} (use a classification dataset)"
            )
        if read_heads > memory_slots:
            raise UserError(
                f"read_heads={read_heads} needs at least as many memory_slots; got {memory_slots}"
            )
        self.backbone = backbone
        self.ways, self.gamma = ways, gamma
        self.slots, self.size, self.heads = memory_slots, memory_size, read_heads
        features = self._feature_dim(input_shape)
        hidden, reads = controller_size, read_heads * memory_size
        # The LSTM's input weights act on [x_t, y_{t-1}], known for all steps in advance, so they
        # are applied to the whole sequence at once; only [h, r] goes through the time loop.
        self.input = nn.Linear(features + ways, 4 * hidden)
        self.recurrent = nn.Linear(hidden + reads, 4 * hidden, bias=False)
        self.key_strength = key_strength
        # keys, write gates and (with key_strength) one read sharpness per head
        self.interface = nn.Linear(hidden, reads + read_heads * (2 if key_strength else 1))
        self.output = nn.Linear(hidden + reads, ways)
        self.use_compile = compile
        self._compiled_step: Callable[..., tuple[Tensor, MemoryState]] | None = None
        with torch.no_grad():  # forget-gate bias 1: remember by default early in training
            self.input.bias[hidden : 2 * hidden].fill_(1.0)
            if key_strength:  # start sharp: a perfect match outweighs an orthogonal row e^10-fold
                self.interface.bias[-read_heads:].fill_(_softplus_inverse(_INITIAL_STRENGTH - 1))

    def _feature_dim(self, input_shape: tuple[int, ...]) -> int:
        if self.backbone is None:
            return int(torch.Size(input_shape).numel())
        with torch.no_grad():
            return int(self.embed(torch.zeros(1, *input_shape)).shape[1])

    def embed(self, x: Tensor) -> Tensor:
        """Features ``(n, F)`` of inputs ``(n, ...)``: the backbone's, or the flattened input."""
        if self.backbone is None:
            return x.flatten(1)
        features: Tensor = self.backbone.forward_features(x)  # type: ignore[operator]
        return features.flatten(1)

    def initial_state(self, batch_size: int, like: Tensor) -> MemoryState:
        """The state before the first step: empty controller, memory at a small constant.

        Usage starts at zero and the previous read weights at zero (nothing was read yet), so
        the first write goes to the least-used slots.

        Example:
            >>> net = MANN(ways=2, input_shape=(3,), controller_size=4, memory_slots=5,
            ...            memory_size=2, read_heads=1)
            >>> net.initial_state(7, torch.zeros(1)).memory.shape
            torch.Size([7, 5, 2])
        """
        hidden = self.recurrent.out_features // 4
        z = like.new_zeros
        return MemoryState(
            h=z(batch_size, hidden),
            c=z(batch_size, hidden),
            memory=z(batch_size, self.slots, self.size) + _MEMORY_INIT,
            read_weights=z(batch_size, self.heads, self.slots),
            usage=z(batch_size, self.slots),
            reads=z(batch_size, self.heads * self.size),
        )

    def step(self, state: MemoryState, input_gates: Tensor) -> tuple[Tensor, MemoryState]:
        """One time step: logits ``(B, ways)`` and the next state.

        ``input_gates`` ``(B, 4H)`` is ``self.input([features(x_t), one_hot(y_{t-1})])``.

        Example:
            >>> net = MANN(ways=2, input_shape=(3,), controller_size=4, memory_slots=5,
            ...            memory_size=2, read_heads=1)
            >>> logits, state = net.step(net.initial_state(1, torch.zeros(1)), torch.zeros(1, 16))
            >>> logits.shape, state.usage.shape
            (torch.Size([1, 2]), torch.Size([1, 5]))
        """
        gates = input_gates + self.recurrent(torch.cat([state.h, state.reads], dim=-1))
        i, f, g, o = gates.chunk(4, dim=-1)  # (B, H) each
        c = torch.sigmoid(f) * state.c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        interface = self.interface(h)
        keys = torch.tanh(interface[:, : self.heads * self.size]).view(-1, self.heads, self.size)
        gate_logits = interface[:, self.heads * self.size :][:, : self.heads]  # (B, R)
        strength = None
        if self.key_strength:  # 1 + softplus: at least the paper's plain cosine softmax
            strength = 1 + F.softplus(interface[:, -self.heads :])  # (B, R)
        memory, write_weights = lrua_write(
            state.memory, keys, gate_logits, state.read_weights, state.usage
        )
        read_weights = cosine_read_weights(keys, memory, strength)  # (B, R, N)
        reads = read_memory(read_weights, memory).flatten(1)  # (B, R, D) -> (B, R*D)
        usage = update_usage(state.usage, read_weights, write_weights, self.gamma)
        logits = self.output(torch.cat([h, reads], dim=-1))
        return logits, MemoryState(h, c, memory, read_weights, usage, reads)

    def input_gates(self, x: Tensor, prev_labels: Tensor) -> Tensor:
        """Input-weight gates ``(B, T, 4H)`` of inputs ``(B, T, ...)`` and previous labels ``(B, T)``.

        A previous label of ``-1`` means "none" (a zero one-hot vector), as at the first step.

        Example:
            >>> net = MANN(ways=2, input_shape=(3,), controller_size=4, memory_slots=5,
            ...            memory_size=2, read_heads=1)
            >>> net.input_gates(torch.zeros(2, 6, 3), torch.full((2, 6), -1)).shape
            torch.Size([2, 6, 16])
        """
        b, t = prev_labels.shape
        features = self.embed(x.flatten(0, 1)).view(b, t, -1)  # (B*T, ...) -> (B, T, F)
        one_hot = F.one_hot(prev_labels.clamp(min=0), self.ways).to(features.dtype)
        one_hot = one_hot * (prev_labels >= 0).unsqueeze(-1)  # (B, T, ways); -1 -> zeros
        return self.input(torch.cat([features, one_hot], dim=-1))

    def forward(
        self, x: Tensor, y: Tensor, state: MemoryState | None = None
    ) -> tuple[Tensor, MemoryState]:
        """Run sequences ``x (B, T, ...)`` with labels ``y (B, T)``: logits ``(B, T, ways)``, final state.

        Step ``t`` sees ``x[:, t]`` and ``y[:, t-1]`` (nothing at ``t = 0``, when ``state`` is
        None); the final state has seen every label, the last one included.

        Example:
            >>> net = MANN(ways=2, input_shape=(3,), controller_size=4, memory_slots=5,
            ...            memory_size=2, read_heads=1)
            >>> logits, _ = net(torch.rand(2, 6, 3), torch.randint(0, 2, (2, 6)))
            >>> logits.shape
            torch.Size([2, 6, 2])
        """
        b = y.shape[0]
        if state is None:
            state = self.initial_state(b, x)
        # previous labels: y shifted right by one step, -1 (none) first: (B, T)
        prev = torch.cat([y.new_full((b, 1), -1), y[:, :-1]], dim=1)
        # unbind once: indexing gates[:, step] would make backward fill a (B, T, 4H) zero
        # gradient per step, more work than the whole step
        gates = self.input_gates(x, prev).unbind(1)  # T x (B, 4H)
        logits = []
        step = self._training_step() if torch.is_grad_enabled() else self.step
        for step_gates in gates:
            out, state = step(state, step_gates)
            logits.append(out)
        return torch.stack(logits, dim=1), state

    def _training_step(self) -> Callable[..., tuple[Tensor, MemoryState]]:
        """:meth:`step`, compiled on first use when ``compile=True``.

        The time loop runs ~30 small operations per step; compiling fuses them (measured 1.6x
        faster training on one CPU thread). Only training uses it: ``adapt`` runs batches of
        varying size, each of which would compile again.
        """
        if not self.use_compile:
            return self.step
        if self._compiled_step is None:
            self._compiled_step = torch.compile(self.step, dynamic=False)
        return self._compiled_step

    def meta_loss(self, batch: TaskBatch) -> tuple[Tensor, dict[str, float]]:
        """Cross-entropy over every step of each task's shuffled support+query sequence.

        Metrics: ``loss``, ``acc`` (all steps) and ``acc_inst1``, ``acc_inst2``, ``acc_inst5``,
        ``acc_inst10``: accuracy at the k-th instance of a class (where the sequence has one).

        Example:
            >>> from metaml.tasks import Task
            >>> net = MANN(ways=2, input_shape=(3,), controller_size=4, memory_slots=5,
            ...            memory_size=2, read_heads=1)
            >>> task = Task(torch.rand(2, 3), torch.tensor([0, 1]), torch.rand(4, 3),
            ...             torch.tensor([0, 0, 1, 1]))
            >>> loss, metrics = net.meta_loss(TaskBatch.stack([task, task]))
            >>> sorted(metrics)[:2]
            ['acc', 'acc_inst1']
        """
        x, y = episode_sequence(batch)
        logits, _ = self(x, y)  # (B, T, ways)
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        with torch.no_grad():
            by_instance = accuracy_by_instance(logits, y, instances=10).nanmean(0)  # (10,)
            metrics = {"loss": loss.item(), "acc": (logits.argmax(-1) == y).float().mean().item()}
            for k in (1, 2, 5, 10):
                value = by_instance[k - 1].item()
                if value == value:  # not NaN: the sequences hold a k-th instance
                    metrics[f"acc_inst{k}"] = value
        return loss, metrics

    def adapt(self, support_x: Tensor, support_y: Tensor, steps: int | None = None) -> Predictor:
        """Write the support set into memory; the predictor reads it, one query at a time.

        The support examples run as one sequence in a random order fixed by their contents
        (training never shows a class-sorted sequence); ``steps`` is ignored (no inner loop).
        """
        with torch.no_grad():
            generator = torch.Generator().manual_seed(content_seed(support_x, support_y))
            order = torch.randperm(len(support_y), generator=generator).to(support_y.device)
            x, y = support_x[order][None], support_y[order][None]  # (1, S, ...), (1, S)
            _, state = self(x, y)
            last_label = y[:, -1]  # (1,)

        def predict(query_x: Tensor) -> Tensor:
            q = query_x.shape[0]
            prev = last_label.expand(q)[:, None]  # (Q, 1): every query follows the support
            gates = self.input_gates(query_x[:, None], prev)[:, 0]  # (Q, 1, 4H) -> (Q, 4H)
            logits, _ = self.step(state.expand(q), gates)
            return logits

        return predict
