"""The sweep command (``clbench`` with no sub-command): plan and check the plan
(``clbench.preflight``), then run here (one run after the other, or several at once with
``--jobs``/``--devices``) or on SLURM, then print the sweep's table and write the report; and
``clbench preflight``: the same checks, plus a forecast against a SLURM profile."""
from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
import time
from pathlib import Path

import torch

from clbench import record
from clbench.config import describe_overrides, split_values
from clbench.errors import PlanError
from clbench.jobs import run_local, run_parallel, tidy
from clbench.options import MAX_AUTO_JOBS, PROFILE_ENV, add_preflight_arguments
from clbench.plan import PlannedRun, plan_from_args
from clbench.preflight import (
    Check,
    Forecast,
    check_plan,
    forecast,
    format_checks,
    format_forecast,
    output_check,
    raise_problems,
    read_speed_figures,
)
from clbench.report.aggregate import quick_table
from clbench.report.command import write_report
from clbench.slurm import launcher


def grid_summary(items: list[str]) -> str:
    """``--set grid: 4 configurations (train.lr: 0.005, 0.01 × method.rank: 4, 8)``; empty without a grid."""
    lists = [(item.split("=", 1)[0], split_values(item.split("=", 1)[1])) for item in items if "=" in item]
    lists = [(key, values) for key, values in lists if len(values) > 1]
    if not lists:
        return ""
    count = 1
    for _, values in lists:
        count *= len(values)
    return (f"--set grid: {count} configurations ("
            + " × ".join(f"{key}: {', '.join(values)}" for key, values in lists) + ")")


def print_plan(runs: list[PlannedRun], overrides: list[str] | None = None) -> None:
    grid = grid_summary(overrides or [])
    if grid:
        print(grid)
    for r in runs:
        c = r.config
        t = c.train
        state = "done" if r.done else "todo"
        batch = f"{t.batch_size}" if t.micro_batch_size is None else f"{t.batch_size}(micro {t.micro_batch_size})"
        schedule = t.schedule + (f"(lag {t.schedule_offset})" if t.schedule_offset else "")
        test_order = f" test_order={c.data.test_order}" if c.data.test_order != "dataset" else ""
        variant = f" [{describe_overrides(c.overrides)}]" if c.overrides else ""
        eval_on = f" eval_on={c.data.eval_on}" if c.data.eval_on != "test" else ""
        print(f"{state:5s} {r.key:48s}{variant} backbone={c.backbone.name} epochs={t.epochs} bs={batch} "
              f"{t.optimizer} lr={t.lr:g} {schedule} drop_last={t.drop_last}{test_order}{eval_on} "
              f"method={c.method_args}")
    todo = sum(not r.done for r in runs)
    print(f"{len(runs)} runs planned, {len(runs) - todo} already done, {todo} to run")


def checked_plan(args: argparse.Namespace) -> tuple[list[PlannedRun], Path, list[Check]]:
    """The plan, with every check of ``clbench.preflight`` passed (else one ``PlanError``). A split
    that a loader has to write goes to ``<out>/splits``, or to a temporary folder under
    ``--dry-run`` (which writes nothing, and prints the plan, each run's recipe and the checks
    before any problem they found)."""
    runs, out = plan_from_args(args)
    missing = [p for p in (Path(out), *Path(out).parents) if not p.exists()]  # what the check may make
    output = output_check(runs, out, concurrent_runs(runs, args), create=not args.dry_run)
    try:
        with contextlib.ExitStack() as stack:
            elsewhere = args.dry_run or output.problem is not None  # nothing goes into a folder that failed
            splits = Path(stack.enter_context(tempfile.TemporaryDirectory())) if elsewhere else out / "splits"
            checks = [output, *check_plan(runs, splits)]
        if args.dry_run:
            print_plan(runs, args.overrides)
            print("checks:\n" + (format_checks(checks) or "(nothing to run)"), flush=True)
        raise_problems(checks)
    except PlanError:
        for folder in missing:  # a plan that fails leaves no empty --out behind
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    return runs, out, checks


def local_jobs(runs: list[PlannedRun], args: argparse.Namespace) -> int:
    """How many runs ``--jobs`` trains at once on this machine: its number, or for ``auto`` one
    when a run goes to a GPU, else one per CPU core (at most ``MAX_AUTO_JOBS`` and the runs to
    do). With ``--threads`` unset, the workers share the cores (``run_parallel``)."""
    jobs = getattr(args, "jobs", 1)
    todo = sum(not r.done for r in runs)
    if jobs != "auto":
        return jobs
    if any(r.config.device.startswith("cuda") or (r.config.device == "auto" and torch.cuda.is_available())
           for r in runs if not r.done):
        return 1
    return max(1, min(os.cpu_count() or 1, MAX_AUTO_JOBS, todo))


def concurrent_runs(runs: list[PlannedRun], args: argparse.Namespace) -> int:
    """How many of the plan's unfinished runs train at the same time (and hold checkpoints)."""
    todo = sum(not r.done for r in runs)
    if getattr(args, "launcher", "local") != "local":  # (preflight has none: as a serial sweep)
        return todo
    devices = getattr(args, "devices", None)
    return min(todo, len(devices) if devices else local_jobs(runs, args))


def forecast_for(runs: list[PlannedRun], args: argparse.Namespace) -> tuple[launcher.SlurmProfile, list[Forecast]]:
    """The profile the options name, and each unfinished run's forecast against it."""
    profile = launcher.profile_from_args(args)
    return profile, forecast(runs, read_speed_figures(args.speed), profile.time_limit, profile.memory_gib())


def fit_or_refuse(runs: list[PlannedRun], args: argparse.Namespace) -> None:
    """Before a SLURM submission: refuse (``PlanError``) runs that the ``--speed`` figures say
    exceed the profile's time limit or memory, unless ``--ignore-forecast``."""
    if not args.speed or args.ignore_forecast:
        return
    _, forecasts = forecast_for(runs, args)
    unfit = [f for f in forecasts if f.fits is False]
    if unfit:
        raise PlanError([f"{f.key}: forecast {f.hours:.2f} h (limit {f.limit_hours:.2f} h)"
                         + ("" if f.peak_gib is None else f", peak {f.peak_gib:.2f} GiB (of {f.memory_gib})")
                         + "; raise the profile's limits (--slurm time_min=...), or --ignore-forecast"
                         for f in unfit])


def preflight_main(args: argparse.Namespace) -> int:
    """``clbench preflight``: every check of the plan, and its forecast against the profile.
    Exit 0: it passes and fits; 1: a run would not fit; 2: a check failed."""
    runs, out = plan_from_args(args)  # names, tasks and seeds: a problem there stops here
    with tempfile.TemporaryDirectory() as splits:
        checks = [output_check(runs, out, concurrent_runs(runs, args), create=False), *check_plan(runs, Path(splits))]
    todo = sum(not r.done for r in runs)
    print(f"{len(runs)} runs planned, {todo} to run\nchecks:\n" + (format_checks(checks) or "(nothing to run)"))
    profile, forecasts = forecast_for(runs, args)
    print(f"forecast against profile {args.profile or os.environ.get(PROFILE_ENV) or 'local'} "
          f"({profile.describe()}):\n{format_forecast(forecasts)}")
    raise_problems(checks)
    return 1 if any(f.fits is False for f in forecasts) else 0


COMMANDS = {"preflight": (add_preflight_arguments, preflight_main)}


def main(args: argparse.Namespace) -> int:
    runs, out, checks = checked_plan(args)
    if args.dry_run:
        return 0
    if args.force:  # start every run afresh; a finished result is kept beside it as .json.prev
        for r in runs:
            if r.result_path.exists():
                os.replace(r.result_path, r.result_path.with_name(r.result_path.name + ".prev"))
            record.checkpoint_path(out, r.key).unlink(missing_ok=True)  # else it would resume
            r.done = False
    tidy(runs, out)  # what killed writers left beside the finished runs' files
    todo = [r for r in runs if not r.done]
    if grid_summary(args.overrides):
        print(grid_summary(args.overrides))
    print(f"{len(runs)} runs planned, {len(runs) - len(todo)} already done, {len(todo)} to run "
          f"-> {out.resolve()}", flush=True)
    start = time.time()
    if args.threads:
        torch.set_num_threads(args.threads)
    jobs = local_jobs(todo, args)
    if args.launcher == "local" and (jobs > 1 or args.devices):
        failures = run_parallel(todo, out, jobs, args.devices, args.threads)
    elif args.launcher == "local":
        failures = run_local(todo, out, progress=not args.no_progress)  # SIGTERM stops it as Ctrl-C does
    else:
        fit_or_refuse(todo, args)
        failures = launcher.launch(todo, args, out)
        if failures is None:  # submitted or emitted without waiting
            return 0
    print(f"\nsweep finished in {time.time() - start:.0f}s; its runs:")
    print(quick_table(out, only={str(r.result_path) for r in runs}))
    print(f"\nresult files: {(out / 'runs').resolve()}")
    if failures:
        print(f"\n{len(failures)} run(s) failed: " + ", ".join(r.key for r, _ in failures))
        return 1
    write_report(out)
    return 0
