"""The run config: pydantic models loaded from YAML, with ``--set a.b=value`` overrides.

A run is fully described by one :class:`RunConfig`. Unknown keys are rejected with a
did-you-mean suggestion; the fully resolved config is saved as ``config.yaml`` in the run
directory so that re-running it reproduces the run.

Example:
    >>> cfg = load_config(None, ["algorithm.name=maml", "train.steps=5"])
    >>> cfg.train.steps, cfg.algorithm.name
    (5, 'maml')
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from metaml.errors import UserError, did_you_mean


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SelectionConfig(_Strict):
    """Options of ``data.task_selection``; a ``null`` option takes its mode's default.

    ``nearest`` uses ``target``, ``target_root``, ``target_examples``, ``temperature`` and
    ``uniform_mix``; ``hard`` uses ``decay``, ``uniform_mix`` and ``update_every``. Setting an
    option the chosen mode does not use is an error (it would silently do nothing).
    """

    target: str | None = Field(
        None,
        description="nearest: 'test' (this run's test classes, transductive) or a dataset "
        "name or spec whose classes are the target",
    )
    target_root: str | None = Field(None, description="nearest: root of a target dataset")
    target_examples: int | None = Field(
        None, ge=1, description="nearest: examples per target class, the first ones (default 1)"
    )
    temperature: float | None = Field(
        None, gt=0, description="nearest: softmax temperature, times the median distance (0.1)"
    )
    uniform_mix: float | None = Field(
        None, ge=0, le=1, description="share of the draws spread uniformly over all classes (0.1)"
    )
    decay: float | None = Field(
        None, ge=0, lt=1, description="hard: moving-average decay of each class's error (0.9)"
    )
    update_every: int | None = Field(
        None, ge=1, description="hard: training steps between class-weight refreshes (10)"
    )


#: Which options each task selection reads (the others must stay null).
SELECTION_OPTIONS = {
    "uniform": (),
    "nearest": ("target", "target_root", "target_examples", "temperature", "uniform_mix"),
    "hard": ("decay", "uniform_mix", "update_every"),
}
#: Learners whose meta_loss exposes the query outputs that ``hard`` selection reads.
HARD_SELECTION_ALGORITHMS = ("maml", "fomaml", "metasgd", "anil", "reptile", "protonet")


class DataConfig(_Strict):
    """Which tasks to sample: the dataset, its split, the episode shape and the class selection."""

    dataset: str = "sinusoid"
    root: str | None = None
    image_size: int | None = None
    ways: int = Field(5, ge=1)
    train_ways: int | None = Field(None, ge=1, description="ways during meta-training (ProtoNet)")
    shots: int = Field(1, ge=1)
    queries: int = Field(15, ge=1)
    train_queries: int | None = Field(
        None, ge=1, description="queries per class during meta-training (default: queries)"
    )
    meta_batch_size: int = Field(4, ge=1)
    rotations: bool = False
    within_group: bool = False
    split_by: Literal["group", "class"] = "group"
    split_fractions: tuple[float, float, float] = (0.6, 0.2, 0.2)
    split_seed: int = 0
    task_selection: Literal["uniform", "nearest", "hard"] = Field(
        "uniform", description="how meta-training draws an episode's classes (docs/kb.md)"
    )
    selection: SelectionConfig = Field(default_factory=SelectionConfig)


class ModelConfig(_Strict):
    """The base learner's network, created by name from the backbone registry."""

    backbone: str = "mlp"
    backbone_options: dict[str, Any] = Field(default_factory=dict)


class _GradientBased(_Strict):
    inner_lr: float = Field(0.01, gt=0)
    inner_steps: int = Field(1, ge=0)
    test_inner_steps: int | None = Field(None, ge=0, description="defaults to inner_steps")
    learn_inner_lr: bool = Field(
        False, description="MAML++ LSLR: one learned rate per step and tensor"
    )
    per_step_bn: bool = Field(False, description="MAML++: separate BatchNorm affine per inner step")
    vectorize: Literal["auto", "vmap", "loop"] = "auto"
    low_memory: bool = Field(
        False,
        description="always the loop with one task's graph alive at a time (never vmap or "
        "compile, which hold the whole meta-batch's graph), and second-order inner steps "
        "recomputed in the backward instead of kept (one step's graph at a time)",
    )
    compile: bool = Field(
        False, description="run the meta-batch through torch.compile (wins for small models)"
    )
    task_threads: int = Field(
        1,
        ge=1,
        description="compute this many of the meta-batch's tasks at once, one per thread "
        "(the loop path; on a CPU, one per core: docs/speed.md)",
    )


class MAMLConfig(_GradientBased):
    name: Literal["maml"] = "maml"
    first_order: bool = False


class FOMAMLConfig(_GradientBased):
    name: Literal["fomaml"] = "fomaml"


class MetaSGDConfig(_GradientBased):
    name: Literal["metasgd"] = "metasgd"
    first_order: bool = False


class ANILConfig(_GradientBased):
    name: Literal["anil"] = "anil"
    first_order: bool = False


class ReptileConfig(_Strict):
    name: Literal["reptile"] = "reptile"
    inner_lr: float = Field(0.001, gt=0)
    inner_steps: int = Field(5, ge=1)
    test_inner_steps: int | None = Field(None, ge=0)
    inner_optimizer: Literal["sgd", "adam"] = "adam"
    inner_batch_size: int | None = Field(None, ge=1, description="minibatch of the support set")
    batched: bool = True


class ProtoNetConfig(_Strict):
    name: Literal["protonet"] = "protonet"
    distance: Literal["euclidean", "cosine"] = "euclidean"


class BaselineConfig(_Strict):
    """Baseline / Baseline++ (Chen et al. 2019): pre-train on all classes, fit a new head per task."""

    name: Literal["baseline"] = "baseline"
    head: Literal["linear", "cosine"] = Field(
        "linear", description="linear = Baseline, cosine = Baseline++"
    )
    finetune_steps: int = Field(100, ge=1)
    finetune_lr: float = Field(0.01, gt=0)
    finetune_batch_size: int = Field(4, ge=1)
    finetune_all: bool = Field(False, description="also fine-tune the backbone (default: frozen)")


class MANNConfig(_Strict):
    """MANN (Santoro et al. 2016): an LSTM controller with an LRUA external memory."""

    name: Literal["mann"] = "mann"
    controller_size: int = Field(200, ge=1, description="LSTM units")
    memory_slots: int = Field(128, ge=1, description="memory rows (N)")
    memory_size: int = Field(40, ge=1, description="row size, also the key size (D)")
    read_heads: int = Field(4, ge=1, description="read heads; n of the least-used weights")
    gamma: float = Field(0.95, ge=0, le=1, description="usage decay")
    key_strength: bool = Field(False, description="learned read sharpness (NTM), not in the paper")
    compile: bool = Field(
        False, description="compile the time step with torch.compile (~1.6x faster training on CPU)"
    )


AlgorithmConfig = Annotated[
    MAMLConfig
    | FOMAMLConfig
    | MetaSGDConfig
    | ANILConfig
    | ReptileConfig
    | ProtoNetConfig
    | BaselineConfig
    | MANNConfig,
    Field(discriminator="name"),
]


class TrainConfig(_Strict):
    """The outer (meta-training) loop."""

    steps: int = Field(1000, ge=1)
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    scheduler: Literal["constant", "cosine", "linear"] = "constant"
    grad_clip: float | None = Field(None, gt=0)
    log_every: int = Field(10, ge=1)
    val_every: int = Field(100, ge=1)
    val_tasks: int = Field(100, ge=1)
    checkpoint_every: int = Field(100, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    precision: Literal["fp32", "bf16"] = Field(
        "fp32",
        description=(
            "bf16: meta_loss under torch.autocast(bfloat16); weights and Adam stay fp32. "
            "Faster only with bf16 units (metaml.device.has_fast_bf16; the trainer warns)"
        ),
    )


class EvalConfig(_Strict):
    """Evaluation on fixed, seeded test episodes."""

    episodes: int = Field(600, ge=1)
    seed: int = 1234
    steps: int | None = Field(None, ge=0, description="test-time inner steps")


class RunConfig(_Strict):
    """Everything that defines a run."""

    name: str = "run"
    seed: int = 0
    device: str = "auto"
    threads: int | None = Field(
        None, ge=1, description="CPU threads for torch (default: torch's own choice)"
    )
    reuse_cpu_memory: bool = Field(
        True,
        description="keep freed CPU tensor memory in the process for the next step (glibc): "
        "no page faults on large activations; the process keeps its peak memory until exit",
    )
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    algorithm: AlgorithmConfig = Field(default_factory=MAMLConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    def to_yaml(self) -> str:
        """The resolved config as YAML (what ``config.yaml`` in a run directory holds).

        Example:
            >>> "inner_lr" in RunConfig().to_yaml()
            True
        """
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Load a YAML config (or the defaults when ``path`` is None) and apply ``key=value`` overrides.

    Values are parsed as YAML, so ``train.lr=1e-4``, ``data.rotations=true`` and
    ``model.backbone_options={hidden: [40, 40]}`` all work.

    Example:
        >>> load_config(None, ["data.shots=5"]).data.shots
        5
    """
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise UserError(
                f"config file {str(path)!r} not found; give a YAML file such as configs/maml-sinusoid.yaml"
            )
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise UserError(f"config file {str(path)!r} is not valid YAML: {exc}") from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise UserError(
                f"config file {str(path)!r} must hold a mapping of keys, got {type(loaded).__name__}"
            )
        raw = loaded or {}
    for item in overrides:
        apply_override(raw, item)
    return config_from_dict(raw)


def config_from_dict(raw: dict[str, Any]) -> RunConfig:
    """Validate a plain dict as a :class:`RunConfig`, turning errors into :class:`UserError`.

    Example:
        >>> config_from_dict({"train": {"steps": 3}}).train.steps
        3
    """
    algorithm = raw.get("algorithm")
    if isinstance(algorithm, dict) and "name" not in algorithm:
        # `--set algorithm.inner_steps=3` alone means the default algorithm, not a missing tag.
        raw = {**raw, "algorithm": {"name": "maml", **algorithm}}
    try:
        cfg = RunConfig.model_validate(raw)
    except ValidationError as exc:
        raise _user_error_from(exc, raw) from None
    check_task_selection(cfg)
    return cfg


def check_task_selection(cfg: RunConfig) -> None:
    """Refuse ``data.task_selection`` combinations that cannot work, naming the fix.

    What needs the data (a task family such as ``sinusoid`` cannot use it) is checked when the
    dataset is loaded (:func:`metaml.runs.build_samplers`).

    Example:
        >>> check_task_selection(RunConfig.model_validate({"data": {"task_selection": "nearest"}}))
        Traceback (most recent call last):
        ...
        metaml.errors.UserError: data.task_selection=nearest needs data.selection.target: ...
    """
    mode, options = cfg.data.task_selection, cfg.data.selection
    unused = [k for k in SelectionConfig.model_fields if k not in SELECTION_OPTIONS[mode]]
    stray = [k for k in unused if getattr(options, k) is not None]
    if stray:
        users = [m for m, keys in SELECTION_OPTIONS.items() if stray[0] in keys]
        raise UserError(
            f"data.selection.{stray[0]} is used by task_selection={' or '.join(users)}, not "
            f"{mode}; remove it or set data.task_selection={users[0]}"
        )
    if mode == "nearest":
        _check_nearest_target(options.target)
    if mode == "hard" and cfg.algorithm.name not in HARD_SELECTION_ALGORITHMS:
        raise UserError(
            f"data.task_selection=hard needs a learner that exposes its query predictions "
            f"({', '.join(HARD_SELECTION_ALGORITHMS)}); {cfg.algorithm.name} does not: use "
            "data.task_selection=uniform or nearest, or another algorithm"
        )


def _check_nearest_target(target: str | None) -> None:
    if target is None:
        raise UserError(
            "data.task_selection=nearest needs data.selection.target: 'test' (this run's test "
            "classes, transductive) or a dataset whose classes are the target (a name or a spec "
            "such as folder:PATH); see docs/kb.md"
        )
    if target in ("train", "val"):
        why = (
            "the training classes are what it chooses among"
            if target == "train"
            else "validation would then score the classes training was steered toward"
        )
        raise UserError(
            f"data.selection.target={target} is not allowed ({why}); use 'test' or a dataset"
        )


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Set ``a.b.c=value`` inside the nested dict ``raw`` (value parsed as YAML).

    Example:
        >>> d = {}
        >>> apply_override(d, "train.lr=0.5")
        >>> d
        {'train': {'lr': 0.5}}
    """
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise UserError(
            f"override {item!r} is not of the form key=value, e.g. --set train.steps=100"
        )
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        value = text
    node = raw
    parts = key.strip().split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise UserError(f"override {item!r}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


def _fields_at(loc: tuple[Any, ...], raw: dict[str, Any]) -> list[str]:
    """The valid field names of the config section that ``loc`` points into."""
    model: type[BaseModel] = RunConfig
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        if field is None:
            break
        if part == "algorithm":
            name = (raw.get("algorithm") or {}).get("name", "maml")
            model = _ALGORITHMS.get(name, MAMLConfig)
            continue
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
    return list(model.model_fields)


_ALGORITHMS: dict[str, type[BaseModel]] = {
    "maml": MAMLConfig,
    "fomaml": FOMAMLConfig,
    "metasgd": MetaSGDConfig,
    "anil": ANILConfig,
    "reptile": ReptileConfig,
    "protonet": ProtoNetConfig,
    "baseline": BaselineConfig,
    "mann": MANNConfig,
}


def _user_error_from(exc: ValidationError, raw: dict[str, Any]) -> UserError:
    lines = []
    for err in exc.errors():
        # Drop the discriminator tag pydantic inserts (algorithm.maml.inner_lr -> algorithm.inner_lr).
        loc = tuple(
            p
            for i, p in enumerate(err["loc"])
            if not (i == 1 and err["loc"][0] == "algorithm" and p in _ALGORITHMS)
        )
        where = ".".join(str(p) for p in loc) or "config"
        if err["type"] == "extra_forbidden":
            hint = did_you_mean(str(loc[-1]), _fields_at(loc, raw))
            lines.append(f"unknown config key {where!r}{hint}; remove it or fix its spelling")
        elif err["type"] == "union_tag_invalid":
            lines.append(
                f"unknown algorithm {raw.get('algorithm', {}).get('name')!r}{did_you_mean(str(raw.get('algorithm', {}).get('name')), _ALGORITHMS)}; known: {', '.join(_ALGORITHMS)}"
            )
        else:
            lines.append(f"config key {where!r}: {err['msg']} (got {err.get('input')!r})")
    return UserError("; ".join(lines))
