"""What a run leaves behind: the typed result record, and where each file of a run lives.

Layout under the results root (``--out``, default ``$CLBENCH_RESULTS`` or ``./results``)::

    runs/<bench>/N<tasks>/<method>[+<tag>]/seed<seed>[-order<order_seed>].json   finished runs
    checkpoints/<same path>.pt         the last finished task of an unfinished run
    models/<same path>/task<t>.pt      the trained method after task t (``--save-model``)
    logs/<same path>/                  TensorBoard event files (``--log tensorboard``)
    status/<same path>.json            how far each run got (``clbench.jobs``), never read by reports
    splits/                            splits a loader had to make (raw ImageNet-R's 80/20)
    tables/, figures/                  written by ``clbench report``

A result file is one ``RunResult`` as JSON, written by ``write_result`` and read by
``read_result`` alone, with ``SCHEMA_VERSION`` and a checksum of its content. A checkpoint is
written by ``write_checkpoint`` and read by ``read_checkpoint``, with ``CHECKPOINT_FORMAT`` and
a checksum of its tensors and counts. A file that does not read back raises ``CorruptFileError``
(its caller moves it aside and redoes the run). Every metric a report shows is recomputed from
its accuracy matrix of counts; the ``metrics`` it carries are for a reader of the file.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from clbench.errors import CorruptFileError, UserError
from clbench.files import atomic_torch_save, atomic_write_json, finite_json, json_checksum, read_checked_json

# 2: the method's and the benchmark's titles travel with the result (``method_info``, ``benchmark_title``),
#    clbench's version and a dirty flag that counts untracked files are in ``environment``.
# 3: each task's training curve (``TaskRecord.epochs``); the config's ``overrides`` (what a tag stands for).
SCHEMA_VERSION = 3
# schema 1 files read with the method's and benchmark's names as titles; 1 and 2 with no curves
READABLE_SCHEMAS = (1, 2, 3)
CHECKPOINT_FORMAT = 1  # a checkpoint without one (written before formats) is read without its checksum


def default_root() -> Path:
    return Path(os.environ.get("CLBENCH_RESULTS", "results"))


def result_path(root: Path, key: str) -> Path:
    return Path(root) / "runs" / f"{key}.json"


def checkpoint_path(root: Path, key: str) -> Path:
    return Path(root) / "checkpoints" / f"{key}.pt"


def model_path(root: Path, key: str, task: int) -> Path:
    """A model kept by ``--save-model``: the method after task ``task`` (0-based)."""
    return Path(root) / "models" / key / f"task{task}.pt"


def log_dir(root: Path, key: str) -> Path:
    """Where ``--log tensorboard`` writes a run's event files."""
    return Path(root) / "logs" / key


@dataclass
class MethodInfo:
    """A method's facts for tables and figures, given at its registration
    (``@register_method(name, title=..., paper_row=..., magnitudes=...)``)."""

    name: str
    title: str = ""  # as the paper's tables write it; empty: the name
    paper_row: int | None = None  # its row in the paper's tables; None: after the paper's methods
    magnitudes: str | None = None  # the ``method_log`` key of learned magnitudes to plot (SD-LoRA's)

    def __post_init__(self) -> None:
        self.title = self.title or self.name


@dataclass
class TaskRecord:
    """One finished task: its classes, time, memory, accuracy, cost and the method's own log."""

    task: int
    classes: list[int]
    train_time_s: float
    eval_time_s: float
    accuracy: float  # over every class seen so far, in percent
    cost: dict[str, Any]  # ``CostReport.to_dict()``
    method_log: dict[str, Any] = field(default_factory=dict)
    cpu_max_rss_mb: float | None = None  # the process's RSS high-water mark: since the task's start (reset
    # by protocol.TaskMemory on Linux), else since the process started
    cuda_peak_allocated_mb: float | None = None  # torch's peak allocated, reset per task
    cpu_peak_rss_mb: float | None = None  # RSS peak of this task above the run's start (protocol.TaskMemory)
    # CPU runs: the peak of live tensor bytes (MiB) in this task, traced over a training stage's
    # second step (and one batch of a method's own passes), the method's and optimizer's state
    # included (protocol.TaskMemory); None in older files
    cpu_peak_live_tensor_mb: float | None = None
    memory_measured: str | None = None  # how this task's peak memory was measured
    # The training curve, one entry per epoch of every stage, in order: {"stage", "epoch" (from 0),
    # "loss" (mean over the epoch's batches), "lr" (the first parameter group's, during the epoch;
    # "lr_groups" lists all where they differ), "time_s"}. Empty in files of schema < 3.
    epochs: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class RunResult:
    """One finished run. ``accuracy_matrix`` holds counts: ``correct[t][i]`` and ``total[t][i]``
    of task ``i``'s test images after training task ``t``."""

    run_key: str
    benchmark: str
    num_tasks: int
    method: str
    seed: int
    class_order_seed: int
    class_order: list[int]
    task_sizes: list[int]
    config: dict[str, Any]  # ``RunConfig.to_dict()``
    tasks: list[TaskRecord]
    accuracy_matrix: dict[str, list[list[int]]]
    metrics: dict[str, Any]
    tag: str = ""
    method_info: MethodInfo | None = None  # None: read from a schema-1 file, the name as its title
    benchmark_title: str = ""
    pretrained: str = ""
    data: str = ""
    environment: dict[str, Any] = field(default_factory=dict)
    cost: dict[str, Any] = field(default_factory=dict)
    wall_time_s: float = 0.0
    finished_at: str = ""
    argv: list[str] = field(default_factory=list)
    non_finite: list[str] = field(default_factory=list)  # values written as null, and what they were
    # where training went non-finite and went on (train.on_divergence=continue); empty: it did not
    diverged: list[str] = field(default_factory=list)
    schema: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        self.benchmark_title = self.benchmark_title or self.benchmark
        self.method_info = self.method_info or MethodInfo(self.method)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunResult":
        d = dict(d)
        if isinstance(d.get("method_info"), dict):
            d["method_info"] = MethodInfo(**d["method_info"])
        task_fields = {f.name for f in dataclasses.fields(TaskRecord)}
        d["tasks"] = [TaskRecord(**{k: v for k, v in t.items() if k in task_fields}) for t in d.get("tasks", [])]
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def write_result(path: Path, result: RunResult) -> None:
    atomic_write_json(path, result.to_dict(), checksum=True)


def read_result(path: Path) -> RunResult:
    """The result in ``path``; ``CorruptFileError`` when it does not read back whole (not JSON,
    a wrong checksum, fields missing, an accuracy matrix that is not num_tasks x num_tasks)."""
    data = read_checked_json(path)
    if data.get("schema") not in READABLE_SCHEMAS:
        raise UserError(f"{path}: result schema {data.get('schema')} is not one of {READABLE_SCHEMAS} "
                        f"(written by another clbench version?)")
    try:
        result = RunResult.from_dict(data)
        n, matrix = result.num_tasks, result.accuracy_matrix
        if any(len(matrix[k]) != n or any(len(row) != n for row in matrix[k]) for k in ("correct", "total")):
            raise ValueError(f"its accuracy matrix is not {n} x {n}")
    except (TypeError, KeyError, ValueError) as err:
        raise CorruptFileError(path, f"not a result: {err}") from err
    return result


def iter_results(root: Path) -> Iterator[tuple[Path, RunResult]]:
    """Every finished run under ``root/runs`` (any depth), in path order. A result file that
    does not read back is skipped with a warning, and their count is told at the end."""
    corrupt = 0
    for path in sorted((Path(root) / "runs").rglob("*.json")):
        try:
            result = read_result(path)
        except CorruptFileError as err:
            corrupt += 1
            print(f"warning: skipped {err}; rerun the sweep to redo it", file=sys.stderr)
            continue
        yield path, result
    if corrupt:
        print(f"warning: {corrupt} corrupt result file(s) skipped", file=sys.stderr)


# ----------------------------------------------------------------------------- checkpoints


def _checkpoint_digest(ckpt: dict[str, Any]) -> str:
    """sha256 over the checkpoint's method state (names, dtypes, shapes, bytes) and the JSON of
    its counts, task records and configuration: torch's zip format checks no content."""
    import torch

    h = hashlib.sha256()
    for name, value in ckpt["method"].items():
        h.update(name.encode())
        if isinstance(value, torch.Tensor):
            t = value.detach().cpu().contiguous().reshape(-1)
            h.update(f"{t.dtype}{tuple(value.shape)}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes())
        else:
            h.update(repr(value).encode())
    rest = {k: ckpt[k] for k in ("config", "completed_tasks", "correct", "total", "tasks")}
    # non-finite values (a run that trains on after diverging) as finite_json writes them, noted
    safe, notes = finite_json(json.loads(json.dumps(rest)))
    h.update(json_checksum({"rest": safe, "non_finite": notes}).encode())
    return "sha256:" + h.hexdigest()


def write_checkpoint(path: Path, ckpt: dict[str, Any]) -> None:
    """A run's checkpoint (a mapping with ``config``, ``completed_tasks``, ``method`` (a state
    dict), ``rng``, ``correct``, ``total``, ``tasks`` and ``elapsed_s``), atomically, with its
    format and checksum."""
    atomic_torch_save(path, {**ckpt, "format": CHECKPOINT_FORMAT, "checksum": _checkpoint_digest(ckpt)})


def read_checkpoint(path: Path) -> dict[str, Any]:
    """The checkpoint in ``path``; ``CorruptFileError`` when it does not load or its checksum
    does not match."""
    import torch

    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise
    except Exception as err:  # noqa: BLE001 - truncated zips, bad pickles, ...: whatever torch says
        raise CorruptFileError(path, f"does not load: {type(err).__name__}: {(str(err).splitlines() or [''])[0]}") from err
    try:
        if "checksum" in ckpt and ckpt["checksum"] != _checkpoint_digest(ckpt):
            raise ValueError("its checksum does not match its content")
    except (TypeError, KeyError, ValueError, AttributeError) as err:
        raise CorruptFileError(path, f"not a checkpoint: {err}") from err
    return ckpt
