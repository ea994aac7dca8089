"""The ceiling torch's CPU convolutions put on conv4's fraction of the matmul peak.

Issue 7 asks conv4 MAML (b) and ProtoNet (c) to reach 70% of the fp32 matmul peak. Their
FLOPs are all in convolutions, but BatchNorm, ReLU, pooling and the optimizer also take
time. So the convolution kernels alone, timed with nothing around them, bound what any
implementation on torch's kernels can reach. This script times every convolution of conv4 (1 to
64 channels, 28x28 down to 3x3 maps, padding 1) at the batch sizes of the workloads: forward,
input gradient and weight gradient (``aten.convolution_backward``), on one thread, beside the
matmul peak measured in the same process. It reports each kernel's GFLOP/s and the combined
rate of one forward and backward pass of all four layers at each batch size.
``--channels-last`` gives the images and gradients channels-last layout, as metaml's conv4
passes have on the CPU (``metaml.nn.channels_last_input``). Freed memory is reused
(``metaml.reuse_cpu_memory``), as in metaml's runs, so that no kernel pays the page faults of
a freshly mapped output (the 320-image first layer did before).

Run from the repository root (quiet machine)::

    flock /tmp/metaml-heavy.lock python -m benchmarks.conv_ceiling --record [--channels-last]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.common import append_section, machine
from benchmarks.run import matmul_peak, seconds_per_call
from metaml.device import reuse_cpu_memory

# (input channels, map size) of conv4's four convolutions on 28x28 inputs, 64 filters each.
LAYERS = [(1, 28), (64, 14), (64, 7), (64, 3)]
# 5: a 5-way 1-shot support set; 75: its 15-query set; 320: a ProtoNet 20-way 1-shot episode.
BATCHES = [5, 75, 320]
KINDS = ("forward", "input grad", "weight grad")


def conv_ops(
    images: int, channels: int, size: int, hidden: int = 64, channels_last: bool = False
) -> dict[str, Callable[[], Any]]:
    """The three kernels of one convolution layer, as zero-argument calls.

    Example:
        >>> sorted(conv_ops(2, 1, 8, hidden=4))
        ['forward', 'input grad', 'weight grad']
    """
    layout = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(images, channels, size, size).clone(memory_format=layout)
    w = torch.randn(hidden, channels, 3, 3)
    grad_out = torch.randn(images, hidden, size, size).clone(memory_format=layout)
    backward = torch.ops.aten.convolution_backward

    def grads(mask: list[bool]) -> Callable[[], Any]:
        return lambda: backward(
            grad_out, x, w, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1, [*mask, False]
        )

    return {
        "forward": lambda: F.conv2d(x, w, padding=1),
        "input grad": grads([True, False]),
        "weight grad": grads([False, True]),
    }


def measure(quick: bool = False, channels_last: bool = False) -> dict[str, Any]:
    """GFLOP/s of every kernel and of each batch size's whole pass, and the matmul peak."""
    torch.set_num_threads(1)
    reused = reuse_cpu_memory()
    hidden, runs = (8, 2) if quick else (64, 7)
    batches = [5] if quick else BATCHES
    peak = matmul_peak(torch.float32, 256 if quick else 1024, runs=runs)
    rows = []
    for images in batches:
        for channels, size in LAYERS:
            flops = 2 * 9 * channels * hidden * size * size * images
            ops = conv_ops(images, channels, size, hidden, channels_last)
            for kind, call in ops.items():
                seconds = seconds_per_call(call, runs, 0.005 if quick else 0.05)
                rows.append(
                    {"images": images, "channels": channels, "size": size, "kind": kind,
                     "flops": flops, "seconds": seconds}
                )  # fmt: skip
    passes = {}
    for images in batches:
        # One forward and backward of all four layers; the first layer needs no input grad.
        mine = [
            r for r in rows
            if r["images"] == images and not (r["channels"] == 1 and r["kind"] == "input grad")
        ]  # fmt: skip
        passes[images] = sum(r["flops"] for r in mine) / sum(r["seconds"] for r in mine) / 1e9
    layout = "channels-last" if channels_last else "default (NCHW)"
    return {
        "machine": machine(), "layout": layout, "peak": peak, "rows": rows, "passes": passes,
        "reuse_cpu_memory": reused,
    }  # fmt: skip


def render(results: dict[str, Any]) -> str:
    """The Markdown section for RESULTS.md."""
    peak = results["peak"]
    lines = [
        f"Machine: {results['machine']}; one thread; {results['layout']} layout; "
        f"freed memory {'reused' if results.get('reuse_cpu_memory') else 'returned (default)'}; "
        f"fp32 matmul peak {peak:.1f} GFLOP/s.",
        "",
        "| images | layer (in channels, map) | " + " | ".join(KINDS) + " |",
        "|---|---|---|---|---|",
    ]
    for images in sorted({r["images"] for r in results["rows"]}):
        for channels, size in LAYERS:
            cells = []
            for kind in KINDS:
                (r,) = [
                    r for r in results["rows"]
                    if (r["images"], r["channels"], r["size"], r["kind"]) == (images, channels, size, kind)
                ]  # fmt: skip
                rate = r["flops"] / r["seconds"] / 1e9
                cells.append(f"{rate:.1f} ({rate / peak:.0%})")
            lines.append(f"| {images} | {channels}, {size}x{size} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(
        "Forward and backward of all four convolutions, convolutions alone: "
        + "; ".join(
            f"{images} images {rate:.1f} GFLOP/s ({rate / peak:.0%} of peak)"
            for images, rate in results["passes"].items()
        )
        + "."
    )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Command line entry: measure, print, and with ``--record`` append to RESULTS.md."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test")
    parser.add_argument("--record", action="store_true", help="append to RESULTS.md")
    parser.add_argument("--channels-last", action="store_true", help="channels-last images")
    args = parser.parse_args(argv)
    results = measure(args.quick, args.channels_last)
    text = render(results)
    print(text)
    if args.record and not args.quick:
        layout = ", channels-last" if args.channels_last else ""
        append_section(f"Convolution ceiling of conv4 (issue 7{layout})", text)
    return results


if __name__ == "__main__":
    main()
