"""Where each run of a sweep stands, and the sub-commands that say so:

    clbench status  [the sweep's options]              # one line per run
    clbench collect [the sweep's options] [--from DIR ...]

A run's state is joined from its result file, its status record (``<out>/status/<key>.json``,
written by whoever trains it: ``clbench.jobs``), its submission record (``<key>.submitted.json``,
written by the SLURM launcher) and, where jobs were submitted, SLURM's accounting (``sacct``):
a job that was cancelled, killed or timed out for good shows as failed with its log's last lines.
Local sweeps, ``--jobs`` children and SLURM jobs all write the same records, so ``status`` reads
any of them; reports never do (results come from result files only).
"""
from __future__ import annotations

import argparse
import os
import socket
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clbench import files
from clbench.config import without_execution_settings
from clbench.errors import CorruptFileError
from clbench.jobs import read_status, status_path
from clbench.options import add_launcher_arguments, add_sweep_arguments
from clbench.plan import PlannedRun, plan_from_args
from clbench.record import RunResult, read_result, result_path, write_result
from clbench.report.aggregate import load_runs, quick_table
from clbench.slurm.sacct import QUEUED_STATES, RUNNING_STATES, slurm_job_states

STATES = ("done", "running", "pending", "failed", "interrupted", "todo")


@dataclass
class RunState:
    """Where one run of the sweep stands, joined from its result file, status record,
    submission record and SLURM's accounting."""

    key: str
    state: str  # one of STATES
    job_id: str | None = None
    tasks_done: int = 0
    num_tasks: int = 0
    elapsed_s: float | None = None
    error: str | None = None  # traceback, or what SLURM says plus the log's last lines
    note: str = ""
    log: str | None = None  # the job's stderr file
    confirmed: bool = True  # False: failure inferred from SLURM only (the result may still appear)


def submission_path(out_root: Path, key: str) -> Path:
    return status_path(out_root, key).with_suffix(".submitted.json")


def _tail(text: str | None, lines: int) -> str:
    return "\n".join((text or "").rstrip().splitlines()[-lines:]) if lines > 0 else ""


def _file_tail(path: str | None, lines: int = 20) -> str:
    if not path:
        return ""
    try:
        with open(path, errors="replace") as f:
            return _tail(f.read()[-20000:], lines)
    except OSError:
        return ""


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        return True
    return True


def run_state(run: PlannedRun, record: dict[str, Any] | None, submitted: dict[str, Any] | None,
              slurm: dict[str, str], now: float) -> RunState:
    """One run's state from its result file, its status and submission records and ``slurm``
    (``slurm_job_states``)."""
    source = record or submitted or {}
    state = RunState(run.key, "todo", job_id=source.get("job_id"), num_tasks=run.config.num_tasks,
                     tasks_done=(record or {}).get("tasks_done", 0),
                     elapsed_s=(record or {}).get("elapsed_s"),
                     log=(record or {}).get("stderr") or (submitted or {}).get("stderr"))
    if state.job_id is None and record and record.get("host") == socket.gethostname():
        state.job_id = "local"
    if run.result_path.exists():
        try:
            result = read_result(run.result_path)
        except CorruptFileError as err:
            state.note = f"its result file is corrupt ({err.why}); rerun the sweep to redo it"
            return state
        state.state, state.tasks_done, state.elapsed_s = "done", run.config.num_tasks, result.wall_time_s
        return state
    job_state = slurm.get(source.get("job_id") or "", "")
    if record and record.get("state") == "failed":
        state.state, state.error = "failed", record.get("error") or "(no error recorded)"
    elif job_state in QUEUED_STATES or (not job_state and submitted and not record):
        state.state = "pending"
        if record and record.get("state") == "requeued":
            state.note = f"requeued, resumes after task {state.tasks_done}"
        elif submitted:
            state.note = f"submitted {duration(now - submitted.get('submitted_at', now))} ago"
    elif job_state in RUNNING_STATES:
        state.state = "running"
    elif record and record.get("state") == "interrupted":  # stopped by a signal, recorded by the run itself
        state.state = "interrupted"
        state.note = f"stopped by a signal; rerun to resume after task {state.tasks_done}"
    elif job_state:  # the job ended (COMPLETED, FAILED, CANCELLED, TIMEOUT, OUT_OF_MEMORY, ...)
        tail = _file_tail(state.log)
        state.state, state.confirmed = "failed", False
        state.error = f"job {state.job_id} ended {job_state} without a result" + (f"\n{tail}" if tail else "")
    elif record:  # no word from SLURM: a local run, or sacct cannot see the job
        local = record.get("job_id") is None and record.get("host") == socket.gethostname()
        state.state = "interrupted" if local and not _alive(record.get("pid")) else "running"
        if state.state == "interrupted":
            state.note = f"process {record.get('pid')} is gone; rerun to resume after task {state.tasks_done}"
    if state.state == "running" and record and record.get("state") == "running":
        state.elapsed_s = (record.get("elapsed_s") or 0.0) + now - record.get("updated_at", now)
    return state


def run_states(runs: list[PlannedRun], out_root: Path, slurm: dict[str, str] | None = None) -> list[RunState]:
    """Every run's state; SLURM's view comes from one ``sacct`` call unless ``slurm`` is given."""
    records = [(read_status(out_root, r.key), files.read_json(submission_path(out_root, r.key))) for r in runs]
    if slurm is None:
        slurm = slurm_job_states([(record or submitted or {}).get("job_id") for record, submitted in records])
    now = time.time()
    return [run_state(r, record, submitted, slurm, now) for r, (record, submitted) in zip(runs, records)]


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(max(seconds, 0))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def last_line(text: str | None) -> str:
    lines = [ln for ln in (text or "").strip().splitlines() if ln.strip()]
    return lines[-1].strip() if lines else ""


def format_states(states: list[RunState], error_lines: int = 5) -> str:
    """The ``status`` table: one line per run; a failed run's last error lines below it."""
    width = max([len(s.key) for s in states] + [3])
    job_width = max([len(s.job_id or "-") for s in states] + [3])
    out = [f"{'state':11s} {'run':{width}s} {'job':>{job_width}s} {'task':>7s} {'time':>8s}  note"]
    for s in states:
        task = f"{s.tasks_done}/{s.num_tasks}"
        note = last_line(s.error) if s.state == "failed" else s.note
        out.append(f"{s.state:11s} {s.key:{width}s} {s.job_id or '-':>{job_width}s} {task:>7s} "
                   f"{duration(s.elapsed_s):>8s}  {note}".rstrip())
        if s.state == "failed" and error_lines > 0 and "\n" in (s.error or "").strip():  # else the note has it
            out += [f"    | {line}" for line in _tail(s.error, error_lines).splitlines()]
            if s.log:
                out.append(f"    | log: {s.log}")
    counts = Counter(s.state for s in states)
    out.append(f"{len(states)} runs: " + ", ".join(f"{counts[k]} {k}" for k in STATES if counts[k]))
    return "\n".join(out)


# ================================================================================ the sub-commands


def _add_sweep_command_line(p: argparse.ArgumentParser) -> None:
    """The sweep's options, plus (hidden, ignored) those that only say how to run it, so that
    ``clbench status`` + the sweep's own command line works."""
    add_sweep_arguments(p)
    add_launcher_arguments(p, hidden=True)
    for flag in ("--no-progress", "--force", "--dry-run"):
        p.add_argument(flag, action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--launcher", help=argparse.SUPPRESS)


def _add_status_arguments(p: argparse.ArgumentParser) -> None:
    _add_sweep_command_line(p)
    p.add_argument("--lines", type=int, default=5, help="last lines of each failed run's error (default 5)")


def status_main(args: argparse.Namespace) -> int:
    """``clbench status``: one line per run of the sweep the options describe."""
    runs, out = plan_from_args(args)
    print(format_states(run_states(runs, out), args.lines))
    return 0


def _add_collect_arguments(p: argparse.ArgumentParser) -> None:
    _add_sweep_command_line(p)
    p.add_argument("--from", dest="sources", type=Path, action="append", default=[], metavar="DIR",
                   help="another results root to gather finished runs from (e.g. a cluster's scratch "
                        "copied back); repeatable")
    p.add_argument("--csv", type=Path, default=None, help="also write the sweep's runs, one row each, to this CSV")


def _same_run(result: RunResult, run: PlannedRun) -> bool:
    """The result was made by this run's configuration (its execution settings, such as where
    the data lives, the device and the worker count, may differ between machines)."""
    return result.run_key == run.key and without_execution_settings(result.config) == run.config.identity()


def collect_main(args: argparse.Namespace) -> int:
    """``clbench collect``: gather the sweep's finished results into the results root
    (from ``--from`` roots too), say what is missing, print the table. Exit 1 if incomplete."""
    runs, out = plan_from_args(args)
    copied = 0
    for r in runs:
        candidates = [result_path(source, r.key) for source in args.sources] if not r.done else []
        for path in filter(Path.exists, candidates):
            try:
                result = read_result(path)
            except CorruptFileError as err:
                print(f"[collect] skipped {err}")
                continue
            if not _same_run(result, r):
                print(f"[collect] skipped {path}: made by another configuration than this sweep's {r.key}")
                continue
            write_result(r.result_path, result)
            r.done, copied = True, copied + 1
            break
    for r in runs:
        if r.done and not _same_run(read_result(r.result_path), r):
            print(f"[collect] warning: {r.result_path} was made by another configuration than the current "
                  f"recipe of {r.key}; rerun it with --force to replace it")
    missing = [r for r in runs if not r.done]
    print(f"[collect] {len(runs) - len(missing)} of {len(runs)} runs finished"
          + (f" ({copied} gathered from {', '.join(map(str, args.sources))})" if args.sources else "")
          + f" -> {(out / 'runs').resolve()}")
    if missing:
        print(format_states(run_states(missing, out), error_lines=0))
    only = {str(r.result_path) for r in runs}
    print(quick_table(out, only=only))
    if args.csv:
        table = load_runs(out)
        table = table[table["path"].isin(only)] if not table.empty else table
        files.atomic_write_text(args.csv, table.to_csv(index=False))
        print(f"[collect] wrote {args.csv} ({len(table)} runs)")
    return 1 if missing else 0


COMMANDS = {"status": (_add_status_arguments, status_main), "collect": (_add_collect_arguments, collect_main)}
