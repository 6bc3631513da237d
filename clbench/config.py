"""Typed run configuration: the dataclasses a run is described by, and their validation.

``RunConfig`` holds everything that decides one run's numbers, and its ``key`` is the run's
identity (also its result path). Values from YAML and from the command line go through
``update_dataclass``: an unknown key is an error that lists the valid ones, a value of the wrong
type is an error that names the expected one, never a silent default. A key with a fixed set
of values (an optimizer, a schedule, a method's variant) is declared with ``one_of`` beside its
field, its values listed there once; ``update_dataclass`` refuses any other value, listing them,
so a bad value fails when the recipe is resolved (at plan time), not inside every run. How a
run's configuration is resolved from the recipes is ``clbench.recipes``.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import itertools
import json
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, Sequence, get_args, get_origin, get_type_hints

import yaml

from clbench.errors import ConfigError, did_you_mean


def one_of(default: str, choices: Sequence[str]) -> Any:
    """A string field that takes one of ``choices`` (``default`` among them): the one place its
    valid values are declared, checked by ``update_dataclass`` whenever a value is given."""
    if default not in choices:
        raise ValueError(f"the default '{default}' is not one of {list(choices)}")
    return field(default=default, metadata={"choices": tuple(choices)})


def choice_problem(where: str, value: Any, choices: Sequence[str]) -> str | None:
    """Why ``value`` is not a valid value of key ``where`` (``one_of``), or None."""
    if value in choices:
        return None
    return f"{where} '{value}' is unknown; use one of {', '.join(choices)}{did_you_mean(str(value), choices)}"


def validate(obj: Any, where: str, num_tasks: int | None = None) -> None:
    """Check a configuration dataclass whole: its ``one_of`` keys, then its own
    ``validate(num_tasks)`` hook, where it states the relations between its keys (and with the
    number of tasks of the run, where that is known). Raises ``ConfigError``.
    ``clbench.recipes.resolve_config`` calls it for every section of a run, so the plan refuses
    a bad combination before anything runs; a method checks a ``Config`` built directly too."""
    check_choices(obj, where)
    hook = getattr(obj, "validate", None)
    if hook is not None:
        hook(num_tasks)


def check_choices(obj: Any, where: str) -> None:
    """``ConfigError`` for a ``one_of`` field of dataclass ``obj`` that holds another value (an
    object built directly, not through ``update_dataclass``: a method's ``Config`` in a test)."""
    for f in fields(obj):
        problem = "choices" in f.metadata and choice_problem(f"{where}.{f.name}", getattr(obj, f.name),
                                                             f.metadata["choices"])
        if problem:
            raise ConfigError(problem)


@dataclass
class BackboneConfig:
    """Which pretrained ViT to start from (created by name through timm)."""

    name: str = "vit_base_patch16_224.augreg2_in21k_ft_in1k"  # SD-LoRA's (timm 1.0 default tag)
    pretrained: bool = True
    pretrained_path: str | None = None  # local weights file; wins over the timm/HF cache
    normalize: bool = False  # the official repositories all feed [0, 1] inputs


OPTIMIZERS = ("sgd", "adam", "adamw")  # see methods.base.build_optimizer
SCHEDULES = ("constant", "multistep", "cosine", "coda_cosine")  # see methods.base.build_optimizer
PRECISIONS = ("auto", "bf16", "fp16", "fp32")  # TrainConfig.precision
TEST_ORDERS = ("dataset", "class_sorted")  # DataConfig.test_order
EVAL_SPLITS = ("test", "val")  # DataConfig.eval_on
SAVE_MODEL = ("none", "final", "every-task")  # RunConfig.save_model (--save-model)
LOGGERS = ("tensorboard", "wandb")  # RunConfig.log
ON_DIVERGENCE = ("stop", "continue")  # TrainConfig.on_divergence


@dataclass
class TrainConfig:
    """The per-task optimisation recipe. ``first_task_*`` override the values for task 0."""

    epochs: int = 20
    batch_size: int = 128  # the global batch: one optimizer step per batch
    # Split each batch into micro-batches of this size, one backward each, the losses averaged
    # with equal weight: what DDP computes with batch_size / micro_batch_size devices, on one
    # device. None (or a value >= batch_size): the whole batch at once; a smaller one must
    # divide batch_size.
    micro_batch_size: int | None = None
    eval_batch_size: int = 256
    optimizer: str = one_of("sgd", OPTIMIZERS)
    lr: float = 0.01
    momentum: float = 0.9  # SGD momentum
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # Adam betas
    weight_decay: float = 0.0
    schedule: str = one_of("constant", SCHEDULES)
    milestones: list[int] = field(default_factory=list)  # multistep, in epochs
    lr_decay: float = 0.1  # multistep factor
    min_lr: float = 0.0  # cosine floor
    # Epochs the official code's scheduler lags behind the epoch it trains: epoch e trains at
    # lr(max(e - schedule_offset, 0)). 0: lr(e) in epoch e (a torch scheduler stepped after each
    # epoch). 1: CODA's CosineSchedule (InfLoRA, CODA, PILOT's CODA port) and timm's
    # step(epoch) (HiDe-Prompt), which train the first two epochs at lr(0).
    schedule_offset: int = 0
    first_task_lr: float | None = None
    first_task_milestones: list[int] | None = None
    first_task_lr_decay: float | None = None
    grad_clip: float | None = None  # max gradient norm, none = no clipping
    drop_last: bool = False
    num_workers: int = 4  # DataLoader workers for image-file datasets
    compile: bool = False  # torch.compile each transformer block (regional); pays off on GPU
    # Autocast dtype of the forward: auto (bf16 on CUDA, fp32 elsewhere), bf16, fp16 (with a
    # gradient scaler) or fp32. Every official repository trains in fp32.
    precision: str = one_of("auto", PRECISIONS)
    # A non-finite loss or parameter: "stop" fails the run (no result, its last checkpoint kept);
    # "continue" trains on and records where in the result (``diverged``), for research on it.
    on_divergence: str = one_of("stop", ON_DIVERGENCE)

    def validate(self, num_tasks: int | None = None) -> None:
        """Raise ``ConfigError`` for values no run could use (checked when a run is resolved)."""
        if self.schedule_offset < 0:
            raise ConfigError(f"train.schedule_offset must be >= 0 (epochs the schedule lags), "
                              f"got {self.schedule_offset}")
        micro = self.micro_batch_size
        if micro is not None and (micro < 1 or (micro < self.batch_size and self.batch_size % micro)):
            raise ConfigError(f"train.micro_batch_size={micro} must be >= 1 and divide "
                              f"train.batch_size={self.batch_size} (or be at least it: no split)")

    def for_task(self, task_index: int) -> "TrainConfig":
        """This recipe with the task-0 overrides applied when ``task_index == 0``."""
        if task_index != 0:
            return self
        out = dataclasses.replace(self)
        for name in ("lr", "milestones", "lr_decay"):
            value = getattr(self, f"first_task_{name}")
            if value is not None:
                setattr(out, name, value)
        return out


@dataclass
class DataConfig:
    """Where the data is and how classes are split into tasks."""

    root: str | None = None  # default: $CLBENCH_DATA, then ./data
    initial_classes: int | None = None  # None: N equal tasks
    increment: int | None = None
    image_size: int | None = None  # None: the benchmark's default
    image_cache: bool = False  # decode once to a uint8 memmap, augment on the device (benchmarks/image_cache.py)
    cache_source_size: int | None = None  # side of the cached training images; None: 256 for 224
    # Order of the test images within each task: "dataset" (its own order) or "class_sorted"
    # (class by class, as PILOT's data manager builds its test set, utils/data_manager.py:59-76).
    # Only a prediction that depends on the batch (a batchwise prompt vote) sees the difference.
    test_order: str = one_of("dataset", TEST_ORDERS)
    # What a run evaluates on: "test" (the benchmark's test set), or "val": a validation split
    # carved from the training data (``val_fraction`` of each class's training images, drawn
    # with ``val_seed``; ``clbench.benchmarks.scenario.validation_split``), which the run then
    # does not train on. A "val" run never reads the test set: it is for choosing a
    # configuration (``clbench report --select best-val``) without looking at the test images.
    eval_on: str = one_of("test", EVAL_SPLITS)
    val_fraction: float = 0.1
    val_seed: int = 0

    def validate(self, num_tasks: int | None = None) -> None:
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction must be between 0 and 1 (exclusive), got {self.val_fraction}")
        if self.eval_on == "val" and self.image_cache:
            raise ConfigError("data.eval_on=val with data.image_cache=true is not supported: the image cache "
                              "holds the whole training and test sets; drop one of the two")


# Keys that say how a run executes, not what it computes (the results are the same for any value;
# a method's prediction for one image must not depend on the rest of its batch):
# they stay out of a run's identity: its tag, the check that a checkpoint belongs to it, and
# `collect`'s check that a result on another machine is the same run. ``overrides`` describes the
# tag (the command-line layer it was made from), ``log`` and ``save_model`` say what a run writes
# beside its result, ``plugins`` which modules a worker imports first. ``train.on_divergence`` is
# one too: a run that does not diverge computes the same either way, and one that does writes no
# result unless it is "continue" (which the result then records).
EXECUTION_SETTINGS = (("device",), ("data", "root"), ("train", "num_workers"), ("train", "eval_batch_size"),
                      ("train", "on_divergence"), ("overrides",), ("log",), ("save_model",), ("plugins",))


# Keys that configurations no longer have, with the value every run had when they were dropped
# (``train.first_task_epochs``: set by no recipe). Older result files and checkpoints that hold
# them read as if they did not (``without_retired_keys``), so their runs keep their identity.
RETIRED_KEYS = {("train", "first_task_epochs"): None}


def without_retired_keys(config: dict[str, Any]) -> dict[str, Any]:
    """A copy of a configuration dictionary without the ``RETIRED_KEYS`` that hold their old
    value; a retired key set to anything else stays, and the configuration does not load."""
    out = copy.deepcopy(config)
    for (section, key), value in RETIRED_KEYS.items():
        node = out.get(section)
        if isinstance(node, dict) and key in node and node[key] == value:
            del node[key]
    return out


def without_execution_settings(config: dict[str, Any]) -> dict[str, Any]:
    """A copy of a configuration dictionary (or of a layer of overrides) without the execution
    settings (nor retired keys at their old value); a section that held nothing else is dropped
    (``--set train.num_workers=2`` alone changes no run's identity)."""
    out = without_retired_keys(config)
    for *sections, key in EXECUTION_SETTINGS:
        node = out
        for section in sections:
            node = node.get(section) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(key, None)
        if sections and out.get(sections[0]) == {} and config.get(sections[0]) != {}:
            del out[sections[0]]
    return out


def benchmark_dirname(benchmark: str) -> str:
    """A benchmark's folder in result paths: its name, or for one named by a path
    (``folder:/data/birds``) ``folder-birds-<8 hex digits of the path's SHA-1>``."""
    if ":" not in benchmark:
        return benchmark
    kind, _, where = benchmark.partition(":")
    stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in where.rstrip("/").rsplit("/", 1)[-1])
    return f"{kind}-{stem or 'root'}-{hashlib.sha1(where.encode()).hexdigest()[:8]}"


@dataclass
class RunConfig:
    """Everything that decides one run's numbers; written whole into its result file."""

    benchmark: str
    num_tasks: int
    method: str
    seed: int = 0  # training seed: initialisation, data order, augmentation
    class_order_seed: int = 0  # its own knob: which classes go into which task
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    method_args: dict[str, Any] = field(default_factory=dict)  # validated by the method's Config
    device: str = "auto"
    tag: str = ""  # distinguishes runs with command-line overrides from the recipe's
    overrides: dict[str, Any] = field(default_factory=dict)  # the --set layer the tag stands for
    log: list[str] = field(default_factory=list)  # LOGGERS that mirror the training curves
    save_model: str = "none"  # SAVE_MODEL: keep the trained method beside the result
    plugins: list[str] = field(default_factory=list)  # modules (or .py files) imported before the run

    @property
    def key(self) -> str:
        """The run's identity, also its path below ``runs/`` without the suffix:
        ``<bench>/N<tasks>/<method>[+<tag>]/seed<seed>[-order<class_order_seed>]``."""
        variant = f"{self.method}+{self.tag}" if self.tag else self.method
        seeds = f"seed{self.seed}" if self.class_order_seed == self.seed else \
            f"seed{self.seed}-order{self.class_order_seed}"
        return f"{benchmark_dirname(self.benchmark)}/N{self.num_tasks}/{variant}/{seeds}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def identity(self) -> dict[str, Any]:
        """Everything that decides this run's numbers: ``to_dict()`` without the execution
        settings (``EXECUTION_SETTINGS``)."""
        return without_execution_settings(self.to_dict())

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunConfig":
        d = without_retired_keys(d)
        d["backbone"] = BackboneConfig(**d.get("backbone", {}))
        d["train"] = TrainConfig(**d.get("train", {}))
        d["data"] = DataConfig(**d.get("data", {}))
        return cls(**d)


# ----------------------------------------------------------------------------- validation


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check/convert one value against a type annotation; YAML and CLI both come through here."""
    origin, args = get_origin(annotation), get_args(annotation)
    if value is None:
        if annotation is type(None) or type(None) in args:
            return None
        raise ConfigError(f"{key}: None is not allowed (expected {annotation})")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        return [_coerce(v, inner, key) for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if args and type(None) in args:  # Optional[X] / X | None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0] if len(inner) == 1 else Any, key)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, str):  # YAML 1.1 reads '1e-3' (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    return value


def update_dataclass(obj: Any, updates: dict[str, Any], where: str) -> None:
    """Apply ``updates`` to dataclass ``obj`` in place; unknown keys raise with the valid ones."""
    hints = get_type_hints(type(obj))
    valid = {f.name for f in fields(obj)}
    choices = {f.name: f.metadata["choices"] for f in fields(obj) if "choices" in f.metadata}
    for key, value in updates.items():
        if key not in valid:
            raise ConfigError(
                f"unknown key '{where}.{key}'{did_you_mean(key, valid)}. "
                f"Valid keys in '{where}': {', '.join(sorted(valid))}"
            )
        current = getattr(obj, key)
        if is_dataclass(current) and isinstance(value, dict):
            update_dataclass(current, value, f"{where}.{key}")
        else:
            value = _coerce(value, hints[key], f"{where}.{key}")
            problem = key in choices and choice_problem(f"{where}.{key}", value, choices[key])
            if problem:
                raise ConfigError(problem)
            setattr(obj, key, value)


def build_dataclass(cls: type, values: dict[str, Any], where: str) -> Any:
    obj = cls()
    update_dataclass(obj, values, where)
    return obj


# ----------------------------------------------------------------------------- recipes


def split_values(raw: str) -> list[str]:
    """``'0.005,0.01'`` -> ``['0.005', '0.01']``: the comma-separated values of one ``--set``,
    commas inside brackets or quotes kept (``train.milestones=[10,20]`` is one value)."""
    values, depth, quote, start = [], 0, "", 0
    for i, ch in enumerate(raw):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            values.append(raw[start:i])
            start = i + 1
    values.append(raw[start:])
    return [v.strip() for v in values]


def expand_grid(items: list[str]) -> list[list[str]]:
    """``--set`` items with comma-separated values -> one list of single-valued items per point
    of their product, in order (the last key varies fastest); one point when no item has a list:
    ``['train.lr=0.005,0.01', 'method.rank=4,8']`` -> 4 points."""
    choices = []
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value (e.g. train.lr=0.01), got '{item}'")
        key, raw = item.split("=", 1)
        values = split_values(raw)
        if any(v == "" for v in values) and len(values) > 1:
            raise ConfigError(f"--set {item}: an empty value in the list; write key=v1,v2")
        choices.append([f"{key}={v}" for v in values] if len(values) > 1 else [item])
    return [list(point) for point in itertools.product(*choices)]


def overrides_tag(overrides: dict[str, Any] | None) -> str:
    """The tag of a run with these command-line overrides: ``cfg`` and 8 hex digits of the SHA-1 of
    their identity (execution settings left out); empty when nothing that changes numbers is set."""
    identity = without_execution_settings(overrides or {})
    if not identity:
        return ""
    return "cfg" + hashlib.sha1(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:8]


def flat_overrides(overrides: dict[str, Any]) -> list[tuple[str, Any]]:
    """A nested ``--set`` layer as ``(dotted key, value)`` pairs, in order:
    ``{'train': {'lr': 0.01}}`` -> ``[('train.lr', 0.01)]``."""
    flat: list[tuple[str, Any]] = []

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict) and node:
            for k, v in node.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            flat.append((prefix, node))

    walk("", overrides or {})
    return flat


def set_arguments(overrides: dict[str, Any]) -> str:
    """The ``--set`` arguments that give these overrides: ``--set train.lr=0.01 --set method.rank=8``."""
    def text(node: Any) -> str:
        return json.dumps(node) if isinstance(node, (list, dict, bool)) or node is None else str(node)

    return " ".join(f"--set {key}={text(value)}" for key, value in flat_overrides(overrides)) if overrides else ""


def describe_overrides(overrides: dict[str, Any]) -> str:
    """A ``--set`` layer as a label: ``{'train': {'lr': 0.005}, 'method': {'rank': 8}}`` ->
    ``'lr=0.005 rank=8'``; a key's last part names it unless two keys share that part."""
    if not overrides:
        return ""
    flat = flat_overrides(overrides)
    leaves = [k.rsplit(".", 1)[-1] for k, _ in flat]
    parts = []
    for (key, value), leaf in zip(flat, leaves):
        name = leaf if leaves.count(leaf) == 1 else key
        text = json.dumps(value) if isinstance(value, (list, dict)) else ("null" if value is None else str(value))
        parts.append(f"{name}={text.lower() if isinstance(value, bool) else text}")
    return " ".join(parts)


def parse_set(items: list[str]) -> dict[str, Any]:
    """``['train.lr=0.01', 'method.rank=8']`` -> nested dict; values are parsed as YAML scalars."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value (e.g. train.lr=0.01), got '{item}'")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if len(parts) < 2:
            raise ConfigError(f"--set key '{key}' needs a section: backbone., train., data. or method.")
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = yaml.safe_load(raw)
    return out


def deep_merge(dst: dict[str, Any], src: dict[str, Any]) -> dict[str, Any]:
    """Merge ``src`` into ``dst`` in place, mappings recursively, and return ``dst``."""
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            deep_merge(dst[k], v)
        else:
            dst[k] = v
    return dst


# The sections of a recipe layer and of ``--set`` keys.
SECTIONS = ("backbone", "train", "data", "method")
