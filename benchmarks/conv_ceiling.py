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

``--in-workloads`` measures the same bound inside the workloads themselves: it runs one
thread of metaml's (b) settings (the ordinary loop) and (c), times their steps, and sums the
time their convolution kernels take under ``torch.profiler``. The convolutions' FLOPs over
that time is the fraction of peak the workload would reach if everything but its
convolutions took no time at all.

Run from the repository root (quiet machine)::

    flock /tmp/metaml-heavy.lock python -m benchmarks.conv_ceiling --record [--channels-last]
    flock /tmp/metaml-heavy.lock python -m benchmarks.conv_ceiling --record --in-workloads
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.common import append_section, machine
from benchmarks.run import CONV4, conv4_spec, matmul_peak, seconds_per_call
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


# The aten kernels that run convolutions on the CPU (forward, backward, and inside the double
# backward); their wrappers (aten::convolution, aten::_convolution) take no time of their own.
CONV_KERNELS = frozenset(
    {"aten::mkldnn_convolution", "aten::convolution_backward", "aten::slow_conv2d_forward",
     "aten::_slow_conv2d_backward", "aten::thnn_conv2d"}
)  # fmt: skip


def conv_flops(step: Callable[[], Any]) -> float:
    """FLOPs of the convolutions (forward, backward, double backward) in one call of ``step``.

    Example:
        >>> x, w = torch.randn(2, 3, 8, 8), torch.randn(4, 3, 3, 3)
        >>> # 2 images x 4 filters x 64 positions x 27 multiply-adds x 2; the matmul is left out
        >>> conv_flops(lambda: F.conv2d(x, w, padding=1) @ torch.randn(8, 8))
        27648.0
    """
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    counts = counter.get_flop_counts().get("Global", {})
    return float(sum(n for op, n in counts.items() if "convolution" in str(op)))


def conv_kernel_seconds(step: Callable[[], Any], runs: int) -> float:
    """Median seconds per call of ``step`` spent inside :data:`CONV_KERNELS`, under the profiler.

    Example:
        >>> x, w = torch.randn(2, 3, 8, 8), torch.randn(4, 3, 3, 3)
        >>> conv_kernel_seconds(lambda: F.conv2d(x, w), runs=1) > 0
        True
    """
    from torch.profiler import ProfilerActivity, profile

    per_call = []
    for _ in range(runs):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
        kernels = [e for e in prof.key_averages() if e.key in CONV_KERNELS]
        per_call.append(sum(e.self_cpu_time_total for e in kernels) / 1e6)
    return statistics.median(per_call)


def workload_steps(quick: bool) -> dict[str, Callable[[], Any]]:
    """One training step of each one-thread (b) setting (metaml's loop) and of (c).

    Example:
        >>> sorted(workload_steps(quick=True))
        ['conv4-1-fo', 'conv4-1-so', 'conv4-5-fo', 'conv4-5-so', 'protonet']
    """
    from benchmarks.speed_workloads import conv4_model, metaml_maml, protonet_impl, random_batch

    steps = {}
    for name in CONV4:
        spec = conv4_spec(name, quick)
        args = ("classification", spec.inner_lr, spec.steps, spec.first_order)
        steps[name] = metaml_maml(conv4_model(spec), random_batch(spec), *args, vectorize="loop")
    steps["protonet"] = protonet_impl(ways=5 if quick else 20, queries=2 if quick else 15)[0]
    return steps


def measure_in_workloads(quick: bool = False) -> dict[str, Any]:
    """Each workload's step time, its convolution kernels' share and both rates' fractions of a
    matmul peak measured right after it, on one thread with freed memory reused."""
    torch.set_num_threads(1)
    reused = reuse_cpu_memory()
    runs = 1 if quick else 5
    rows = []
    for name, step in workload_steps(quick).items():
        for _ in range(1 if quick else 3):  # warm-up: oneDNN's kernels, the heap
            step()
        flops = conv_flops(step)
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        rows.append(
            {"workload": name, "conv_flops": flops, "step_s": statistics.median(times),
             "peak": matmul_peak(torch.float32, 256 if quick else 1024, runs=1 if quick else 3),
             "conv_s": conv_kernel_seconds(step, runs)}
        )  # fmt: skip
    return {"machine": machine(), "rows": rows, "reuse_cpu_memory": reused}


def render_in_workloads(results: dict[str, Any]) -> str:
    """The Markdown section for RESULTS.md of :func:`measure_in_workloads`."""
    lines = [
        f"Machine: {results['machine']}; one thread; metaml's loop for (b); freed memory "
        f"{'reused' if results.get('reuse_cpu_memory') else 'returned (default)'}. Rates count "
        "the convolutions' FLOPs only; the peak is a 1024x1024 fp32 matmul timed right after "
        "each workload.",
        "",
        "| workload | step (s) | in convolution kernels (s) | GFLOP/s, whole step | "
        "GFLOP/s, convolutions alone | peak |",
        "|---|---|---|---|---|---|",
    ]
    for r in results["rows"]:
        whole, alone = r["conv_flops"] / r["step_s"] / 1e9, r["conv_flops"] / r["conv_s"] / 1e9
        lines.append(
            f"| {r['workload']} | {r['step_s']:.3f} | {r['conv_s']:.3f} "
            f"({r['conv_s'] / r['step_s']:.0%}) | {whole:.1f} ({whole / r['peak']:.0%}) | "
            f"{alone:.1f} ({alone / r['peak']:.0%}) | {r['peak']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Command line entry: measure, print, and with ``--record`` append to RESULTS.md."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test")
    parser.add_argument("--record", action="store_true", help="append to RESULTS.md")
    parser.add_argument("--channels-last", action="store_true", help="channels-last images")
    parser.add_argument(
        "--in-workloads", action="store_true", help="the convolutions' share inside (b) and (c)"
    )
    args = parser.parse_args(argv)
    if args.in_workloads:
        results = measure_in_workloads(args.quick)
        text = render_in_workloads(results)
        print(text)
        if args.record and not args.quick:
            append_section("Convolution kernels inside the workloads (issue 7)", text)
        return results
    results = measure(args.quick, args.channels_last)
    text = render(results)
    print(text)
    if args.record and not args.quick:
        layout = ", channels-last" if args.channels_last else ""
        append_section(f"Convolution ceiling of conv4 (issue 7{layout})", text)
    return results


if __name__ == "__main__":
    main()
