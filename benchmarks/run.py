"""The speed suite: metaml against higher, a plain PyTorch loop and the machine's matmul peak.

Run from the repository root, on a quiet machine (others' heavy jobs take the same lock)::

    flock /tmp/metaml-heavy.lock python -m benchmarks.run          # full, appends to RESULTS.md
    python -m benchmarks.run --quick                                # smoke test, records nothing

Each workload runs in a fresh subprocess (so peak RSS figures do not mix), where every
implementation of it is warmed up and then timed in interleaved rounds (metaml, higher, plain,
metaml, ...), so a change of machine load hits all of them alike; each figure is the median of
the rounds, and ratios are taken between medians of the same subprocess. Peak RSS of workload
(b), 5-step second-order MAML, is measured in one more subprocess per implementation. Every
worker reuses freed CPU memory, as metaml's runs do (``metaml.reuse_cpu_memory``; the
references in the same process gain from it too); ``protonet-default-malloc`` runs (c) without.

Workloads (see docs/speed.md): (a) sinusoid MAML; (b) conv4 MAML 5-way 1-shot, 1 and 5 steps,
second and first order; (c) ProtoNet conv4 20-way 1-shot; (d) test-time adaptation of 600
episodes with 10 steps; (e) episode sampling against the consumption rate of (b); plus the
fp32 and bf16 matmul peak. Each (b) and (c) worker also times a matmul peak probe in its own
interleaved rounds (``peak_probe``), and its fraction of peak is taken against that, measured
under the same machine conditions. Achieved GFLOP/s count the floating-point operations of matmuls
and convolutions (forward, backward and double backward) with ``FlopCounterMode`` on the plain
loop's iteration: the same arithmetic for every implementation.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

import torch

from benchmarks.common import RESULTS, machine
from metaml.device import has_fast_bf16, reuse_cpu_memory
from metaml.nn.fused import fused_kernels, fused_kernels_available

Step = Callable[[], Any]

# The torch thread count of each workload (0: all cores). On the shared 2-core machine one
# thread is faster for the small MLP (per-op overhead dominates; a second thread only adds
# synchronisation), and for conv4 a second thread that competes with other jobs' processes
# stalls every parallel op (measured: see docs/speed.md); --threads overrides.
# The "-all" conv4 workloads give each implementation the whole CPU (set per implementation).
THREADS = {"sinusoid": 1, "conv4": 1, "protonet": 1, "adapt": 1, "sampling": 1, "peak": 0}


def set_threads(workload: str, override: int | None = None) -> int:
    """Set torch's thread count for ``workload`` (0 in :data:`THREADS` means all cores).

    Example:
        >>> set_threads("sinusoid", override=1)
        1
    """
    key = workload.split("-")[0]
    n = (
        override
        if override is not None
        else (0 if workload.endswith("-all") else THREADS.get(key, 0))
    )
    n = n or (os.cpu_count() or 1)
    torch.set_num_threads(n)
    return n


def time_rates(
    impls: dict[str, Step],
    units: float | Mapping[str, float],
    runs: int,
    warmup: int = 1,
    iters: int = 1,
) -> dict[str, list[float]]:
    """``units`` per second of each implementation, ``runs`` interleaved timed rounds each.

    Each round times ``iters`` calls of every implementation in turn, after ``warmup`` untimed
    calls of each. ``units`` is what one call does: one figure for all, or one per name.

    Example:
        >>> rates = time_rates({"a": lambda: None, "b": lambda: None}, units=1, runs=3)
        >>> sorted(rates), len(rates["a"])
        (['a', 'b'], 3)
    """
    per_call = units if isinstance(units, Mapping) else dict.fromkeys(impls, units)
    for step in impls.values():
        for _ in range(warmup):
            step()
    rates: dict[str, list[float]] = {name: [] for name in impls}
    for _ in range(runs):
        for name, step in impls.items():
            start = time.perf_counter()
            for _ in range(iters):
                step()
            rates[name].append(per_call[name] * iters / (time.perf_counter() - start))
    return rates


def count_flops(step: Step) -> float:
    """Floating-point operations of one call of ``step`` (matmuls and convolutions).

    Example:
        >>> a = torch.randn(4, 8)
        >>> count_flops(lambda: a @ torch.randn(8, 16))  # 2 * 4 * 8 * 16
        1024.0
    """
    from torch.utils.flop_counter import FlopCounterMode

    # On torch's kernels: metaml's fused kernel does the same arithmetic, but the counter only
    # sees torch's operators (its module hooks turn the kernel off anyway).
    with FlopCounterMode(display=False) as counter:
        without_fused_kernel(step)()
    return float(counter.get_total_flops())


def conv4_forward_flops(images: int, ways: int, hidden: int = 64, size: int = 28) -> float:
    """Hand count of conv4's forward FLOPs on ``images`` inputs of ``1 x size x size``.

    Each 3x3 convolution costs ``2 * 9 * C_in * C_out * H * W`` per image at its input
    resolution (padding 1 keeps H, W; the 2x2 max-pool then halves them), the head
    ``2 * features * ways``. BatchNorm, ReLU and pooling are not counted (as FlopCounterMode).

    Example:
        >>> round(conv4_forward_flops(1, 5) / 1e6, 2)  # MFLOP per 28x28 image
        19.63
    """
    total, channels, h = 0.0, 1, size
    for _ in range(4):
        total += 2 * 9 * channels * hidden * h * h
        channels, h = hidden, h // 2
    return images * (total + 2 * hidden * h * h * ways)


def seconds_per_call(call: Callable[[], Any], runs: int, min_seconds: float = 0.05) -> float:
    """Median seconds of one call, each run repeating it for about ``min_seconds`` (the number
    of repeats sized from one call after a warm-up).

    Example:
        >>> seconds_per_call(lambda: None, runs=1, min_seconds=0.001) >= 0
        True
    """
    call()
    start = time.perf_counter()
    call()
    reps = max(1, int(min_seconds / max(time.perf_counter() - start, 1e-9)))
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        for _ in range(reps):
            call()
        times.append((time.perf_counter() - start) / reps)
    return statistics.median(times)


def matmul_peak(dtype: torch.dtype, n: int, runs: int) -> float:
    """Median GFLOP/s of an ``n x n`` matmul in ``dtype`` (the machine's practical peak).

    Each timed run repeats the matmul for about 0.2 s, so a slow path (bf16 without bf16
    units) costs seconds, not minutes.

    Example:
        >>> matmul_peak(torch.float32, 64, runs=1) > 0
        True
    """
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    out = torch.empty(n, n, dtype=dtype)
    seconds = seconds_per_call(lambda: torch.mm(a, b, out=out), runs, min_seconds=0.2)
    return 2 * n**3 / seconds / 1e9


PEAK_PROBE = "matmul-peak"


def peak_probe(n: int, threads: int, reps: int = 4) -> tuple[Step, float]:
    """A step of ``reps`` fp32 ``n x n`` matmuls on ``threads`` threads, and its GFLOP.

    Timed in the same interleaved rounds as a workload (:func:`time_rates`, under the name
    :data:`PEAK_PROBE`), it gives the peak that workload's fraction is taken against: measured
    under the same machine conditions, where the ``peak`` worker's one-off figure moved
    between 65 and 82 GFLOP/s from run to run on the shared 2-core machine.

    Example:
        >>> step, gflop = peak_probe(64, threads=torch.get_num_threads(), reps=2)
        >>> step(); gflop == 2 * 2 * 64**3 / 1e9
        True
    """
    a, b = torch.randn(n, n), torch.randn(n, n)
    out = torch.empty(n, n)

    def step() -> None:
        torch.set_num_threads(threads)
        for _ in range(reps):
            torch.mm(a, b, out=out)

    return step, reps * 2 * n**3 / 1e9


def with_peak_probe(
    impls: dict[str, Step], units: float, threads: int, quick: bool
) -> tuple[dict[str, Step], dict[str, float]]:
    """``impls`` plus :func:`peak_probe` on ``threads`` threads, and the units of each (the
    probe's in GFLOP, so its rate is GFLOP/s): the arguments of :func:`time_rates`.

    Example:
        >>> impls, units = with_peak_probe({"a": lambda: None}, 16, 1, quick=True)
        >>> sorted(impls), units["a"]
        (['a', 'matmul-peak'], 16)
    """
    probe, gflop = peak_probe(256 if quick else 1024, threads)
    return {**impls, PEAK_PROBE: probe}, {**dict.fromkeys(impls, units), PEAK_PROBE: gflop}


def split_peak(rates: dict[str, list[float]]) -> dict[str, Any]:
    """Take the probe's GFLOP/s out of ``rates`` (in place) and summarise them.

    Example:
        >>> rates = {"a": [1.0], "matmul-peak": [60.0, 70.0, 80.0]}
        >>> split_peak(rates)["median"], sorted(rates)
        (70.0, ['a'])
    """
    return _summary({PEAK_PROBE: rates.pop(PEAK_PROBE)})[PEAK_PROBE]


def peak_rss_mb() -> float:
    """This process's peak resident set size in MiB (``ru_maxrss``, KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _summary(rates: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    return {
        name: {"median": statistics.median(r), "min": min(r), "max": max(r), "runs": len(r)}
        for name, r in rates.items()
    }


# ---- workers: each runs in its own subprocess and prints one JSON line ---------------------


def worker_peak(quick: bool) -> dict[str, Any]:
    """fp32 and bf16 matmul GFLOP/s with one thread and with all cores."""
    n, runs = (256, 2) if quick else (1024, 7)
    out: dict[str, Any] = {"n": n}
    for threads in sorted({1, os.cpu_count() or 1}):
        torch.set_num_threads(threads)
        out[str(threads)] = {
            "fp32_gflops": matmul_peak(torch.float32, n, runs),
            # bf16 without bf16 units is ~50x slower: a smaller matrix says as much.
            "bf16_gflops": matmul_peak(torch.bfloat16, min(n, 512), runs),
        }
    return out


def peak_at(results: dict[str, Any], threads: int, dtype: str = "fp32") -> float:
    """The measured matmul peak at ``threads`` threads (NaN when not measured).

    Example:
        >>> peak_at({"workloads": {"peak": {"1": {"fp32_gflops": 50.0}}}}, 1)
        50.0
    """
    peak = results["workloads"].get("peak", {}).get(str(threads), {})
    return float(peak.get(f"{dtype}_gflops", float("nan")))


def workload_peak(results: dict[str, Any], name: str) -> float:
    """The fp32 peak workload ``name``'s fraction of peak is taken against: its own interleaved
    :func:`peak_probe` when it has one, else the ``peak`` worker's at its thread count.

    Example:
        >>> results = {"workloads": {"peak": {"1": {"fp32_gflops": 50.0}},
        ...            "c": {"threads": 1, "peak_gflops": {"median": 60.0}}, "d": {"threads": 1}}}
        >>> workload_peak(results, "c"), workload_peak(results, "d")
        (60.0, 50.0)
    """
    workload = results["workloads"][name]
    if "peak_gflops" in workload:
        return float(workload["peak_gflops"]["median"])
    return peak_at(results, workload["threads"])


def worker_sinusoid(quick: bool) -> dict[str, Any]:
    """(a) sinusoid MAML, second order, meta-batch 25, 10-shot, 1 step: meta-iterations/s."""
    from benchmarks.speed_workloads import sinusoid_batch, sinusoid_impls

    impls = sinusoid_impls(sinusoid_batch(25, 10), compile=not quick)  # compiling takes ~1 min
    runs, iters = (2, 2) if quick else (7, 20)
    rates = time_rates(impls, units=1, runs=runs, warmup=2, iters=iters)
    return {"unit": "meta-iterations/s", "rates": _summary(rates)}


def conv4_spec(name: str, quick: bool) -> Any:
    """The :class:`~benchmarks.speed_workloads.Conv4Spec` of (b) workload ``name`` (tiny sizes
    in quick mode).

    Example:
        >>> spec = conv4_spec("conv4-5-fo-all", quick=True)
        >>> spec.steps, spec.first_order, spec.meta_batch
        (5, True, 2)
    """
    from benchmarks.speed_workloads import Conv4Spec

    _, steps, order = name.removesuffix("-all").split("-")  # conv4-<steps>-<so|fo>[-all]
    spec = Conv4Spec(steps=int(steps), first_order=order == "fo")
    if quick:
        spec.meta_batch, spec.hidden, spec.queries = 2, 8, 2
    return spec


def worker_conv4(name: str, quick: bool) -> dict[str, Any]:
    """(b) conv4 MAML: tasks/s and GFLOP/s of every implementation (``-all``: on all cores)."""
    from benchmarks.speed_workloads import (
        conv4_forward,
        conv4_impls,
        conv4_impls_all_cores,
        plain_maml,
        random_batch,
    )

    spec = conv4_spec(name, quick)
    batch = random_batch(spec)
    cores = os.cpu_count() or 1
    # bf16 in every setting where the CPU has bf16 units; without them (~8x slower than fp32)
    # once, where it is cheapest, to show it.
    fast_bf16 = has_fast_bf16("cpu")
    if name.endswith("-all"):
        impls = conv4_impls_all_cores(spec, batch, cores, bf16=fast_bf16)
    else:
        # vmap (much slower) once, where it is cheapest, and low-memory where memory matters
        # (5 steps, second order).
        impls = conv4_impls(
            spec, batch, bf16=fast_bf16 or name == "conv4-1-fo", vmap=name == "conv4-1-so",
            low_memory=name == "conv4-5-so",
        )  # fmt: skip
    # FLOPs of one meta-iteration, counted on a separate plain-loop instance (same arithmetic).
    from benchmarks.speed_workloads import conv4_model

    probe = plain_maml(
        conv4_model(spec), batch, "classification", spec.inner_lr, spec.steps, spec.first_order,
        forward=conv4_forward,
    )  # fmt: skip
    flops = count_flops(probe)
    runs = 2 if quick else 5
    threads = cores if name.endswith("-all") else torch.get_num_threads()
    timed, units = with_peak_probe(impls, spec.meta_batch, threads, quick)
    rates = time_rates(timed, units, runs=runs, warmup=1)
    return {
        **({"threads": cores} if name.endswith("-all") else {}),
        "unit": "tasks/s",
        "peak_gflops": split_peak(rates),
        "rates": _summary(rates),
        "flops_per_task": flops / spec.meta_batch,
        "spec": vars(spec),
    }


def worker_rss(name: str, impl: str, quick: bool) -> dict[str, Any]:
    """Peak RSS of two meta-iterations of one implementation of a conv4 workload, alone
    (``floor``: two query passes of one task, less than any implementation does)."""
    from benchmarks.speed_workloads import conv4_impls, conv4_model, query_pass_floor, random_batch

    spec = conv4_spec(name, quick)
    batch = random_batch(spec)
    impls = conv4_impls(spec, batch)  # all built in every process, but only one is run
    step = query_pass_floor(conv4_model(spec), batch) if impl == "floor" else impls[impl]
    before = peak_rss_mb()
    for _ in range(2):
        step()
    return {"impl": impl, "peak_rss_mb": peak_rss_mb(), "rss_before_mb": before}


def worker_protonet(quick: bool) -> dict[str, Any]:
    """(c) ProtoNet conv4 20-way 1-shot 15 queries: episodes/s and GFLOP/s."""
    from benchmarks.speed_workloads import protonet_impl

    step, _ = protonet_impl(queries=2 if quick else 15, ways=5 if quick else 20)
    flops = count_flops(step)
    runs, iters = (2, 1) if quick else (7, 3)
    impls = {"metaml": step}
    fused = fused_kernels_available()  # compiles the kernel here, before anything is timed
    if fused:  # the same episodes on torch's kernels, interleaved: the fused kernel's gain
        impls[UNFUSED] = without_fused_kernel(step)
    timed, units = with_peak_probe(impls, 1, torch.get_num_threads(), quick)
    rates = time_rates(timed, units, runs=runs, warmup=2, iters=iters)
    peak = split_peak(rates)
    return {
        "unit": "episodes/s", "rates": _summary(rates), "flops_per_episode": flops,
        "peak_gflops": peak, "fused_kernel": fused,
    }  # fmt: skip


UNFUSED = "metaml-unfused"


def without_fused_kernel(step: Step) -> Step:
    """``step`` with metaml's fused CPU kernel turned off (torch's kernels instead).

    Example:
        >>> from metaml.nn.fused import fused_kernels_available
        >>> seen = []
        >>> without_fused_kernel(lambda: seen.append(fused_kernels_available()))()
        >>> seen
        [False]
    """

    def unfused() -> Any:
        with fused_kernels(False):
            return step()

    return unfused


def worker_adapt(quick: bool, all_cores: bool = False) -> dict[str, Any]:
    """(d) test-time adaptation of 600 5-way 1-shot episodes, 10 steps: seconds."""
    from benchmarks.speed_workloads import (
        Conv4Spec,
        adaptation_impls,
        adaptation_impls_all_cores,
        random_batch,
    )

    # 600 episodes take about a minute per pass and implementation here: each timed run adapts
    # to 30 of them and the figure is scaled to 600 (seconds grow linearly with episodes).
    episodes_n = 4 if quick else 30
    spec = Conv4Spec(meta_batch=episodes_n, hidden=8 if quick else 64)
    batch = random_batch(spec)
    episodes = [batch.task(i) for i in range(episodes_n)]
    options = {"steps": 2 if quick else 10, "hidden": spec.hidden}
    cores = os.cpu_count() or 1
    if all_cores:
        impls = adaptation_impls_all_cores(episodes, cores, **options)
    else:
        impls = adaptation_impls(episodes, **options)
    runs = 1 if quick else 5
    rates = time_rates(impls, units=1, runs=runs, warmup=0)  # passes/s; seconds = 1/rate
    seconds = {name: sorted(1 / r for r in rs) for name, rs in rates.items()}
    scale = 600 / episodes_n
    seconds = {name: [x * scale for x in s] for name, s in seconds.items()}
    return {
        **({"threads": cores} if all_cores else {}),
        "unit": "seconds for 600 episodes",
        "episodes": 600,
        "episodes_timed": episodes_n,
        "seconds": {
            n: {"median": statistics.median(s), "runs": len(s)} for n, s in seconds.items()
        },
    }


def worker_sampling(quick: bool) -> dict[str, Any]:
    """(e) EpisodeSampler.batch for (b)'s episodes: tasks/s."""
    from metaml.data import load
    from metaml.tasks import EpisodeSampler

    root = os.environ.get("METAML_OMNIGLOT", "/work/shared/data/omniglot")
    source = "omniglot-small"
    try:
        ds = load("omniglot-small", root=root)
    except Exception:
        from metaml.data import ClassDataset

        images = torch.randint(0, 255, (200 * 20, 1, 28, 28), dtype=torch.uint8)
        ds = ClassDataset(images, torch.arange(4000) // 20, [f"c{i}" for i in range(200)])
        source = "synthetic (no omniglot-small)"
    sampler = EpisodeSampler(
        ds,
        ways=5,
        shots=1,
        queries=15,
        meta_batch_size=16,
        seed=0,
        rotations=True,  # type: ignore[arg-type]
    )
    counter = iter(range(10**9))
    runs, iters = (2, 1) if quick else (7, 20)
    rates = time_rates({"sampler": lambda: sampler.batch(next(counter))}, 16, runs, 1, iters)
    return {"unit": "tasks/s", "rates": _summary(rates), "source": source}


def run_worker(
    name: str, quick: bool, impl: str | None, threads_override: int | None = None
) -> dict[str, Any]:
    """Dispatch a worker by workload name (one thread in quick mode: a smoke test on a busy box).

    Every worker reuses freed CPU memory, as metaml's runs do (:func:`metaml.reuse_cpu_memory`;
    the references in the same process gain from it alike), except a ``-default-malloc``
    workload, which runs its workload under glibc's defaults to show the difference.
    """
    reused = False if name.endswith(DEFAULT_MALLOC) else reuse_cpu_memory()
    workload, name = name, name.removesuffix(DEFAULT_MALLOC)
    threads = set_threads(name, 1 if quick else threads_override)
    start = time.perf_counter()
    if impl is not None:
        result = worker_rss(name, impl, quick)
    elif name == "peak":
        result = worker_peak(quick)
    elif name == "sinusoid":
        result = worker_sinusoid(quick)
    elif name.startswith("conv4-"):
        result = worker_conv4(name, quick)
    elif name == "protonet":
        result = worker_protonet(quick)
    elif name in ("adapt", "adapt-all"):
        result = worker_adapt(quick, all_cores=name == "adapt-all")
    elif name == "sampling":
        result = worker_sampling(quick)
    else:
        raise SystemExit(f"unknown workload {name!r}")
    result.update(
        workload=workload,
        threads=result.get("threads", threads),
        peak_rss_mb=result.get("peak_rss_mb", peak_rss_mb()),
        wall_s=time.perf_counter() - start,
        reuse_cpu_memory=reused,
    )
    return result


# ---- the driver ------------------------------------------------------------------------------

CONV4 = ["conv4-1-so", "conv4-5-so", "conv4-1-fo", "conv4-5-fo"]
CONV4_ALL = [f"{name}-all" for name in CONV4]
DEFAULT_MALLOC = "-default-malloc"
WORKLOADS = [
    "peak", "sinusoid", *CONV4, *CONV4_ALL, "protonet", f"protonet{DEFAULT_MALLOC}", "adapt",
    "adapt-all", "sampling",
]  # fmt: skip
RSS_IMPLS = ["metaml-loop", "metaml-lowmem", "higher", "plain", "floor"]


def spawn(
    name: str, quick: bool, impl: str | None = None, threads: int | None = None
) -> dict[str, Any]:
    """Run one worker in a fresh interpreter and return its JSON result."""
    cmd = [sys.executable, "-m", "benchmarks.run", "--worker", name]
    cmd += ["--quick"] if quick else []
    cmd += ["--threads", str(threads)] if threads else []
    cmd += ["--impl", impl] if impl else []
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"worker {name} {impl or ''} failed:\n{done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def run_suite(
    quick: bool, only: list[str] | None = None, threads: int | None = None
) -> dict[str, Any]:
    """Run every workload (or ``only`` those) and return the collected results.

    Example:
        >>> # results = run_suite(quick=True); results["workloads"]["sinusoid"]["rates"]
    """
    names = [w for w in WORKLOADS if only is None or w in only]
    out: dict[str, Any] = {
        "machine": machine(),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "quick": quick,
        "load_before": os.getloadavg()[0],
        "workloads": {},
        "rss": {},
    }
    for name in names:
        print(f"[benchmarks.run] {name} ...", file=sys.stderr, flush=True)
        out["workloads"][name] = spawn(name, quick, threads=threads)
    if only is None or "rss" in only:
        for impl in RSS_IMPLS:
            print(f"[benchmarks.run] rss conv4-5-so {impl} ...", file=sys.stderr, flush=True)
            out["rss"][impl] = spawn("conv4-5-so", quick, impl, threads=threads)
    out["load_after"] = os.getloadavg()[0]
    return out


def _best_metaml(rates: dict[str, dict[str, float]], precision: str = "") -> tuple[str, float]:
    cands = {
        n: r["median"]
        for n, r in rates.items()
        if n.startswith("metaml") and n.endswith("bf16") == (precision == "bf16")
    }
    name = max(cands, key=lambda n: cands[n])
    return name, cands[name]


def _best_reference(
    figures: dict[str, dict[str, float]], name: str, lower_is_better: bool = False
) -> tuple[float, str]:
    """The better of a reference's thread settings (``name``, ``name-1thread``) and its cell.

    Example:
        >>> _best_reference({"higher": {"median": 4.0}, "higher-1thread": {"median": 5.0}}, "higher")
        (5.0, '5.00 (1 thread; 4.00 on all)')
    """
    value = figures[name]["median"]
    single = figures.get(f"{name}-1thread", {}).get("median")
    if single is None:
        return value, f"{value:.2f}"
    if (single < value) if lower_is_better else (single > value):
        return single, f"{single:.2f} (1 thread; {value:.2f} on all)"
    return value, f"{value:.2f} (all threads; {single:.2f} on 1)"


def _fraction(gflops: float, peak: float) -> str:
    return f"{gflops / peak:.0%} of {peak:.1f}"


def render(results: dict[str, Any]) -> str:
    """The Markdown section for RESULTS.md (also printed)."""
    w = results["workloads"]
    cores = os.cpu_count() or 1
    peaks = "; ".join(
        f"{t} thread{'s' if t > 1 else ''}: fp32 {peak_at(results, t):.1f}, "
        f"bf16 {peak_at(results, t, 'bf16'):.1f}"
        for t in sorted({1, cores})
    )
    lines = [
        f"Machine: {results['machine']}; {results['date']}; 1-minute load "
        f"{results['load_before']:.2f} before, {results['load_after']:.2f} after"
        + (" (quick mode: tiny sizes, not a measurement)" if results["quick"] else "")
        + ".",
        "",
        (f"Matmul peak (n={w['peak']['n']}, GFLOP/s) at {peaks}. " if "peak" in w else "")
        + "Fractions of peak below are against the fp32 peak at the workload's own thread "
        "count, measured in the workload's own process by a 1024x1024 matmul timed in its "
        'interleaved rounds (the figure after "of").',
        "",
        "| workload | threads | metaml | higher | plain loop | learn2learn | metaml / higher "
        "| metaml / plain | GFLOP/s | of fp32 peak | peak RSS MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in ["sinusoid", *CONV4, *CONV4_ALL]:
        if name not in w:
            continue
        r = w[name]["rates"]
        best, value = _best_metaml(r)
        hi, hi_cell = _best_reference(r, "higher")
        pl, pl_cell = _best_reference(r, "plain")
        l2l = r.get("learn2learn", {}).get("median")
        gflops = frac = ""
        if "flops_per_task" in w[name]:
            g = value * w[name]["flops_per_task"] / 1e9
            gflops, frac = f"{g:.1f}", _fraction(g, workload_peak(results, name))
        lines.append(
            f"| {name} ({w[name]['unit']}) | {w[name]['threads']} | {value:.2f} ({best}) | "
            f"{hi_cell} | {pl_cell} | {'' if l2l is None else f'{l2l:.2f}'} | {value / hi:.2f}x | "
            f"{value / pl:.2f}x | {gflops} | {frac} | {w[name]['peak_rss_mb']:.0f} |"
        )
        if any(n.endswith("bf16") for n in r):
            bname, bvalue = _best_metaml(r, "bf16")
            lines.append(
                f"| {name} bf16 autocast | {w[name]['threads']} | {bvalue:.2f} ({bname}) | | | | "
                f"{bvalue / hi:.2f}x | {bvalue / pl:.2f}x | "
                f"{bvalue * w[name]['flops_per_task'] / 1e9:.1f} | | |"
            )
    for name, label in (
        ("protonet", "protonet 20w1s (episodes/s)"),
        (
            f"protonet{DEFAULT_MALLOC}",
            "protonet 20w1s, glibc's default malloc (no `reuse_cpu_memory`)",
        ),
    ):
        if name not in w:
            continue
        p = w[name]
        for impl, row in (("metaml", label), (UNFUSED, f"{label}, without the fused kernel")):
            if impl not in p["rates"]:
                continue
            rate = p["rates"][impl]["median"]
            g = rate * p["flops_per_episode"] / 1e9
            lines.append(
                f"| {row} | {p['threads']} | {rate:.2f} | | | | | | {g:.1f} | "
                f"{_fraction(g, workload_peak(results, name))} | {p['peak_rss_mb']:.0f} |"
            )
    if "adapt" in w:
        a = w["adapt"]
        s = a["seconds"]
        # Speed ratios (time of the reference / metaml's), from metaml's faster mode.
        best = min(s["metaml"]["median"], s["metaml-batched"]["median"])
        lines.append(
            f"| adapt 600 episodes x 10 steps (seconds, lower is better; timed on "
            f"{a['episodes_timed']}, scaled) | "
            f"{a['threads']} | {s['metaml']['median']:.1f} (per episode); "
            f"{s['metaml-batched']['median']:.1f} (batched) | {s['higher']['median']:.1f} | "
            f"{s['plain']['median']:.1f} | | "
            f"{s['higher']['median'] / best:.2f}x | {s['plain']['median'] / best:.2f}x | | | "
            f"{a['peak_rss_mb']:.0f} |"
        )
    if "adapt-all" in w:
        a = w["adapt-all"]
        s = a["seconds"]
        mine = s["metaml-taskthreads"]["median"]
        hi, hi_cell = _best_reference(s, "higher", lower_is_better=True)
        pl, pl_cell = _best_reference(s, "plain", lower_is_better=True)
        lines.append(
            f"| adapt-all, the same on the whole CPU (seconds) | {a['threads']} | {mine:.1f} "
            f"(task threads); {s['metaml']['median']:.1f} (per episode, all threads) | "
            f"{hi_cell} | {pl_cell} | | {hi / mine:.2f}x | {pl / mine:.2f}x | | | "
            f"{a['peak_rss_mb']:.0f} |"
        )
    lines.append("")
    consumers = [n for n in ("conv4-1-so", "conv4-1-so-all") if n in w]
    if "sampling" in w and consumers:
        sample = w["sampling"]["rates"]["sampler"]["median"]
        consume = max(_best_metaml(w[n]["rates"])[1] for n in consumers)
        lines.append(
            f"Sampling (e): {sample:.0f} tasks/s ({w['sampling']['source']}, rotations, one "
            f"thread) against {consume:.1f} tasks/s consumed by (b) 1-step second order "
            f"(its fastest metaml): {sample / consume:.0f}x."
        )
    if results["rss"]:
        rss = results["rss"]
        cells = ", ".join(f"{k} {v['peak_rss_mb']:.0f}" for k, v in rss.items())
        lines.append(
            f"Peak RSS of 5-step second-order conv4 MAML, each alone in a fresh process (MiB): "
            f"{cells}; metaml-lowmem / higher "
            f"{rss['metaml-lowmem']['peak_rss_mb'] / rss['higher']['peak_rss_mb']:.2f}x; above "
            f"the process's RSS before the first iteration: "
            + ", ".join(f"{k} {v['peak_rss_mb'] - v['rss_before_mb']:.0f}" for k, v in rss.items())
            + "."
        )
        if "floor" in rss:
            lines.append(
                "The floor (one task's query pass, forward and backward, no inner loop: less than "
                f"any implementation does) against the target 0.7x higher: "
                f"{rss['floor']['peak_rss_mb'] / rss['higher']['peak_rss_mb']:.2f}x."
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Command line entry: run the suite (or one worker) and record the results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, 1-2 runs, no record")
    parser.add_argument("--only", default=None, help="comma-separated workloads (and 'rss')")
    parser.add_argument("--record", action="store_true", help="append to RESULTS.md in --quick")
    parser.add_argument("--no-record", action="store_true", help="do not append to RESULTS.md")
    parser.add_argument("--json", default=None, help="also write the raw results here")
    parser.add_argument("--threads", type=int, default=None, help="torch threads everywhere")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--impl", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        result = run_worker(args.worker, args.quick, args.impl, args.threads)
        print(json.dumps(result))
        return result
    only = args.only.split(",") if args.only else None
    results = run_suite(args.quick, only, args.threads)
    text = render(results)
    print(text)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(results, fh, indent=1)
    if (args.record or not args.quick) and not args.no_record:
        with RESULTS.open("a", encoding="utf-8") as fh:
            fh.write(f"\n## Speed suite ({results['date']})\n\n{text}")
    return results


if __name__ == "__main__":
    main()
