"""A sweep plan: benchmark × number of tasks × method × seed, each resolved to a ``RunConfig``.

The plan is plain data; launchers (in-process here, SLURM in ``clbench.slurm``) turn each planned run
into a call of ``run_job``, the one job entry point, which needs nothing but the run's
configuration dictionary and the results root.

Each run also has a status record, ``<out>/status/<key>.json``, for ``clbench status``:
``run_job`` writes its progress (state, task reached, time so far, who runs it) and the
launcher's job wrapper writes a failure with its traceback (``record_failure``). Records are
written atomically and never read by reports: results come from result files only.
"""
from __future__ import annotations

import argparse
import os
import socket
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clbench import files, record
from clbench.benchmarks import get_benchmark
from clbench.config import RunConfig, parse_set
from clbench.errors import UserError
from clbench.methods import METHODS, ordered_methods
from clbench.protocol import run
from clbench.recipes import resolve_config


@dataclass
class PlannedRun:
    config: RunConfig
    key: str
    result_path: Path
    done: bool


def plan(benches: list[str], tasks: list[int] | None, methods: list[str] | None, seeds: list[int],
         out_root: Path, class_order_seed: int | None = None, overrides: dict[str, Any] | None = None,
         device: str = "auto", data_root: str | None = None) -> list[PlannedRun]:
    """Resolve every run of the sweep; ``tasks=None`` takes each benchmark's defaults and
    ``methods=None`` every registered method, in the paper's row order."""
    method_names = ordered_methods(list(METHODS)) if not methods else methods
    runs: list[PlannedRun] = []
    for bench_name in benches:
        bench = get_benchmark(bench_name)
        for n in tasks or bench.default_tasks:
            for m in method_names:
                for seed in seeds:
                    cfg = resolve_config(bench_name, n, m, seed, class_order_seed, overrides, device)
                    if data_root is not None:
                        cfg.data.root = data_root
                    path = record.result_path(out_root, cfg.key)
                    runs.append(PlannedRun(cfg, cfg.key, path, path.exists()))
    return runs


def plan_from_args(args: argparse.Namespace) -> tuple[list[PlannedRun], Path]:
    """The plan the sweep options (``clbench.options.add_sweep_arguments``) describe, and its
    results root."""
    overrides = parse_set(args.overrides)
    if args.backbone:
        overrides.setdefault("backbone", {})["name"] = args.backbone
    if args.pretrained_path:
        overrides.setdefault("backbone", {})["pretrained_path"] = args.pretrained_path
    methods = None if args.methods == "all" else [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods or []:
        if m not in METHODS:
            raise KeyError(f"unknown method '{m}'; registered: {', '.join(sorted(METHODS))}")
    out = args.out or record.default_root()
    return plan(args.bench, args.tasks, methods, args.seeds, out, args.class_order_seed, overrides or None,
                args.device, args.data_root), out


def status_path(out_root: Path, key: str) -> Path:
    """Where a run's status record lives: ``<out>/status/<key>.json``."""
    return Path(out_root) / "status" / f"{key}.json"


def read_status(out_root: Path, key: str) -> dict[str, Any] | None:
    """The run's status record, or None when there is none (or it cannot be read)."""
    return files.read_json(status_path(out_root, key))


def update_status(out_root: Path, key: str, **fields: Any) -> dict[str, Any]:
    """Merge ``fields`` into the run's status record (atomically) and return the record."""
    record = read_status(out_root, key) or {}
    record.update(fields, updated_at=time.time())
    files.atomic_write_json(status_path(out_root, key), record)
    return record


def job_identity() -> dict[str, Any]:
    """Who runs this process: the SLURM job id (``<array>_<index>`` for an array element, as
    ``squeue``/``sacct`` print it), the host and the process id."""
    env = os.environ
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        job_id = f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    else:
        job_id = env.get("SLURM_JOB_ID")
    return {"job_id": job_id, "host": socket.gethostname(), "pid": os.getpid()}


def record_failure(out_root: Path, key: str, error: str) -> None:
    """Mark the run failed with its traceback; called by the launcher that ran the job."""
    update_status(out_root, key, state="failed", error=error, **job_identity())


def run_job(config: dict[str, Any], out_root: str, progress: bool = True) -> dict[str, Any]:
    """The job entry point of every launcher: run one configuration and return its metrics.
    A finished run (its result file exists) is not run again. While it runs, its status record
    says how far it got; ``attempts`` lists every start (``from_task`` > 0: resumed)."""
    cfg = RunConfig.from_dict(config)
    key = cfg.key
    path = record.result_path(Path(out_root), key)
    if path.exists():
        return record.read_result(path).metrics
    identity = job_identity()
    attempt: dict[str, Any] = {}

    def on_progress(tasks_done: int, num_tasks: int, elapsed_s: float) -> None:
        fields = {"state": "running", "tasks_done": tasks_done, "num_tasks": num_tasks,
                  "elapsed_s": elapsed_s, "error": None, **identity}
        if not attempt:  # this process's first report: the run (re)started here
            attempt.update(started_at=time.time(), from_task=tasks_done, **identity)
            fields["attempts"] = (read_status(out_root, key) or {}).get("attempts", []) + [attempt]
        update_status(out_root, key, **fields)

    result = run(cfg, Path(out_root), progress, on_progress)
    update_status(out_root, key, state="done", elapsed_s=result.wall_time_s)
    return result.metrics


def run_local(runs: list[PlannedRun], out_root: Path, progress: bool = True) -> list[tuple[PlannedRun, str]]:
    """Run the plan in this process, one run after the other. Returns the failures
    (run, traceback); a failing run does not stop the others."""
    failures = []
    for i, r in enumerate(runs):
        print(f"[{i + 1}/{len(runs)}] {r.key}", flush=True)
        try:
            run_job(r.config.to_dict(), str(out_root), progress)
        except UserError:
            raise  # the user must fix these; every later run would fail the same way
        except Exception:  # keep going: one broken run must not cost the rest of the sweep
            failures.append((r, traceback.format_exc()))
            record_failure(out_root, r.key, failures[-1][1])
            print(f"[{i + 1}/{len(runs)}] {r.key} FAILED:\n{failures[-1][1]}", flush=True)
    return failures
