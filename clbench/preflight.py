"""The checks of a whole plan that need torch: run once, before any run starts or any job is
submitted, by the sweep (``--dry-run`` too) and by ``clbench preflight``.

* **backbone and image size**: each backbone is created on the ``meta`` device (no memory, no
  weights) and given one image of the benchmark's size;
* **pretrained weights**: a local file that exists, a registered builder (synth), or the
  timm / Hugging Face cache; offline (``HF_HUB_OFFLINE``) a checkpoint not in the cache is a
  problem now, not a minute of retries in every run;
* **data**: the benchmark's own loader opens the data (one of its accepted layouts, the expected
  class count); a split it has to write goes to ``splits_dir`` (a temporary folder under
  ``--dry-run``);
* **output folder** (``output_check``): ``--out`` is a folder or can be made one, is writable,
  and its file system has room for the checkpoints of the runs that train at once (twice the
  model's state each: the last one and the next while it is written), estimated from the
  backbone's state size on the ``meta`` device.

The checks that need no torch (names, task counts, seeds) are ``clbench.catalog``'s. The
forecast reads the figures ``clbench speed --json FILE`` writes.
"""
from __future__ import annotations

import functools
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import timm
import torch

from clbench.backbones import weights_problem
from clbench.benchmarks import get_benchmark, import_all
from clbench.catalog import backbone_size_message
from clbench.config import RunConfig
from clbench.errors import PlanError, UserError, did_you_mean
from clbench.files import format_size
from clbench.plan import PlannedRun

import_all()  # what the benchmark modules register (synth's ViT and its weights' builder) is checked too


@dataclass
class Check:
    """One check of the plan: what was checked, for which runs, and the problem (None: passed)."""

    what: str
    runs: int
    problem: str | None = None


def backbone_problem(name: str, image_size: int) -> str | None:
    """Why backbone ``name`` cannot take ``image_size``-pixel images, or None."""
    if not timm.is_model(name):
        return f"unknown timm model '{name}'{did_you_mean(name.split('.')[0], timm.list_models())}"
    model = meta_model(name)
    with torch.device("meta"):
        try:
            model(torch.empty(1, 3, image_size, image_size))
        except Exception as err:  # noqa: BLE001 - whatever the model says is the message
            return backbone_size_message(name, image_size, f"{type(err).__name__}: {err}")
    return None


@functools.lru_cache(maxsize=None)
def meta_model(name: str) -> torch.nn.Module:
    """timm's ``name`` on the ``meta`` device (no memory, no weights), created once per name."""
    with torch.device("meta"):
        return timm.create_model(name, pretrained=False, num_classes=0)


def state_bytes(name: str) -> int | None:
    """Bytes of backbone ``name``'s state dict, what a run's checkpoint mostly holds; None when
    timm does not know it (the backbone check says so)."""
    if not timm.is_model(name):
        return None
    return sum(t.numel() * t.element_size() for t in meta_model(name).state_dict().values())


def output_problem(out: Path, need_bytes: int, create: bool) -> str | None:
    """Why ``out`` cannot hold a sweep's files, or None: it must be a folder (made, with its
    parents, when ``create``; a dry run only looks at what exists), writable, with ``need_bytes``
    free on its file system."""
    out = Path(out)
    existing = out
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    fix = "choose another --out (or $CLBENCH_RESULTS)"
    if not existing.is_dir():
        return f"--out {out}: {existing} is a file, not a folder; {fix}"
    if create:
        try:
            out.mkdir(parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(dir=out, prefix=".clbench-write-test.")
            os.close(fd)
            os.unlink(probe)
        except OSError as err:
            why = err.strerror or str(err)
            verb = "write into" if out.is_dir() else "create"
            return f"--out {out}: cannot {verb} it ({why}{': ' + str(err.filename) if err.filename else ''}); {fix}"
        existing = out
    elif not os.access(existing, os.W_OK | os.X_OK):
        return f"--out {out}: {existing} is not writable; {fix}"
    free = shutil.disk_usage(existing).free
    if free < need_bytes:
        return (f"--out {out}: {format_size(free)} free on its file system, but the runs' checkpoints need "
                f"about {format_size(need_bytes)}; free some space or {fix}")
    return None


def output_check(runs: list[PlannedRun], out: Path, concurrent: int, create: bool) -> Check:
    """The output folder's check (``output_problem``) for the unfinished runs, ``concurrent`` of
    them training at once: each needs twice its backbone's state (``state_bytes``)."""
    todo = [r.config for r in runs if not r.done]
    sizes = sorted((state_bytes(c.backbone.name) or 0 for c in todo), reverse=True)
    need = 2 * sum(sizes[:max(concurrent, 1)])
    return Check(f"output folder {out} (~{format_size(need)} of checkpoints)", len(todo),
                 output_problem(out, need, create) if todo or create else None)


def data_problem(config: RunConfig, splits_dir: Path) -> str | None:
    """Why the benchmark's data cannot be opened as ``config`` says, or None."""
    bench = get_benchmark(config.benchmark)
    train_tf, test_tf = bench.transforms(config.data.image_size)
    try:
        bench.load(bench.data_dir(config.data.root), train_tf, test_tf, splits_dir)
    except UserError as err:
        return str(err)
    return None


def check_plan(runs: list[PlannedRun], splits_dir: Path) -> list[Check]:
    """Every torch-side check of the plan, each distinct setting once (backbone × image size,
    weights, data folder); the unfinished runs only, since finished ones need nothing."""
    todo = [r.config for r in runs if not r.done]
    groups: dict[tuple[str, Any], list[RunConfig]] = {}
    for c in todo:
        size = c.data.image_size or get_benchmark(c.benchmark).image_size
        groups.setdefault(("backbone", (c.backbone.name, size)), []).append(c)
        groups.setdefault(("weights", (c.backbone.name, c.backbone.pretrained, c.backbone.pretrained_path)),
                          []).append(c)
        groups.setdefault(("data", (c.benchmark, c.data.root)), []).append(c)
    checks = []
    for (kind, setting), configs in groups.items():
        first = configs[0]
        if kind == "backbone":
            name, size = setting
            checks.append(Check(f"backbone {name} at {size}px", len(configs), backbone_problem(name, size)))
        elif kind == "weights":
            source = first.backbone.pretrained_path or ("pretrained" if first.backbone.pretrained else "random init")
            checks.append(Check(f"weights of {first.backbone.name} ({source})", len(configs),
                                weights_problem(first.backbone)))
        else:
            where = get_benchmark(first.benchmark).data_dir(first.data.root)
            checks.append(Check(f"data of {first.benchmark} ({where})", len(configs),
                                data_problem(first, splits_dir)))
    return checks


def raise_problems(checks: list[Check]) -> None:
    """One ``PlanError`` that lists every failed check, or nothing."""
    problems = [f"{c.what}, {c.runs} run(s): {c.problem}" for c in checks if c.problem]
    if problems:
        raise PlanError(problems)


def format_checks(checks: list[Check]) -> str:
    return "\n".join(f"{'ok' if c.problem is None else 'FAIL':4s} {c.what} ({c.runs} run(s))"
                     + ("" if c.problem is None else f": {c.problem.splitlines()[0]}") for c in checks)


# ------------------------------------------------------------------------------ forecast


@dataclass
class Forecast:
    """One run's expected cost from the speed tool's figures (None: no figures for it)."""

    key: str
    method: str
    hours: float | None
    peak_gib: float | None
    limit_hours: float
    memory_gib: float | None  # what the profile gives a job (None: not stated)

    @property
    def fits(self) -> bool | None:
        """Whether the run fits the time limit and memory (None: no figures to tell)."""
        if self.hours is None:
            return None
        memory_ok = self.peak_gib is None or self.memory_gib is None or self.peak_gib <= self.memory_gib
        return self.hours <= self.limit_hours and memory_ok


def read_speed_figures(paths: list[Path]) -> dict[tuple[str, int, str], dict[str, Any]]:
    """``(benchmark, num_tasks, method) -> {"run_s", "peak_mib", "device"}`` from the files that
    ``clbench speed --json`` wrote (later files win)."""
    figures: dict[tuple[str, int, str], dict[str, Any]] = {}
    for path in paths:
        try:
            data = json.loads(Path(path).read_text())
            bench, num_tasks = data["bench"], int(data["num_tasks"])
        except (OSError, ValueError, KeyError) as err:
            raise UserError(f"--speed {path}: not a file written by `clbench speed --json` "
                            f"({type(err).__name__}: {err})") from err
        for m in data.get("methods", []):
            if m.get("error"):
                continue
            peaks = [t.get("train_peak_mib") or 0.0 for t in m.get("tasks", [])] + \
                    [t.get("infer_peak_mib") or 0.0 for t in m.get("tasks", [])]
            figures[(bench, num_tasks, m["method"])] = {"run_s": m.get("projected_run_s"),
                                                         "peak_mib": max(peaks, default=None),
                                                         "device": data.get("device")}
    return figures


def forecast(runs: list[PlannedRun], figures: dict[tuple[str, int, str], dict[str, Any]],
             time_limit_min: Callable[[str], int], memory_gib: float | None) -> list[Forecast]:
    """Each unfinished run's expected hours and peak memory, against a job's limits."""
    out = []
    for r in runs:
        if r.done:
            continue
        c = r.config
        f = figures.get((c.benchmark, c.num_tasks, c.method), {})
        run_s, peak = f.get("run_s"), f.get("peak_mib")
        out.append(Forecast(r.key, c.method, None if run_s is None else run_s / 3600,
                            None if peak is None else peak / 1024, time_limit_min(c.method) / 60, memory_gib))
    return out


def format_forecast(forecasts: list[Forecast]) -> str:
    lines = []
    for f in forecasts:
        if f.hours is None:
            lines.append(f"  ?    {f.key}: no speed figures (clbench speed --bench ... --tasks N --json FILE)")
            continue
        peak = "" if f.peak_gib is None else f", peak {f.peak_gib:.2f} GiB" + (
            "" if f.memory_gib is None else f" of {f.memory_gib:g}")
        lines.append(f"  {'ok' if f.fits else 'FAIL':4s} {f.key}: {f.hours:.2f} h of {f.limit_hours:.2f} h{peak}")
    known = [f for f in forecasts if f.hours is not None]
    total = sum(f.hours for f in known)
    peaks = [f.peak_gib for f in known if f.peak_gib is not None]
    lines.append(f"sweep: {total:.2f} h over {len(known)} of {len(forecasts)} run(s) with figures"
                 + (f", largest peak {max(peaks):.2f} GiB" if peaks else "")
                 + f"; {sum(f.fits is False for f in forecasts)} run(s) do not fit")
    return "\n".join(lines)
