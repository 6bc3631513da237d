"""The command line's options, defined without importing anything heavy, so that ``--help``
answers at once: which runs a sweep holds (shared by the sweep, ``status`` and ``collect``),
how it runs, and the SLURM launcher's options."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from clbench.config import SAVE_MODEL

PROFILE_ENV = "CLBENCH_SLURM_PROFILE"


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
                   help="benchmark(s): imr, ima, dn, c100, cub, synth (default synth), or folder:PATH for "
                        "your own images (PATH/train/<class>/* + PATH/test/<class>/*, or PATH/<class>/*)")
    p.add_argument("--tasks", type=_csv(int), default=None,
                   help="numbers of tasks, e.g. 5,10,20 (default: the benchmark's own)")
    p.add_argument("--methods", type=str, default="all", help="comma-separated method names, or all")
    p.add_argument("--seeds", type=_csv(int), default=[0, 1, 2], help="training seeds (default 0,1,2)")
    p.add_argument("--joint", default="auto", metavar="METHODS",
                   help="reference rows: these methods also trained on every class at once (one task), the upper "
                        "bound; a comma-separated list, all (every planned method), none, or auto (default: "
                        "joint full fine-tuning with --methods all, else none)")
    p.add_argument("--class-order-seed", type=int, default=None,
                   help="fix the class order across seeds (default: each seed draws its own order, as PILOT)")
    p.add_argument("--data-root", type=str, default=None, help="dataset root (default $CLBENCH_DATA or ./data)")
    p.add_argument("--device", type=str, default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--backbone", type=str, default=None, help="timm model name, overrides every recipe")
    p.add_argument("--pretrained-path", type=str, default=None, help="local weights file for the backbone")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any recipe key, e.g. --set train.lr=0.01 --set method.rank=8; "
                        "comma-separated values make a grid: --set train.lr=0.005,0.01 --set method.rank=4,8 "
                        "plans the 4 combinations")
    p.add_argument("--eval-on", choices=["test", "val"], default="test",
                   help="test (default): evaluate on the test set; val: on a validation split of each task's "
                        "training data (data.val_fraction, default 10%% of each class), never reading the test "
                        "set, for choosing a configuration with `clbench report --select best-val`")
    p.add_argument("--plugins", type=_csv(str), default=[], metavar="MODULE,..",
                   help="modules (importable names or .py files) that register your own methods or "
                        "benchmarks; imported before planning, and by every worker (SLURM too)")
    p.add_argument("--out", type=Path, default=None, help="results root (default $CLBENCH_RESULTS or ./results)")


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    """The options that say how the sweep runs (the sweep command only)."""
    p.add_argument("--dry-run", action="store_true", help="print the plan and the recipe of each run")
    p.add_argument("--force", action="store_true", help="rerun every planned run from its first task, even finished ones "
                   "(a finished result is kept as <result>.json.prev)")
    p.add_argument("--log", type=_csv(str), default=[], metavar="tensorboard,wandb",
                   help="mirror each run's training curves (loss, learning rate per epoch, accuracy per task) "
                        "to TensorBoard (<out>/logs/<run>/) and/or Weights & Biases (WANDB_MODE=offline works)")
    p.add_argument("--save-model", choices=SAVE_MODEL, default="none",
                   help="keep the trained method beside the result: <out>/models/<run>/task<t>.pt after the "
                        "last task (final) or after every task; load with clbench.protocol.load_model")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bars (there are none unless stderr is a terminal: one line per task)")
    p.add_argument("--launcher", choices=["local", "slurm", "sbatch"], default="local",
                   help="where runs execute (default: in this process)")
    g = p.add_argument_group("parallel runs on this machine (--launcher local)")
    g.add_argument("--jobs", type=_jobs, default=os.environ.get(JOBS_ENV, "auto"), metavar="K|auto",
                   help="run K runs at once, each in its own process on the runs' device; auto (default, "
                        f"or ${JOBS_ENV}): one at a time on a GPU, and on a machine without one a run per "
                        f"core, at most {MAX_AUTO_JOBS} (small models train faster so than with all cores "
                        "on one run); 1: one after the other in this process")
    g.add_argument("--devices", type=_devices, default=None, metavar="0,1,..",
                   help="one worker process per device, each running one run at a time: GPU indices "
                        "(cuda:N) or device names (cpu)")
    g.add_argument("--threads", type=int, default=None, metavar="N",
                   help="CPU threads per run (torch.set_num_threads); default: torch's own for one run, "
                        "the cores divided among the workers for several")
    add_launcher_arguments(p)


JOBS_ENV = "CLBENCH_JOBS"
MAX_AUTO_JOBS = 8


def _jobs(text: str) -> int | str:
    """``--jobs``: a count (``check_args`` refuses one below 1 at plan time), or ``auto``."""
    if str(text).strip() == "auto":
        return "auto"
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number of runs at once: give 1 or more, or auto") from None


def _devices(text: str) -> list[str]:
    """``0,1`` -> ``['cuda:0', 'cuda:1']``; other names (``cpu``, ``cuda:2``) as given."""
    return [f"cuda:{d}" if d.strip().isdigit() else d.strip() for d in text.split(",") if d.strip()]


def add_launcher_arguments(parser: argparse.ArgumentParser, hidden: bool = False) -> None:
    """Options of ``--launcher slurm`` and ``--launcher sbatch`` (added to the sweep's parser);
    ``hidden``: accepted but not shown in ``--help``."""
    g = parser.add_argument_group("SLURM (--launcher slurm | sbatch)")

    def text(help_text: str) -> str:
        return argparse.SUPPRESS if hidden else help_text

    g.add_argument("--profile", default=None, help=text(
        f"cluster profile: a name in slurm/profiles (gpu, local, ...) or a YAML path "
        f"(default ${PROFILE_ENV}, else 'local')"))
    g.add_argument("--slurm", dest="slurm_overrides", action="append", default=[], metavar="KEY=VALUE", help=text(
        "override a profile key, e.g. --slurm partition=gpu --slurm time_min=600 "
        "--slurm time_min_per_method.hide_prompt=2880"))
    g.add_argument("--no-wait", action="store_true", help=text("submit and return (default: wait, with progress)"))
    g.add_argument("--poll", type=float, default=15.0, help=text("seconds between checks while waiting (default 15)"))
    g.add_argument("--wait-timeout", type=float, default=None, metavar="MINUTES", help=text(
        "stop waiting after this long (the jobs keep running); default: no limit"))
    g.add_argument("--retry-failed", action="store_true", help=text(
        "resubmit runs that failed before (default: report them, do not resubmit)"))
    g.add_argument("--speed", type=Path, action="append", default=[], metavar="FILE", help=text(
        "figures of `clbench speed --json FILE` (repeatable): `clbench preflight` forecasts each run's "
        "hours and memory from them, and --launcher slurm submits no run that would not fit the profile"))
    g.add_argument("--ignore-forecast", action="store_true", help=text(
        "--launcher slurm: submit runs that the --speed figures say do not fit the profile"))
    g.add_argument("--emit", type=Path, default=None, metavar="DIR", help=text(
        "--launcher sbatch: write DIR/array.sbatch and DIR/tasks.jsonl"))


def add_preflight_arguments(p: argparse.ArgumentParser) -> None:
    """``clbench preflight``: the sweep's options and the SLURM profile's."""
    add_sweep_arguments(p)
    add_launcher_arguments(p)
