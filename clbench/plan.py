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
from clbench.benchmarks import BENCHMARKS, get_benchmark
from clbench.catalog import (
    absolute_benchmark,
    check_args,
    import_plugins,
    joint_methods,
    request_layers,
    requested_methods,
    unique_seeds,
)
from clbench.config import RunConfig
from clbench.errors import CorruptFileError, PlanError
from clbench.methods import METHODS, ordered_methods
from clbench.recipes import resolve_config


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
    planned once."""
    method_names = ordered_methods(list(METHODS)) if not methods else methods
    runs: dict[str, PlannedRun] = {}
    for bench_name in benches:
        bench = get_benchmark(bench_name)
        shapes = [(n, m) for n in tasks or bench.default_tasks for m in method_names]
        shapes += [(1, m) for m in ordered_methods(list(joint or []))]
        for n, m in shapes:
            for point in grid if grid is not None else [overrides]:
                for seed in seeds:
                    cfg = resolve_config(bench_name, n, m, seed, class_order_seed, point, device)
                    if data_root is not None:
                        cfg.data.root = data_root
                    path = record.result_path(out_root, cfg.key)
                    runs.setdefault(cfg.key, PlannedRun(cfg, cfg.key, path, finished(path)))
    return list(runs.values())


def plan_from_args(args: argparse.Namespace) -> tuple[list[PlannedRun], Path]:
    """The plan the sweep options (``clbench.options.add_sweep_arguments``) describe, and its
    results root."""
    import_plugins(getattr(args, "plugins", None) or [])
    args.bench = [absolute_benchmark(b) for b in args.bench]
    problems = check_args(args, BENCHMARKS, METHODS, complete=True)
    if problems:
        raise PlanError(problems)
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


