"""A sweep's plan: benchmark × number of tasks × method × seed (× ``--set`` grid point), each run
resolved once to a ``RunConfig`` (``clbench.recipes.resolve_config``). The plan is plain data; the
launchers (``clbench.jobs`` here, ``clbench.slurm`` on a cluster) turn each planned run into a call
of ``clbench.jobs.run_job``, which needs nothing but the run's configuration and the results root.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clbench import record
from clbench.benchmarks import get_benchmark
from clbench.catalog import unique_seeds
from clbench.config import RunConfig
from clbench.errors import ConfigError, CorruptFileError, PlanError
from clbench.methods import METHODS, ordered_methods
from clbench.recipes import resolve_config
from clbench.request import checked, joint_methods, request_layers, requested_methods


@dataclass
class PlannedRun:
    config: RunConfig
    key: str
    result_path: Path
    done: bool


def finished(path: Path) -> bool:
    """Whether ``path`` holds a result that reads back (a corrupt one is redone by ``run_job``)."""
    if not path.exists():
        return False
    try:
        record.read_result(path)
    except CorruptFileError:
        return False
    return True


def plan(benches: list[str], tasks: list[int] | None, methods: list[str] | None, seeds: list[int],
         out_root: Path, class_order_seed: int | None = None, overrides: dict[str, Any] | None = None,
         device: str = "auto", data_root: str | None = None, grid: list[dict[str, Any]] | None = None,
         joint: list[str] | None = None) -> list[PlannedRun]:
    """Resolve every run of the sweep; ``tasks=None`` takes each benchmark's defaults and
    ``methods=None`` every registered method, in the paper's row order. ``grid``: several
    override layers (``--set key=v1,v2``), each a configuration of its own; default: ``[overrides]``.
    ``joint``: methods also trained on every class at once (one task: the reference rows' upper
    bound), after the sweep's own runs. A run planned twice (``--tasks 1`` and ``joint``) is
    planned once. Every run is resolved, and validated (``resolve_config``), once: a
    configuration that fails is one ``PlanError`` listing every distinct problem."""
    method_names = ordered_methods(list(METHODS)) if not methods else methods
    runs: dict[str, PlannedRun] = {}
    problems: dict[str, list[str]] = {}  # a problem -> where it is, each (method, benchmark, N) once
    for bench_name in benches:
        bench = get_benchmark(bench_name)
        shapes = [(n, m) for n in tasks or bench.default_tasks for m in method_names]
        shapes += [(1, m) for m in ordered_methods(list(joint or []))]
        for n, m in shapes:
            for point in grid if grid is not None else [overrides]:
                for seed in seeds:
                    try:
                        cfg = resolve_config(bench_name, n, m, seed, class_order_seed, point, device)
                    except ConfigError as err:
                        where = problems.setdefault(str(err), [])
                        if f"{m} on {bench_name} N={n}" not in where:
                            where.append(f"{m} on {bench_name} N={n}")
                        continue
                    if data_root is not None:
                        cfg.data.root = data_root
                    path = record.result_path(out_root, cfg.key)
                    runs.setdefault(cfg.key, PlannedRun(cfg, cfg.key, path, finished(path)))
    if len(problems) == 1:  # one problem, whichever runs have it: its message alone
        raise ConfigError(next(iter(problems)))
    if problems:
        raise PlanError([f"{problem} ({', '.join(where[:3])}{f' and {len(where) - 3} more' if len(where) > 3 else ''})"
                         for problem, where in problems.items()])
    return list(runs.values())


def plan_from_args(args: argparse.Namespace) -> tuple[list[PlannedRun], Path]:
    """The plan the sweep options (``clbench.options.add_sweep_arguments``) describe, and its
    results root. The request's torch-free checks run first, once (``clbench.request.checked``:
    the command line has usually run them before importing torch)."""
    checked(args)
    grid = [layer or None for layer in request_layers(args)]
    seeds, repeated = unique_seeds(args.seeds)
    if repeated:
        print(f"warning: seed(s) {', '.join(map(str, sorted(set(repeated))))} given more than once; "
              f"each run is planned once", file=sys.stderr)
    out = args.out or record.default_root()
    methods = requested_methods(args)
    runs = plan(args.bench, args.tasks, methods, seeds, out, args.class_order_seed, device=args.device,
                data_root=args.data_root, grid=grid, joint=joint_methods(args, methods or list(METHODS)))
    for r in runs:  # what a run writes beside its result, and what a worker imports first
        r.config.log = list(getattr(args, "log", None) or [])
        r.config.save_model = getattr(args, "save_model", None) or "none"
        r.config.plugins = list(getattr(args, "plugins", None) or [])
    return runs, out


