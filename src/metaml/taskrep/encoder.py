"""A task's vector from a fixed reference backbone's embeddings of its support set.

For a support set with classes ``c = 1..N``, the reference backbone ``f`` (never trained here:
its weights are fixed by a seed, or taken from a trained run) embeds every support example;
``p_c`` is the mean embedding (prototype) of class ``c``. The task's vector is the concatenation
of up to three blocks, each of the backbone's width ``d`` (or its last layer's channels):

``mean``
    ``mean_c p_c``: where the task sits in feature space (which kind of images it holds);
``spread``
    ``std_c p_c`` per feature (population standard deviation over the ``N`` prototypes): how
    far apart its classes are along each feature, i.e. which features tell them apart;
``fisher`` (optional, Task2Vec-style, Achille et al. 2019)
    the diagonal empirical Fisher information of a nearest-prototype classifier's log-likelihood
    with respect to the weights of the backbone's last convolution or linear layer, summed over
    each output channel's weights and normalised to sum to one: which filters the task's
    labels depend on.

With ``normalize=True`` each block is scaled to unit L2 norm before concatenation, so that no
block dominates a distance only because of its scale. The default is ``normalize=False`` and
``fisher=False``: on Omniglot-small and glyphs, same-alphabet retrieval precision@5 with the
random conv4 is highest without either (see ``benchmarks/RESULTS.md``, "Task representations").

Everything runs in float32 on the CPU, in eval mode, with the backbone built under a fixed seed
in a forked RNG (the global random state is untouched), so the same support set always gives the
same vector. Cost: one forward pass of the support set (plus one backward pass per support example
with ``fisher=True``); a 5-way 5-shot Omniglot task takes a few milliseconds with conv4
(measured in ``benchmarks/kb_retrieval.py``).

Example:
    >>> import torch
    >>> enc = TaskEncoder(input_shape=(1, 16, 16), fisher=True)
    >>> x, y = torch.rand(6, 1, 16, 16), torch.tensor([0, 0, 1, 1, 2, 2])
    >>> v = enc.encode(x, y)
    >>> v.shape == (enc.dim,), bool((v == enc.encode(x, y)).all())
    (True, True)
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metaml.algorithms.features import embed, feature_extractor
from metaml.algorithms.protonet import class_means
from metaml.errors import UserError

if TYPE_CHECKING:
    from metaml.tasks import Task

FORMAT = "metaml-taskrep/1"


def prototype_summary(embeddings: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """The mean ``(d,)`` and per-feature population std ``(d,)`` of the class prototypes.

    Example:
        >>> e = torch.tensor([[0.0, 1.0], [2.0, 1.0], [4.0, 3.0], [6.0, 3.0]])
        >>> mean, spread = prototype_summary(e, torch.tensor([0, 0, 1, 1]))
        >>> mean.tolist(), spread.tolist()  # prototypes (1, 1) and (5, 3)
        ([3.0, 2.0], [2.0, 1.0])
    """
    prototypes = class_means(embeddings[None], labels[None])[0]  # (ways, d)
    return prototypes.mean(0), prototypes.std(0, correction=0)


class TaskEncoder:
    """Maps a support set ``(x, y)`` to a fixed-length task vector (see the module docstring).

    ``backbone``: any module with ``forward_features`` (a trained learner's, via
    :meth:`from_run`); by default a ``conv4`` for ``input_shape`` with random weights drawn with
    ``seed`` (random convolutional features already separate Omniglot alphabets; see
    ``benchmarks/RESULTS.md``). :meth:`spec` describes the encoder so a knowledge base can rebuild
    it (:meth:`from_spec`) and refuse to compare vectors of different encoders.

    Example:
        >>> enc = TaskEncoder(input_shape=(1, 16, 16))
        >>> enc.dim, enc.spec()["backbone"]
        (128, 'conv4')
        >>> TaskEncoder.from_spec(enc.spec()).spec() == enc.spec()
        True
    """

    def __init__(
        self,
        backbone: nn.Module | None = None,
        *,
        input_shape: tuple[int, ...] = (1, 28, 28),
        seed: int = 0,
        fisher: bool = False,
        normalize: bool = False,
        source: dict[str, Any] | None = None,
    ) -> None:
        self.input_shape = tuple(int(s) for s in input_shape)
        self.seed, self.fisher, self.normalize = int(seed), bool(fisher), bool(normalize)
        if backbone is None:
            from metaml.nn import create_backbone

            # A forked RNG: building the encoder never changes the caller's random stream.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed)
                backbone = create_backbone("conv4", in_shape=self.input_shape, num_outputs=0)
            source = {"backbone": "conv4", "seed": self.seed}
        elif source is None:
            source = {"backbone": type(backbone).__name__, "seed": None}
        self.backbone = backbone.cpu().float().eval()
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        self.source = source
        self._fisher_layer = _last_weight_layer(self.backbone) if self.fisher else None
        with torch.no_grad():
            width = embed(self.backbone, torch.zeros(1, *self.input_shape)).shape[1]
        self.feature_dim = int(width)
        channels = self._fisher_layer.weight.shape[0] if self._fisher_layer is not None else 0
        self.dim = 2 * self.feature_dim + int(channels)

    @classmethod
    def from_run(cls, run_dir: str | Path, checkpoint: str = "best", **kwargs: Any) -> TaskEncoder:
        """An encoder on a trained run's backbone (its meta-learned features).

        Example:
            >>> # enc = TaskEncoder.from_run("runs/protonet-omniglot", fisher=True)
        """
        from metaml.runs import load_learner, read_model_spec

        run_dir = Path(run_dir).resolve()
        learner = load_learner(run_dir, checkpoint=checkpoint, device="cpu")
        spec = read_model_spec(run_dir) or {}
        shape = tuple(spec.get("input_shape") or kwargs.pop("input_shape", (1, 28, 28)))
        kwargs.pop("input_shape", None)
        source = {"backbone": "run", "run_dir": str(run_dir), "checkpoint": checkpoint}
        return cls(feature_extractor(learner), input_shape=shape, source=source, **kwargs)

    def spec(self) -> dict[str, Any]:
        """A JSON-able description: two encoders with equal specs give equal vectors.

        Example:
            >>> TaskEncoder(input_shape=(1, 16, 16)).spec()["dim"]
            128
        """
        return {
            "format": FORMAT,
            **self.source,
            "input_shape": list(self.input_shape),
            "fisher": self.fisher,
            "normalize": self.normalize,
            "dim": self.dim,
        }

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> TaskEncoder:
        """Rebuild the encoder :meth:`spec` describes.

        Example:
            >>> TaskEncoder.from_spec({"backbone": "conv4", "seed": 1, "input_shape": [1, 16, 16]}).dim
            128
        """
        fisher = bool(spec.get("fisher", False))
        normalize = bool(spec.get("normalize", False))
        if spec.get("backbone") == "conv4":
            shape = tuple(int(s) for s in spec.get("input_shape", (1, 28, 28)))
            seed = int(spec.get("seed") or 0)
            return cls(input_shape=shape, seed=seed, fisher=fisher, normalize=normalize)
        if spec.get("backbone") == "run":
            checkpoint = str(spec.get("checkpoint", "best"))
            return cls.from_run(spec["run_dir"], checkpoint, fisher=fisher, normalize=normalize)
        raise UserError(
            f"cannot rebuild a task encoder from {spec!r}; give the encoder (TaskEncoder(backbone)) explicitly"
        )

    def encode(self, support_x: Tensor, support_y: Tensor) -> np.ndarray:
        """The task vector ``(dim,)`` float32 of a support set ``(n, ...)``, labels ``(n,)`` in ``0..N-1``.

        Example:
            >>> enc = TaskEncoder(input_shape=(1, 16, 16))
            >>> enc.encode(torch.rand(2, 1, 16, 16), torch.tensor([0, 1])).dtype
            dtype('float32')
        """
        if (
            support_x.ndim != len(self.input_shape) + 1
            or tuple(support_x.shape[1:]) != self.input_shape
        ):
            raise UserError(
                f"the task encoder takes inputs of shape {self.input_shape}; got "
                f"{tuple(support_x.shape[1:])} (build it with input_shape= matching the data)"
            )
        if support_y.ndim != 1 or len(support_y) != len(support_x) or len(support_y) == 0:
            raise UserError(
                f"support_y must be (n,) labels for the {len(support_x)} support inputs; got {tuple(support_y.shape)}"
            )
        x = support_x.detach().cpu().float()
        y = support_y.detach().cpu().long()
        features = embed(self.backbone, x)  # (n, d)
        mean, spread = prototype_summary(features, y)
        blocks = [mean, spread]
        if self._fisher_layer is not None:
            blocks.append(self._fisher(x, y, features))
        if self.normalize:
            blocks = [b / b.norm().clamp_min(1e-12) for b in blocks]
        return torch.cat(blocks).numpy().astype(np.float32)

    def encode_task(self, task: Task) -> np.ndarray:
        """The vector of a :class:`~metaml.tasks.Task`'s support set.

        Example:
            >>> from metaml.tasks import Task
            >>> t = Task(torch.rand(2, 1, 16, 16), torch.tensor([0, 1]), torch.rand(2, 1, 16, 16), torch.tensor([0, 1]))
            >>> TaskEncoder(input_shape=(1, 16, 16)).encode_task(t).shape
            (128,)
        """
        return self.encode(task.support_x, task.support_y)

    def _fisher(self, x: Tensor, y: Tensor, features: Tensor) -> Tensor:
        """Per-channel diagonal empirical Fisher ``(channels,)`` of the last layer, summing to one."""
        layer = self._fisher_layer
        assert layer is not None
        prototypes = class_means(features[None], y[None])[0]  # (ways, d), fixed
        weight = layer.weight
        weight.requires_grad_(True)
        total = torch.zeros_like(weight)
        forward_features = self.backbone.forward_features
        assert callable(forward_features)
        try:
            with torch.enable_grad():
                for i in range(len(x)):  # per-example gradients: the Fisher is E[g^2], not E[g]^2
                    feature = forward_features(x[i : i + 1]).flatten(1)  # (1, d)
                    logits = -torch.cdist(
                        feature, prototypes, compute_mode="donot_use_mm_for_euclid_dist"
                    ).pow(2)  # (1, ways)
                    loss = F.cross_entropy(logits, y[i : i + 1])
                    (grad,) = torch.autograd.grad(loss, weight)
                    total += grad.pow(2)
        finally:
            weight.requires_grad_(False)
        per_channel = (total / len(x)).flatten(1).sum(1)  # (channels,)
        return per_channel / per_channel.sum().clamp_min(1e-30)


def _last_weight_layer(backbone: nn.Module) -> nn.Conv2d | nn.Linear:
    """The last convolution or linear layer of the backbone's features (not its head)."""
    head = getattr(backbone, "head", None)
    head_ids = {id(m) for m in head.modules()} if isinstance(head, nn.Module) else set()
    layers = [
        m
        for m in backbone.modules()
        if isinstance(m, nn.Conv2d | nn.Linear) and id(m) not in head_ids
    ]
    if not layers:
        raise UserError(
            f"{type(backbone).__name__} has no convolution or linear layer for the Fisher block; use fisher=False"
        )
    return layers[-1]
