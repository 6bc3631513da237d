"""Command line of ``run_suite.py``: plan a sweep, run it here or on SLURM, report.

    python run_suite.py [--bench synth] [--tasks 5,10] [--methods all] [--seeds 0,1,2] ...
    python run_suite.py report|status|collect|speed ...

Sub-commands other than the sweep live beside what they work on; each module exposes
``COMMANDS = {name: (add_arguments, main)}`` and is listed in ``SUBCOMMAND_MODULES``.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
from pathlib import Path

SUBCOMMAND_MODULES = ["results.report", "slurm.launcher", "benchmarks.speed"]
LAUNCHER_MODULE = "slurm.launcher"  # provides add_launcher_arguments(parser) and launch(runs, args)


def _csv(kind):
    def parse(text: str):
        try:
            return [kind(v) for v in text.split(",") if v.strip()]
        except ValueError as err:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list: {err}") from err
    return parse


def add_sweep_arguments(p: argparse.ArgumentParser) -> None:
    """The options that say which runs a sweep holds (shared by run, status and collect)."""
    p.add_argument("--bench", type=_csv(str), default=["synth"],
                   help="benchmark(s): imr, ima, dn, c100, cub, synth (default synth)")
    p.add_argument("--tasks", type=_csv(int), default=None,
                   help="numbers of tasks, e.g. 5,10,20 (default: the benchmark's own)")
    p.add_argument("--methods", type=str, default="all", help="comma-separated method names, or all")
    p.add_argument("--seeds", type=_csv(int), default=[0, 1, 2], help="training seeds (default 0,1,2)")
    p.add_argument("--class-order-seed", type=int, default=None,
                   help="fix the class order across seeds (default: each seed draws its own order, as PILOT)")
    p.add_argument("--data-root", type=str, default=None, help="dataset root (default $CLBENCH_DATA or ./data)")
    p.add_argument("--device", type=str, default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--backbone", type=str, default=None, help="timm model name, overrides every recipe")
    p.add_argument("--pretrained-path", type=str, default=None, help="local weights file for the backbone")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any recipe key, e.g. --set train.lr=0.01 --set method.rank=8")
    p.add_argument("--out", type=Path, default=None, help="results root (default $CLBENCH_RESULTS or ./results)")


def plan_from_args(args: argparse.Namespace):
    from harness.config import parse_set
    from harness.sweep import plan
    from methods import METHODS
    from results import store

    overrides = parse_set(args.overrides)
    if args.backbone:
        overrides.setdefault("backbone", {})["name"] = args.backbone
    if args.pretrained_path:
        overrides.setdefault("backbone", {})["pretrained_path"] = args.pretrained_path
    methods = None if args.methods == "all" else [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods or []:
        if m not in METHODS:
            raise KeyError(f"unknown method '{m}'; registered: {', '.join(sorted(METHODS))}")
    out = args.out or store.default_root()
    return plan(args.bench, args.tasks, methods, args.seeds, out, args.class_order_seed, overrides or None,
                args.device, args.data_root), out


def print_plan(runs) -> None:
    for r in runs:
        c = r.config
        t = c.train
        state = "done" if r.done else "todo"
        print(f"{state:5s} {r.key:48s} backbone={c.backbone.name} epochs={t.epochs} bs={t.batch_size} "
              f"{t.optimizer} lr={t.lr:g} {t.schedule} method={c.method_args}")
    todo = sum(not r.done for r in runs)
    print(f"{len(runs)} runs planned, {len(runs) - todo} already done, {todo} to run")


def sweep_main(args: argparse.Namespace) -> int:
    from results import store
    from results.aggregate import quick_table

    runs, out = plan_from_args(args)
    if args.dry_run:
        print_plan(runs)
        return 0
    if args.force:  # start every run afresh; a finished result is kept beside it as .json.prev
        for r in runs:
            if r.result_path.exists():
                os.replace(r.result_path, r.result_path.with_name(r.result_path.name + ".prev"))
            store.checkpoint_path(out, r.key).unlink(missing_ok=True)  # else it would resume
            r.done = False
    todo = [r for r in runs if not r.done]
    print(f"{len(runs)} runs planned, {len(runs) - len(todo)} already done, {len(todo)} to run "
          f"-> {out.resolve()}", flush=True)
    start = time.time()
    if args.launcher == "local":
        from harness.sweep import run_local

        failures = run_local(todo, out, progress=not args.no_progress)
    else:
        launcher = importlib.import_module(LAUNCHER_MODULE)
        failures = launcher.launch(todo, args, out)
        if failures is None:  # submitted or emitted without waiting
            return 0
    print(f"\nsweep finished in {time.time() - start:.0f}s; its runs:")
    print(quick_table(out, only={str(r.result_path) for r in runs}))
    print(f"\nresult files: {(out / 'runs').resolve()}")
    if failures:
        print(f"\n{len(failures)} run(s) failed: " + ", ".join(r.key for r, _ in failures))
        return 1
    from results.report import write_report

    write_report(out)
    return 0


def build_parser() -> tuple[argparse.ArgumentParser, dict]:
    parser = argparse.ArgumentParser(
        prog="run_suite.py",
        description="Continual-learning sweeps with pre-trained ViTs (SD-LoRA, ICLR 2025, and its baselines).",
        epilog="Sub-commands: report, status, collect, speed (run_suite.py <cmd> --help).")
    add_sweep_arguments(parser)
    parser.add_argument("--dry-run", action="store_true", help="print the plan and the recipe of each run")
    parser.add_argument("--force", action="store_true", help="rerun every planned run from its first task, even finished ones "
                        "(a finished result is kept as <result>.json.prev)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--launcher", choices=["local", "slurm", "sbatch"], default="local",
                        help="where runs execute (default: in this process)")
    importlib.import_module(LAUNCHER_MODULE).add_launcher_arguments(parser)
    commands = {}
    for module_name in SUBCOMMAND_MODULES:
        commands.update(importlib.import_module(module_name).COMMANDS)
    return parser, commands


def main(argv: list[str] | None = None) -> int:
    from benchmarks.base import DataError
    from harness.backbones import PretrainedWeightsError
    from harness.config import ConfigError

    argv = sys.argv[1:] if argv is None else argv
    parser, commands = build_parser()
    try:
        if argv and argv[0] in commands:
            add_arguments, command_main = commands[argv[0]]
            sub = argparse.ArgumentParser(prog=f"run_suite.py {argv[0]}")
            add_arguments(sub)
            return int(command_main(sub.parse_args(argv[1:])) or 0)
        return sweep_main(parser.parse_args(argv))
    except (DataError, ConfigError, PretrainedWeightsError, KeyError) as err:
        # Problems the user can fix get their message, not a traceback.
        message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
        print(f"error: {message}", file=sys.stderr)
        return 2
