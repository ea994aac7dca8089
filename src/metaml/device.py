"""Device selection (``auto`` means CUDA when present, else CPU), what the CPU computes fast,
and CPU memory reuse."""

from __future__ import annotations

import ctypes
import platform
from pathlib import Path

import torch

from metaml.errors import UserError


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """Turn ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:1"`` into a :class:`torch.device`.

    Example:
        >>> resolve_device("cpu")
        device(type='cpu')
    """
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as exc:
        raise UserError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {device!r} asked for but CUDA is not available; use --device cpu")
    return resolved


def _cpuinfo_line(*prefixes: str) -> str | None:
    """The first line of ``/proc/cpuinfo`` that starts with one of ``prefixes``, if any."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(prefixes):
                return line
    except OSError:
        pass
    return None


def cpu_flags() -> str:
    """The CPU's feature flags as the kernel lists them (``/proc/cpuinfo``), else its name.

    Example:
        >>> isinstance(cpu_flags(), str)
        True
    """
    return _cpuinfo_line("flags", "Features") or platform.processor()  # x86, Arm


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else the platform's processor string.

    Example:
        >>> isinstance(cpu_model(), str)
        True
    """
    line = _cpuinfo_line("model name")
    return line.split(":", 1)[1].strip() if line else platform.processor() or "unknown CPU"


# Flags of bf16 dot-product units that oneDNN uses for bf16 matmuls and convolutions: x86's
# AVX-512 BF16 and AMX, Arm's BF16 extension.
_BF16_FLAGS = {"avx512_bf16", "amx_bf16", "bf16"}


def has_fast_bf16(device: str | torch.device = "cpu") -> bool:
    """Whether ``device`` computes bfloat16 matmuls and convolutions in hardware, so that
    ``train.precision: bf16`` is faster than fp32 there.

    On a CPU without bf16 units torch emulates them, and bf16 autocast ran conv4 MAML 8.5x
    slower than fp32 (an AVX2-only AMD EPYC); with AVX-512 BF16 it ran 1.2-1.5x faster
    (docs/speed.md).

    Example:
        >>> isinstance(has_fast_bf16("cpu"), bool)
        True
    """
    device = resolve_device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 0)  # Ampere and later
    if device.type != "cpu":
        return False
    return bool(_BF16_FLAGS & set(cpu_flags().split()))


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_KEEP_BLOCKS_UP_TO = 1 << 30  # 1 GiB: larger than any activation of the shipped models
_NEVER_TRIM = 2**31 - 1  # mallopt takes an int


def reuse_cpu_memory() -> bool:
    """Let torch reuse the memory of freed CPU tensors instead of taking fresh pages from the
    kernel each time; returns whether it applied (on glibc Linux only).

    glibc's ``malloc`` gives every block above its mmap threshold (never more than 32 MiB) its
    own mapping and returns it to the kernel on ``free``. A batch of 320 images through conv4
    makes 64 MiB activations and gradients, so each training step maps them afresh, and the
    kernel zero-fills them 4 KiB page by page: 86,000 page faults per ProtoNet 20-way episode
    on one thread, 640 ms an episode against 377 ms with this. It keeps blocks up to 1 GiB
    inside the process and stops returning the top of the heap, so after a few steps each
    step reuses the memory of the one before (no page faults at all).

    Process-wide and not undone. The cost is memory: the process keeps its high-water mark
    until it exits, and glibc's heap fragments, so the peak can grow: that episode 675 -> 789
    MiB, 5-step MAML (the loop) unchanged, but 1-step MAML batched with ``vmap`` (240 MiB
    tensors) 2273 -> 4371 MiB. Runs apply it (training, evaluation, ``load_learner``) unless
    their config says ``reuse_cpu_memory: false``; set that where memory is tight.
    Other C libraries (musl, macOS, Windows) are left alone and it returns False.

    Example:
        >>> import platform
        >>> reuse_cpu_memory() == (platform.system() == "Linux" and platform.libc_ver()[0] == "glibc")
        True
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)  # the C library this process already runs on
    return bool(
        libc.mallopt(_M_MMAP_THRESHOLD, _KEEP_BLOCKS_UP_TO)
        and libc.mallopt(_M_TRIM_THRESHOLD, _NEVER_TRIM)
    )
