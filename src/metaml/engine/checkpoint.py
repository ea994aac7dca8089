"""Checkpoints: safetensors for tensors, JSON for everything else, no pickle anywhere.

A checkpoint named ``NAME`` (``step-N`` or ``best``) is two files in ``RUN_DIR/checkpoints/``:

``NAME.safetensors``
    every tensor, under one key prefix per owner:

    * ``model/<state_dict key>``: the model's parameters and buffers;
    * ``optim/<param index>/<state key>``: the optimizer's tensor state (Adam's ``exp_avg``,
      ``exp_avg_sq`` and its ``step`` counter, SGD's ``momentum_buffer``, ...);
    * ``rng/torch``: the torch CPU generator; ``rng/cuda/<i>``: each CUDA generator (when CUDA
      is initialised); ``rng/numpy``, ``rng/python``: the global NumPy and ``random`` states.

``NAME.json``
    ``format``, ``step``, ``sampler`` (``position``: the index of the next batch to draw, and
    ``seed``), ``optimizer`` (``param_groups`` and non-tensor state), ``scheduler`` (its
    ``state_dict`` when one was given), ``best`` (``{"metric", "value", "step"}`` or ``null``),
    ``rng`` (the non-tensor parts of the NumPy/``random`` states), ``metadata`` (free-form) and
    ``weights``: the file name and SHA-256 of ``NAME.safetensors``.

Both files are written atomically, weights first and JSON last, so a checkpoint exists exactly
when its JSON exists and the JSON's checksum matches the weights. :func:`latest_checkpoint` skips
steps whose JSON is missing or unreadable or whose weights are missing or do not match, and falls
back to the previous step; a crash at any moment therefore costs at most the work since the last
complete checkpoint.

Example:
    >>> import tempfile, pathlib, torch
    >>> run = pathlib.Path(tempfile.mkdtemp())
    >>> net = torch.nn.Linear(2, 1)
    >>> opt = torch.optim.Adam(net.parameters())
    >>> _ = save_checkpoint(run, 10, net, opt)
    >>> latest_checkpoint(run).name
    'step-10.json'
    >>> load_checkpoint(latest_checkpoint(run), net, opt).step
    10
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from metaml.errors import UserError
from metaml.io import atomic_write, atomic_write_json

FORMAT = "metaml-checkpoint/1"
_STEP_JSON = re.compile(r"^step-(\d+)\.json$")
_STEP_FILE = re.compile(r"^step-(\d+)\.(json|safetensors)$")


@dataclass
class CheckpointState:
    """What :func:`load_checkpoint` restores besides the tensors it copies in place.

    ``sampler_position`` is the index of the next batch to draw (equal to ``step`` for the
    trainer, where step ``s`` trained on batch ``s - 1``).
    """

    path: Path
    step: int
    sampler_position: int
    sampler_seed: int | None = None
    best: dict[str, Any] | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    selection: dict[str, Any] | None = None  # task selection state (class weights, tracker)


def checkpoint_dir(run_dir: str | Path) -> Path:
    """The folder that holds a run's checkpoints: ``RUN_DIR/checkpoints``.

    Example:
        >>> checkpoint_dir("runs/a").as_posix()
        'runs/a/checkpoints'
    """
    return Path(run_dir) / "checkpoints"


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model: nn.Module,
    optimizer: Optimizer | None = None,
    scheduler: LRScheduler | None = None,
    *,
    sampler_position: int | None = None,
    sampler_seed: int | None = None,
    best: dict[str, Any] | None = None,
    metadata: dict[str, Any] | None = None,
    name: str | None = None,
    keep: int | None = None,
    selection: dict[str, Any] | None = None,
) -> Path:
    """Write checkpoint ``name`` (default ``step-{step}``) and return the path of its JSON.

    ``keep`` prunes ``step-*`` checkpoints down to the newest ``keep`` afterwards (``best``
    is never pruned). ``sampler_position`` defaults to ``step``. ``selection`` (plain JSON: the
    training sampler's class weights and the hard-selection tracker) is stored under
    ``sampler.selection`` when given.

    Example:
        >>> import tempfile, pathlib, torch
        >>> run = pathlib.Path(tempfile.mkdtemp())
        >>> save_checkpoint(run, 3, torch.nn.Linear(2, 1)).name
        'step-3.json'
    """
    folder = checkpoint_dir(run_dir)
    name = name or f"step-{step}"
    tensors = {f"model/{key}": value for key, value in model.state_dict().items()}
    optim_json, optim_tensors = _split_optimizer(optimizer) if optimizer is not None else (None, {})
    rng_json, rng_tensors = _capture_rng()
    tensors = {k: _cpu_copy(v) for k, v in {**tensors, **optim_tensors, **rng_tensors}.items()}
    blob = safetensors.torch.save(tensors, metadata={"format": FORMAT})

    # Weights first, JSON last: the JSON is the commit record of the checkpoint.
    weights = folder / f"{name}.safetensors"
    atomic_write(weights, lambda tmp: _write_bytes(tmp, blob))
    record = {
        "format": FORMAT,
        "step": step,
        "sampler": {
            "position": step if sampler_position is None else sampler_position,
            "seed": sampler_seed,
            **({"selection": selection} if selection is not None else {}),
        },
        "optimizer": optim_json,
        "scheduler": _scheduler_state(scheduler),
        "best": best,
        "rng": rng_json,
        "metadata": metadata or {},
        "weights": {"file": weights.name, "sha256": hashlib.sha256(blob).hexdigest()},
    }
    path = folder / f"{name}.json"
    atomic_write_json(path, record)
    if keep is not None:
        prune_checkpoints(run_dir, keep)
    return path


def load_checkpoint(
    path: str | Path,
    model: nn.Module,
    optimizer: Optimizer | None = None,
    scheduler: LRScheduler | None = None,
    *,
    restore_rng: bool = True,
) -> CheckpointState:
    """Copy a checkpoint into ``model`` (and ``optimizer``, ``scheduler``, the global RNGs).

    ``path`` is the checkpoint's ``.json`` (or its ``.safetensors``, or the path without a
    suffix). Tensors are copied into the existing ones, so the model keeps its device.
    Pass ``restore_rng=False`` to load weights without touching the global random state.

    Example:
        >>> import tempfile, pathlib, torch
        >>> run = pathlib.Path(tempfile.mkdtemp())
        >>> path = save_checkpoint(run, 5, torch.nn.Linear(2, 1))
        >>> load_checkpoint(path, torch.nn.Linear(2, 1), restore_rng=False).step
        5
    """
    path = Path(path).with_suffix(".json")
    record = _read_record(path)
    if record is None:
        raise UserError(f"checkpoint {str(path)!r} is missing or corrupt; use an earlier one")
    tensors = safetensors.torch.load(_read_weights(path, record))
    _load_model(model, _strip(tensors, "model/"), path)
    if optimizer is not None:
        _load_optimizer(optimizer, record["optimizer"], _strip(tensors, "optim/"), path)
    if scheduler is not None and record.get("scheduler") is not None:
        scheduler.load_state_dict(record["scheduler"])
    if restore_rng:
        _restore_rng(record["rng"], _strip(tensors, "rng/"))
    sampler = record.get("sampler") or {}
    return CheckpointState(
        path=path,
        step=int(record["step"]),
        sampler_position=int(sampler.get("position", record["step"])),
        sampler_seed=sampler.get("seed"),
        best=record.get("best"),
        metadata=record.get("metadata") or {},
        selection=sampler.get("selection"),
    )


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The JSON path of the newest complete, uncorrupted ``step-N`` checkpoint, or ``None``.

    Example:
        >>> import tempfile
        >>> latest_checkpoint(tempfile.mkdtemp()) is None
        True
    """
    for _, path in reversed(_step_jsons(run_dir)):
        record = _read_record(path)
        if record is not None and _weights_ok(path, record):
            return path
    return None


def require_checkpoint(run_dir: str | Path) -> Path:
    """Like :func:`latest_checkpoint`, but a run without one is a :class:`UserError`.

    Example:
        >>> import tempfile
        >>> require_checkpoint(tempfile.mkdtemp())
        Traceback (most recent call last):
        ...
        metaml.errors.UserError: ... has no checkpoint; start a new run with metaml train CONFIG
    """
    path = latest_checkpoint(run_dir)
    if path is None:
        raise UserError(
            f"run directory {str(run_dir)!r} has no checkpoint; "
            "start a new run with metaml train CONFIG"
        )
    return path


def prune_checkpoints(run_dir: str | Path, keep: int) -> None:
    """Delete all but the newest ``keep`` ``step-N`` checkpoints, and orphaned weights files.

    Example:
        >>> import tempfile, pathlib, torch
        >>> run = pathlib.Path(tempfile.mkdtemp())
        >>> for s in (1, 2, 3):
        ...     _ = save_checkpoint(run, s, torch.nn.Linear(1, 1))
        >>> prune_checkpoints(run, 1)
        >>> sorted(p.name for p in checkpoint_dir(run).iterdir())
        ['step-3.json', 'step-3.safetensors']
    """
    steps = [step for step, _ in _step_jsons(run_dir)]
    kept = set(steps[-keep:]) if keep > 0 else set()
    newest = max(steps, default=-1)
    folder = checkpoint_dir(run_dir)
    # JSON before weights: the checkpoint stops existing before its weights go.
    for suffix in ("json", "safetensors"):
        for path in folder.glob(f"step-*.{suffix}"):
            match = _STEP_FILE.match(path.name)
            # Weights without JSON newer than the newest checkpoint may be a write in progress.
            if match and int(match[1]) not in kept and int(match[1]) <= newest:
                path.unlink(missing_ok=True)


def discard_after(run_dir: str | Path, step: int) -> None:
    """Delete every ``step-N`` file with ``N > step`` (a resumed run rewrites that future).

    Example:
        >>> import tempfile, pathlib, torch
        >>> run = pathlib.Path(tempfile.mkdtemp())
        >>> for s in (1, 2):
        ...     _ = save_checkpoint(run, s, torch.nn.Linear(1, 1))
        >>> discard_after(run, 1)
        >>> latest_checkpoint(run).name
        'step-1.json'
    """
    folder = checkpoint_dir(run_dir)
    for suffix in ("json", "safetensors"):
        for path in folder.glob(f"step-*.{suffix}"):
            match = _STEP_FILE.match(path.name)
            if match and int(match[1]) > step:
                path.unlink(missing_ok=True)


def remove_temporary_files(run_dir: str | Path) -> None:
    """Delete ``.*.tmp`` files that an atomic write left behind when its process was killed."""
    for path in checkpoint_dir(run_dir).glob(".*.tmp"):
        path.unlink(missing_ok=True)


# --- files -------------------------------------------------------------------------------


def _step_jsons(run_dir: str | Path) -> list[tuple[int, Path]]:
    """``(step, json path)`` of every ``step-N.json``, oldest first."""
    folder = checkpoint_dir(run_dir)
    if not folder.is_dir():
        return []
    found = [(int(m[1]), p) for p in folder.iterdir() if (m := _STEP_JSON.match(p.name))]
    return sorted(found)


def _read_record(path: Path) -> dict[str, Any] | None:
    """The parsed JSON of a checkpoint, or ``None`` when missing, unreadable or not ours."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("format") != FORMAT or "weights" not in record:
        return None
    return record


def _weights_ok(path: Path, record: dict[str, Any]) -> bool:
    try:
        _read_weights(path, record)
    except UserError:
        return False
    return True


def _read_weights(path: Path, record: dict[str, Any]) -> bytes:
    """The weights file's bytes, checked against the SHA-256 the JSON recorded."""
    weights = path.parent / record["weights"]["file"]
    try:
        blob = weights.read_bytes()
    except OSError:
        raise UserError(f"checkpoint weights {str(weights)!r} are missing") from None
    if hashlib.sha256(blob).hexdigest() != record["weights"]["sha256"]:
        raise UserError(
            f"checkpoint weights {str(weights)!r} are corrupt (checksum mismatch); "
            "use an earlier checkpoint"
        )
    return blob


def _write_bytes(path: str, blob: bytes) -> None:
    Path(path).write_bytes(blob)


def _cpu_copy(tensor: Tensor) -> Tensor:
    # A copy, so tied weights do not share storage (safetensors refuses shared tensors).
    return tensor.detach().to("cpu", copy=True).contiguous()


def _strip(tensors: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


# --- model -------------------------------------------------------------------------------


def _load_model(model: nn.Module, state: dict[str, Tensor], path: Path) -> None:
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[1:2] or [str(exc)]
        raise UserError(
            f"checkpoint {str(path)!r} does not fit this model ({first[0].strip()}); "
            "load it with the config the run was trained with"
        ) from None


# --- optimizer and scheduler ---------------------------------------------------------------


def _split_optimizer(optimizer: Optimizer) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """An optimizer's ``state_dict`` as (JSON part, tensors keyed ``optim/<index>/<key>``)."""
    state_dict = optimizer.state_dict()
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, entries in state_dict["state"].items():
        for key, value in entries.items():
            if isinstance(value, Tensor):
                tensors[f"optim/{index}/{key}"] = value
            else:
                scalars.setdefault(str(index), {})[key] = value
    return {"param_groups": state_dict["param_groups"], "state": scalars}, tensors


def _load_optimizer(
    optimizer: Optimizer, saved: dict[str, Any] | None, tensors: dict[str, Tensor], path: Path
) -> None:
    if saved is None:
        raise UserError(f"checkpoint {str(path)!r} holds no optimizer state; it cannot be resumed")
    state: dict[int, dict[str, Any]] = {}
    for index, entries in saved["state"].items():
        state.setdefault(int(index), {}).update(entries)
    for name, value in tensors.items():
        index, key = name.split("/", 1)
        state.setdefault(int(index), {})[key] = value
    groups = [
        _retuple(group, current)
        for group, current in zip(saved["param_groups"], optimizer.param_groups, strict=False)
    ]
    try:
        # load_state_dict moves tensors to each parameter's device (Adam keeps `step` as is).
        optimizer.load_state_dict({"state": state, "param_groups": groups})
    except (ValueError, KeyError) as exc:
        raise UserError(
            f"checkpoint {str(path)!r} does not fit this optimizer ({exc}); "
            "resume with the run's own config"
        ) from None


def _retuple(group: dict[str, Any], current: dict[str, Any]) -> dict[str, Any]:
    # JSON turns tuples (Adam's betas) into lists; give them back the type the optimizer uses.
    return {
        k: tuple(v) if isinstance(current.get(k), tuple) and isinstance(v, list) else v
        for k, v in group.items()
    }


def _scheduler_state(scheduler: LRScheduler | None) -> dict[str, Any] | None:
    if scheduler is None:
        return None
    state = scheduler.state_dict()
    try:
        json.dumps(state)
    except TypeError as exc:
        name = type(scheduler).__name__
        raise TypeError(f"{name}.state_dict() is not JSON-serialisable: {exc}") from None
    return state


# --- random state --------------------------------------------------------------------------


def _capture_rng() -> tuple[dict[str, Any], dict[str, Tensor]]:
    """Every global generator a training step may draw from, as (JSON part, tensors)."""
    tensors = {"rng/torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for index, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng/cuda/{index}"] = state
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    tensors["rng/numpy"] = torch.from_numpy(np.asarray(keys, dtype=np.int64))
    version, internal, gauss_next = random.getstate()
    tensors["rng/python"] = torch.tensor(internal, dtype=torch.int64)
    rng_json = {
        "numpy": {
            "kind": kind,
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": {"version": version, "gauss_next": gauss_next},
    }
    return rng_json, tensors


def _restore_rng(saved: dict[str, Any], tensors: dict[str, Tensor]) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [
        tensors[f"cuda/{i}"] for i in range(torch.cuda.device_count()) if f"cuda/{i}" in tensors
    ]
    if cuda:
        torch.cuda.set_rng_state_all(cuda)
    numpy = saved["numpy"]
    keys = tensors["numpy"].numpy().astype(np.uint32)
    np.random.set_state(
        (numpy["kind"], keys, numpy["pos"], numpy["has_gauss"], numpy["cached_gaussian"])
    )
    python = saved["python"]
    random.setstate((python["version"], tuple(tensors["python"].tolist()), python["gauss_next"]))
