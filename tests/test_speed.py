"""The speed options keep MAML's meta-gradients: low-memory mode and bf16 autocast training."""

from __future__ import annotations

import pytest
import torch
from helpers import GRADIENT_LEARNER_CASES, conv_batch, meta_gradient

from metaml.algorithms.gbml import MAML
from metaml.nn import create_backbone
from metaml.tasks import TaskBatch


@pytest.mark.parametrize(("cls", "kwargs"), GRADIENT_LEARNER_CASES)
def test_per_task_loop_gives_the_vmap_meta_gradient(cls: type, kwargs: dict) -> None:
    """The loop frees each task's graph after its own backward (``low_memory`` forces the loop);
    the meta-gradient equals vmap's, which differentiates the whole batch's graph at once."""
    batch = conv_batch()

    def learner(**options: object) -> torch.nn.Module:
        torch.manual_seed(0)
        net = create_backbone("conv4", num_outputs=5, hidden=8, track_running_stats=False)
        return cls(net.double(), inner_lr=0.4, **kwargs, **options).double()  # type: ignore[no-any-return]

    metrics_ref, ref = meta_gradient(learner(vectorize="vmap"), batch)
    for options in ({"vectorize": "loop"}, {"vectorize": "auto", "low_memory": True}):
        metrics, got = meta_gradient(learner(**options), batch)
        assert metrics["loss"] == pytest.approx(metrics_ref["loss"], rel=1e-12)
        assert len(ref) == len(got)
        for a, b in zip(got, ref, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_low_memory_off_the_training_path_is_the_ordinary_loss() -> None:
    net = create_backbone("conv4", num_outputs=5, hidden=8, track_running_stats=False).double()
    learner = MAML(net, inner_lr=0.4, low_memory=True, vectorize="loop")
    with torch.no_grad():
        loss, metrics = learner.meta_loss(conv_batch(2))
    assert not loss.requires_grad and set(metrics) == {"loss", "acc"}


def test_trainer_precision_bf16_runs_meta_loss_under_autocast(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from metaml.config import TrainConfig
    from metaml.data import Sinusoid
    from metaml.engine.trainer import Trainer
    from metaml.tasks import EpisodeSampler

    seen = []

    class Recording(MAML):
        def meta_loss(self, batch: TaskBatch):  # type: ignore[no-untyped-def]
            seen.append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu"))
            return super().meta_loss(batch)

    sampler = EpisodeSampler(Sinusoid(), shots=5, queries=5, meta_batch_size=2)
    learner = Recording(create_backbone("mlp"), task_type="regression", vectorize="loop")
    config = TrainConfig(steps=2, precision="bf16", log_every=1, checkpoint_every=2)
    summary = Trainer(learner, sampler, None, config, tmp_path / "run", quiet=True).fit()
    assert seen == [torch.bfloat16, torch.bfloat16]
    assert summary["step"] == 2 and summary["loss"] is not None
    assert all(p.dtype == torch.float32 for p in learner.parameters())


@pytest.mark.slow
def test_compiled_meta_loss_gives_the_second_order_meta_gradient() -> None:
    torch.manual_seed(0)
    batch = TaskBatch(*(torch.randn(3, 5, 1, dtype=torch.float64) for _ in range(4)))
    grads = []
    for compile in (False, True):
        torch.manual_seed(0)
        net = create_backbone("mlp", in_shape=(1,), num_outputs=1, hidden=(8, 8)).double()
        learner = MAML(net, task_type="regression", inner_lr=0.3, inner_steps=2,
                       vectorize="vmap", compile=compile)  # fmt: skip
        learner.meta_loss(batch)[0].backward()
        grads.append([p.grad for p in learner.parameters()])
    for eager, compiled in zip(*grads, strict=True):
        torch.testing.assert_close(compiled, eager, rtol=1e-9, atol=1e-12)
