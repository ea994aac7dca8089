"""The fused BatchNorm-pool-ReLU kernel against torch's kernels, one conv4 block at a time.

Times ``relu(max_pool2d(batch_norm(x, training=True), 2))`` on the 64-channel channels-last
activations of conv4's workloads (5 and 75 images: a 5-way 1-shot support and query set; 320:
a ProtoNet 20-way 1-shot episode; 28x28 down to 3x3 maps), and conv4's first block with the
3x3 convolution of 1-channel 28x28 images before it. Forward alone and forward plus backward
(the gradients of the input or the convolution, and of BatchNorm's weight and bias), one
thread, with ``metaml.nn.fused`` (the fused kernel) and with torch's kernels interleaved in
the same process, medians of the rounds. Freed memory is reused, as in metaml's runs.

Run from the repository root (quiet machine)::

    flock /tmp/metaml-heavy.lock python -m benchmarks.fused_block --record
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable
from typing import Any

import torch

from benchmarks.common import append_section, machine
from benchmarks.run import seconds_per_call
from metaml.device import reuse_cpu_memory
from metaml.nn import BatchNorm2d
from metaml.nn.fused import conv_block, fused_kernels_available, norm_pool_relu

#: (images, map size) of the 64-channel blocks timed.
SHAPES = [(5, 28), (75, 28), (75, 14), (320, 28), (320, 14), (320, 7), (320, 3)]
#: image counts of the first block timed with its 1-channel convolution (28x28 images).
FIRST = [5, 75, 320]
IMPLS = ("torch", "fused")


def block_calls(
    images: int, size: int, channels: int = 64, first: bool = False
) -> dict[str, Callable[[], Any]]:
    """Forward and forward-and-backward calls of one block, for each implementation.

    ``first``: conv4's first block, its 3x3 convolution of 1-channel images included (the
    fused kernel computes it too); the gradients are then the convolution's and BatchNorm's.

    Example:
        >>> sorted(block_calls(2, 4, channels=3))
        ['fused forward', 'fused fwd+bwd', 'torch forward', 'torch fwd+bwd']
    """
    g = torch.Generator().manual_seed(0)
    norm = BatchNorm2d(channels, track_running_stats=False)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5, generator=g)
        norm.bias.normal_(generator=g)
    pool, act = torch.nn.MaxPool2d(2), torch.nn.ReLU()
    grad = torch.randn(images, channels, size // 2, size // 2, generator=g)
    grad = grad.contiguous(memory_format=torch.channels_last)
    if first:
        x = torch.randn(images, 1, size, size, generator=g).clone(memory_format=torch.channels_last)
        conv = torch.nn.Conv2d(1, channels, 3, padding=1)
        params = (conv.weight, conv.bias, norm.weight, norm.bias)
    else:
        x = torch.randn(images, channels, size, size, generator=g)
        x = x.contiguous(memory_format=torch.channels_last).requires_grad_()
        conv = torch.nn.Identity()
        params = (x, norm.weight, norm.bias)

    def torch_block() -> torch.Tensor:
        return act(pool(norm(conv(x))))

    def fused_block() -> torch.Tensor:
        return conv_block(conv, norm, pool, act, x) if first else norm_pool_relu(norm, pool, act, x)

    calls: dict[str, Callable[[], Any]] = {}
    for name, block in (("torch", torch_block), ("fused", fused_block)):
        calls[f"{name} forward"] = lambda block=block: block().detach()
        calls[f"{name} fwd+bwd"] = lambda block=block: torch.autograd.grad(block(), params, grad)
    return calls


def measure(quick: bool = False) -> dict[str, Any]:
    """Median milliseconds of each block's calls, interleaved round by round."""
    torch.set_num_threads(1)
    reused = reuse_cpu_memory()
    if not fused_kernels_available():
        raise SystemExit("the fused kernel is not available here (see the warning above)")
    shapes = [(5, 8)] if quick else SHAPES
    runs, min_seconds = (2, 0.005) if quick else (9, 0.1)
    rows = []
    channels = 8 if quick else 64
    cases = [(n, 28 if not quick else 8, True) for n in ([5] if quick else FIRST)]
    for images, size, first in [*cases, *((n, s, False) for n, s in shapes)]:
        calls = block_calls(images, size, channels, first)
        times: dict[str, list[float]] = {name: [] for name in calls}
        for _ in range(runs):
            for name, call in calls.items():
                times[name].append(seconds_per_call(call, 1, min_seconds))
        rows.append(
            {"images": images, "channels": channels, "size": size, "first": first}
            | {name: statistics.median(t) * 1000 for name, t in times.items()}
        )
    return {"machine": machine(), "rows": rows, "reuse_cpu_memory": reused, "runs": runs}


def render(results: dict[str, Any]) -> str:
    """A Markdown table: milliseconds of each implementation and torch's over the fused.

    Example:
        >>> row = {"images": 5, "channels": 64, "size": 28, "torch forward": 2.0,
        ...        "fused forward": 1.0, "torch fwd+bwd": 6.0, "fused fwd+bwd": 2.0}
        >>> print(render({"machine": "m", "rows": [row], "runs": 9}).splitlines()[-1])
        | 5x64x28x28 | 2.00 | 1.00 | 2.00x | 6.00 | 2.00 | 3.00x |
    """
    lines = [
        f"Machine: {results['machine']}; one thread, medians of {results['runs']} interleaved "
        "rounds, channels-last. ms of BatchNorm (batch statistics) -> 2x2 max-pool -> ReLU "
        "on the activation named (in the first rows, with the 3x3 convolution that makes it "
        "from 1-channel images: conv4's first block).",
        "",
        "| activation | torch forward | fused forward | speed-up | torch fwd+bwd | fused fwd+bwd "
        "| speed-up |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results["rows"]:
        shape = f"{r['images']}x{r['channels']}x{r['size']}x{r['size']}"
        if r.get("first"):
            shape = f"{shape}, with the 1-channel conv before it"
        fwd = r["torch forward"], r["fused forward"]
        both = r["torch fwd+bwd"], r["fused fwd+bwd"]
        lines.append(
            f"| {shape} | {fwd[0]:.2f} | {fwd[1]:.2f} | {fwd[0] / fwd[1]:.2f}x | "
            f"{both[0]:.2f} | {both[1]:.2f} | {both[0] / both[1]:.2f}x |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Command line entry: measure, print, and with ``--record`` append to RESULTS.md."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test")
    parser.add_argument("--record", action="store_true", help="append to RESULTS.md")
    args = parser.parse_args(argv)
    results = measure(args.quick)
    text = render(results)
    print(text)
    if args.record and not args.quick:
        append_section("Fused BatchNorm-pool-ReLU kernel, one block (issue 7)", text)
    return results


if __name__ == "__main__":
    main()
