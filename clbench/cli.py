"""The command line of ``clbench``, ``python -m clbench`` and ``run_suite.py``.

    clbench [--bench synth] [--tasks 5,10] [--methods all] [--seeds 0,1,2] ...   # a sweep
    clbench report|status|collect|speed|probe|preflight ...

Each sub-command lives beside what it works on, in a module whose ``COMMANDS`` maps its name to
``(add_arguments(parser), main(args))``; this module names them and imports only the one that
runs, so that ``--help`` and ``report`` start without torch. The sweep's parser is built from ``clbench.options``.
"""
from __future__ import annotations

import argparse
import importlib
import signal
import sys

from clbench.benchmarks import BENCHMARKS
from clbench.errors import PlanError, UserError, did_you_mean
from clbench.options import add_run_arguments, add_sweep_arguments
from clbench.request import check_args_files, checked, method_names

# sub-command -> (the module whose COMMANDS holds it, one-line description)
SUBCOMMANDS = {
    "report": ("clbench.report.command", "tables and figures from the result files"),
    "status": ("clbench.status", "each run of a sweep: todo, pending, running, done, interrupted or failed"),
    "collect": ("clbench.status", "gather a sweep's finished runs (from other roots too), then report"),
    "speed": ("clbench.speed", "throughput, FLOPs and memory of each method at the first and last task"),
    "probe": ("clbench.probe", "which regime a benchmark is in: NCM, linear-probe and joint fine-tuning "
                               "accuracy of its frozen pretrained backbone, per rendition"),
    "gpu-check": ("clbench.gpu_check", "the GPU path in one command: speed of every method, SD-LoRA's precisions "
                                       "and compile, one short run through the image cache (no data or weights)"),
    "preflight": ("clbench.sweep", "check a sweep's plan (names, tasks, seeds, backbone, weights, data) and "
                                   "forecast its GPU hours and memory against a SLURM profile"),
}
SWEEP_MODULE = "clbench.sweep"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clbench",
        description="Continual-learning sweeps with pre-trained ViTs (SD-LoRA, ICLR 2025, and its baselines).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="methods:    " + ", ".join(method_names())
               + "\nbenchmarks: " + ", ".join(f"{b.name} ({b.title}, {b.num_classes} classes)"
                                              for b in BENCHMARKS.values())
               + "\n\nsub-commands (clbench <cmd> --help):\n"
               + "\n".join(f"  {name:10s} {about}" for name, (_, about) in SUBCOMMANDS.items()))
    add_sweep_arguments(parser)
    add_run_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv and not argv[0].startswith("-") and argv[0] not in SUBCOMMANDS:
            # the sweep takes no positional argument: this was meant as a sub-command
            raise UserError(f"unknown sub-command '{argv[0]}'{did_you_mean(argv[0], SUBCOMMANDS)}; "
                            f"sub-commands: {', '.join(SUBCOMMANDS)} (none: a sweep)")
        if argv and argv[0] in SUBCOMMANDS:
            module_name, about = SUBCOMMANDS[argv[0]]
            add_arguments, command = importlib.import_module(module_name).COMMANDS[argv[0]]
            sub = argparse.ArgumentParser(prog=f"clbench {argv[0]}", description=about)
            add_arguments(sub)
            return int(command(sub.parse_args(argv[1:])) or 0)
        args = build_parser().parse_args(argv)
        # What can be checked without torch fails here, before the ~5 s of importing it: names,
        # tasks, seeds and recipes, then (unless --dry-run, which shows the plan first) whether the
        # data folders and weight files are there at all.
        checked(args)
        problems = [] if args.dry_run else check_args_files(args)
        if problems:
            raise PlanError(problems)
        return int(importlib.import_module(SWEEP_MODULE).main(args) or 0)
    except UserError as err:  # a problem the user can fix: its message, no traceback
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:  # Ctrl-C, or SIGTERM during a local sweep (clbench.stopping)
        signum = getattr(err, "signum", signal.SIGINT)
        print(f"error: interrupted by {signal.Signals(signum).name}; every file is complete or absent: "
              f"run the same command again to resume", file=sys.stderr)
        return 128 + signum
