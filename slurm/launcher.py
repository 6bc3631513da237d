"""Seeded sweeps on SLURM: submitit job arrays, preemption-safe resume, idempotent reruns.

    python run_suite.py --bench synth --tasks 5,10 --launcher slurm [--profile gpu] [--slurm time_min=120]
    python run_suite.py ... --launcher slurm --no-wait     # submit and return
    python run_suite.py ... --launcher sbatch --emit DIR   # write DIR/array.sbatch to submit by hand
    python run_suite.py status  [the sweep's options]       # one line per run (clbench.status)

How a sweep runs on the cluster:

* **One array per sweep.** Every run of the plan that has no result file becomes one element
  of a submitit job array (``slurm_array_parallelism`` from the profile). Each element calls
  ``clbench.jobs.run_job``, the entry point the local launcher calls too, and writes its own
  result file; nothing is shared in memory. SLURM gives all elements of an array one time
  limit, so runs whose methods have different limits go into one array per limit.
* **Preemption and time limits.** The protocol checkpoints atomically at every task boundary.
  An element is a ``submitit.helpers.Checkpointable``: on preemption or time-out submitit
  requeues it and ``run_job`` resumes from the last finished task, with the same numbers as
  an uninterrupted run. The signal (USR2) only asks the run to stop (``clbench.stopping``):
  submitit's own handler, which checkpoints, requeues and exits, runs once the run has reached
  a safe point, so a checkpoint being written when the signal came is completed first; a run
  whose result was complete is done, not requeued. (submitit ignores the SIGTERM that precedes
  a preemption's USR2, and so does the element.) A time limit therefore only has to exceed the longest single task. A
  run that is requeued ``max_stalled_requeues`` times in a row without finishing a task is
  failed instead of requeued forever (its task does not fit in the time limit).
* **Idempotent.** Running the same command again submits only runs that are neither finished
  nor queued/running; a run that failed is reported, with its error, and resubmitted only
  with ``--retry-failed`` (or ``--force``, which reruns everything).
* **Waiting.** ``--launcher slurm`` waits by default, printing progress, and ends with the
  sweep's table like the local launcher; ``--no-wait`` only submits. Interrupting the wait
  (Ctrl-C) leaves the jobs running; the same command later waits for them again.
* **Status.** Each run keeps a status record (``<out>/status/<key>.json``, written by the job)
  and, once submitted, a submission record (``<key>.submitted.json``: job id and log files,
  written by the launcher). ``clbench status`` (``clbench.status``) joins them with ``sacct``'s
  view of the jobs (``clbench.slurm.sacct``), so a job that was cancelled, killed or timed out
  for good shows as failed with its log's last lines.

Plain sbatch (``--launcher sbatch --emit DIR``) writes ``DIR/array.sbatch`` and ``DIR/tasks.jsonl``;
each element runs ``python -m clbench.slurm.launcher DIR/tasks.jsonl``, which calls the same
``run_job`` and, once the run has stopped at a safe point after the pre-time-out signal (USR2),
requeues itself (``scontrol requeue``); SIGTERM or SIGINT stop it as they stop a local sweep
(recorded interrupted, exit 143 or 130).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import socket
import string
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import submitit
import yaml

from clbench import files, stopping
from clbench.config import RunConfig, build_dataclass, update_dataclass
from clbench.errors import ConfigError
from clbench.jobs import failure_text, job_identity, read_status, record_failure, run_job, status_path, update_status
from clbench.methods import METHODS
from clbench.options import PROFILE_ENV
from clbench.plan import PlannedRun
from clbench.status import STATES, duration, last_line, run_states, submission_path

PROFILE_DIR = Path(__file__).resolve().parent / "profiles"
ARRAY_TEMPLATE = Path(__file__).resolve().parent / "array.sbatch"



# ================================================================================ profiles


@dataclass
class SlurmProfile:
    """What every array element asks SLURM for (``slurm/profiles/<name>.yaml``). Times in minutes."""

    partition: str | None = None  # None: the cluster's default partition
    account: str | None = None
    qos: str | None = None
    gpus_per_task: int = 0  # each element is one task on one node: sbatch --gpus-per-node
    cpus_per_task: int = 4  # also torch's thread count inside the job
    mem_gb: float | None = None  # None: the partition's default
    gpu_mem_gb: float | None = None  # memory of one GPU, for `clbench preflight`'s forecast (None: not checked)
    time_min: int = 240  # time limit of a run whose method has no entry below
    time_min_per_method: dict[str, int] = field(default_factory=dict)
    constraint: str | None = None
    array_parallelism: int = 64  # elements of one array running at once
    sbatch_extra: list[str] = field(default_factory=list)  # e.g. "--exclude=node7", "--mail-type=FAIL"
    setup: list[str] = field(default_factory=list)  # shell lines before the job (module load, conda activate)
    signal_delay_s: int = 120  # the pre-time-out signal comes this long before the limit
    max_stalled_requeues: int = 3  # requeues in a row without a finished task before a run fails

    def time_limit(self, method: str) -> int:
        return int(self.time_min_per_method.get(method, self.time_min))

    def memory_gib(self) -> float | None:
        """What one run may use: a GPU's memory with a GPU, else the job's memory (None: not stated)."""
        return self.gpu_mem_gb if self.gpus_per_task else self.mem_gb

    def extra_parameters(self) -> dict[str, Any]:
        """``sbatch_extra`` as submitit's ``additional_parameters`` ({"exclude": "node7"})."""
        extra: dict[str, Any] = {}
        for option in self.sbatch_extra:
            if not option.startswith("--"):
                raise ConfigError(f"sbatch_extra: '{option}' is not a long sbatch option; write it as "
                                  f"--name=value (e.g. --exclude=node7)")
            name, _, value = option[2:].partition("=")
            extra[name] = value if value else True
        return extra

    def submitit_parameters(self, time_min: int) -> dict[str, Any]:
        """Keyword arguments of ``submitit.SlurmExecutor.update_parameters``."""
        params: dict[str, Any] = {
            "job_name": "clbench", "time": time_min, "cpus_per_task": self.cpus_per_task,
            "array_parallelism": self.array_parallelism, "signal_delay_s": self.signal_delay_s,
            "partition": self.partition, "account": self.account, "qos": self.qos,
            "constraint": self.constraint, "mem": self.mem_gb,
            "gpus_per_node": self.gpus_per_task or None, "setup": self.setup or None,
            "additional_parameters": self.extra_parameters() or None,
        }
        return {k: v for k, v in params.items() if v is not None}

    def sbatch_directives(self) -> list[str]:
        """The ``#SBATCH`` lines of these resources (for the plain-sbatch array script)."""
        options = {"partition": self.partition, "account": self.account, "qos": self.qos,
                   "constraint": self.constraint, "cpus-per-task": self.cpus_per_task,
                   "mem": f"{int(self.mem_gb * 1024)}M" if self.mem_gb else None,
                   "gpus-per-node": self.gpus_per_task or None}
        lines = [f"#SBATCH --{k}={v}" for k, v in options.items() if v is not None]
        return lines + [f"#SBATCH {option}" for option in self.sbatch_extra]

    def describe(self) -> str:
        gpus = f"{self.gpus_per_task} GPU" if self.gpus_per_task else "no GPU"
        return (f"partition {self.partition or '(default)'}, {self.cpus_per_task} CPU, {gpus}, "
                f"time {self.time_min} min (per method: {self.time_min_per_method or 'none'}), "
                f"array parallelism {self.array_parallelism}")


def available_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))


def load_profile(name: str, overrides: list[str] | None = None) -> SlurmProfile:
    """The profile ``slurm/profiles/<name>.yaml`` (or a YAML file's path) with ``KEY=VALUE``
    overrides; unknown keys and unknown method names are errors."""
    path = Path(name) if name.endswith((".yaml", ".yml")) else PROFILE_DIR / f"{name}.yaml"
    if not path.exists():
        raise ConfigError(f"no SLURM profile '{name}' ({path} does not exist); available: "
                          f"{', '.join(available_profiles())}, or pass the path of a YAML file")
    with open(path) as f:
        values = yaml.safe_load(f) or {}
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: a profile is a mapping of keys (partition, time_min, ...)")
    profile = build_dataclass(SlurmProfile, values, f"profile {path.stem}")
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"--slurm expects KEY=VALUE (e.g. time_min=120 or "
                              f"time_min_per_method.hide_prompt=2880), got '{item}'")
        value = yaml.safe_load(raw)
        top, _, sub = key.strip().partition(".")
        if sub:  # one entry of a mapping, e.g. time_min_per_method.hide_prompt
            current = getattr(profile, top, None)
            if not isinstance(current, dict):
                raise ConfigError(f"--slurm {key}: '{top}' is not a mapping of the profile")
            value = {**current, sub: value}
        update_dataclass(profile, {top: value}, "--slurm")
    unknown = sorted(set(profile.time_min_per_method) - set(METHODS))
    if unknown:
        raise ConfigError(f"profile {path.stem}: time_min_per_method names unknown method(s) "
                          f"{', '.join(unknown)}; registered: {', '.join(sorted(METHODS))}")
    return profile


# ================================================================================ the job


def _limit_threads() -> None:
    """Use the CPUs SLURM gave the job, not every core of the node (elements share nodes)."""
    cpus = os.environ.get("SLURM_CPUS_PER_TASK")
    if cpus and cpus.isdigit():
        import torch

        torch.set_num_threads(int(cpus))


class NotRequeued(RuntimeError):
    """A preempted or timed-out run that will not be requeued (it stopped making progress)."""


def note_requeue(out_root: str, key: str, max_stalled: int) -> None:
    """Record that this run is about to be requeued, or raise ``NotRequeued``: a run is requeued
    while it makes progress, and fails after ``max_stalled`` requeues in a row without a
    finished task (a task longer than the time limit would otherwise loop forever)."""
    record = read_status(out_root, key) or {}
    attempts = record.get("attempts") or [{}]
    mine = attempts[-1].get("pid") == os.getpid() and attempts[-1].get("host") == socket.gethostname()
    progressed = mine and record.get("tasks_done", 0) > attempts[-1].get("from_task", 0)
    stalled = 0 if progressed else int(record.get("stalled_requeues", 0)) + 1
    if stalled > max_stalled:
        raise NotRequeued(f"{key}: interrupted {stalled} times in a row without finishing a task "
                          f"(after task {record.get('tasks_done', 0)}); raise the time limit "
                          f"(--slurm time_min=..., or time_min_per_method in the profile)")
    update_status(out_root, key, state="requeued", stalled_requeues=stalled)


def _job(config: dict[str, Any], out_root: str) -> dict[str, Any] | None:
    """An element's run: ``run_job`` on the CPUs SLURM gave the job, a failure recorded with its
    traceback (a stop is no failure: ``run_job`` recorded the run interrupted, or done)."""
    _limit_threads()
    try:
        return run_job(config, out_root, progress=False)
    except Exception as err:
        record_failure(Path(out_root), RunConfig.from_dict(config).key, failure_text(err))
        raise


class SlurmRun(submitit.helpers.Checkpointable):
    """What each array element runs: ``clbench.jobs.run_job``, with a failure recorded with its
    traceback. Checkpointable: on preemption or time-out submitit calls ``checkpoint`` and
    requeues the same call, which resumes from the run's last task checkpoint (the protocol's;
    nothing of this object needs saving). submitit's handler of that signal would do so where
    the signal lands (inside a checkpoint write, whose error then replaced the exit); here the
    signal only asks the run to stop, and submitit's handler runs once it has, at a safe point."""

    def __init__(self, max_stalled_requeues: int = 3):
        self.max_stalled_requeues = max_stalled_requeues

    def __call__(self, config: dict[str, Any], out_root: str) -> dict[str, Any] | None:
        preempted = getattr(signal, "SIG" + submitit.JobEnvironment.USR_SIG)  # USR2 unless the cluster says
        checkpoint_and_requeue = signal.getsignal(preempted)  # submitit's, set before it calls us
        try:
            with stopping.handling((preempted,)):
                return _job(config, out_root)
        except stopping.Interrupted as err:
            if err.signum != preempted or not callable(checkpoint_and_requeue):
                raise
        try:
            checkpoint_and_requeue(preempted, None)  # self.checkpoint (note_requeue), scontrol requeue, exit
        except Exception as err:  # NotRequeued: stalled
            record_failure(Path(out_root), RunConfig.from_dict(config).key, failure_text(err))
            raise
        return None

    def checkpoint(self, config: dict[str, Any], out_root: str) -> submitit.helpers.DelayedSubmission:
        note_requeue(out_root, RunConfig.from_dict(config).key, self.max_stalled_requeues)
        return super().checkpoint(config, out_root)


# ================================================================================ submitit


def submit_runs(runs: list[PlannedRun], profile: SlurmProfile, out_root: Path) -> list[str]:
    """Submit ``runs`` as job arrays (one per distinct time limit); returns the array ids.
    Each run's old status record is cleared and a submission record written."""
    groups: dict[int, list[PlannedRun]] = {}
    for r in runs:
        groups.setdefault(profile.time_limit(r.config.method), []).append(r)
    arrays = []
    for time_min, group in sorted(groups.items()):
        # submitit's own time-out counter is not used: note_requeue decides (progress, not count)
        executor = submitit.SlurmExecutor(folder=out_root / "slurm" / "%j", max_num_timeout=10**6)
        executor.update_parameters(**profile.submitit_parameters(time_min))
        for r in group:  # a resubmitted run starts a fresh record (its checkpoint is kept)
            status_path(out_root, r.key).unlink(missing_ok=True)
        with executor.batch():
            jobs = [executor.submit(SlurmRun(profile.max_stalled_requeues), r.config.to_dict(), str(out_root))
                    for r in group]
        now = time.time()
        for r, job in zip(group, jobs):
            files.atomic_write_json(submission_path(out_root, r.key), {
                "job_id": job.job_id, "submitted_at": now, "time_min": time_min, "launcher": "slurm",
                "stdout": str(job.paths.stdout), "stderr": str(job.paths.stderr)})
        array_id = jobs[0].job_id.split("_")[0]
        arrays.append(array_id)
        print(f"[slurm] submitted {len(group)} run(s) as job {'array ' if len(group) > 1 else ''}{array_id} "
              f"(time limit {time_min} min); logs under {out_root / 'slurm'}", flush=True)
    return arrays


def wait_for_runs(runs: list[PlannedRun], out_root: Path, poll_s: float = 15.0,
                  timeout_s: float | None = None, settle_s: float = 30.0,
                  echo: Callable[[str], None] = print) -> list[tuple[PlannedRun, str]] | None:
    """Poll until no run is pending or running, printing progress; returns the runs not done
    with their errors. ``None`` when the wait was interrupted (Ctrl-C): the jobs keep running.
    A failure seen only in SLURM's accounting (no record from the job) is believed after
    ``settle_s``, since a result file may reach a shared file system late."""
    start, last_progress, last_print = time.time(), "", 0.0
    suspected: dict[str, float] = {}
    reported: set[str] = set()
    try:
        while True:
            states = run_states(runs, out_root)
            now = time.time()
            finished = []
            for s in states:
                if s.state == "failed" and not s.confirmed:
                    suspected.setdefault(s.key, now)
                    if now - suspected[s.key] < settle_s:
                        finished.append(False)
                        continue
                finished.append(s.state not in ("pending", "running"))  # nothing more will happen
                if s.state == "failed" and s.key not in reported:
                    reported.add(s.key)
                    echo(f"[slurm] FAILED {s.key} (job {s.job_id}): {last_line(s.error)}")
            counts = Counter(s.state for s in states)
            line = ", ".join(f"{counts[k]} {k}" for k in STATES if counts[k]) + f" of {len(runs)}"
            if line != last_progress or now - last_print > 600:
                echo(f"[slurm {duration(now - start)}] {line}")
                last_progress, last_print = line, now
            if all(finished):
                break
            if timeout_s is not None and now - start > timeout_s:
                echo(f"[slurm] stopped waiting after {duration(now - start)}; unfinished jobs keep running "
                     f"(follow them with `clbench status` and the same sweep options)")
                break
            time.sleep(poll_s)
    except KeyboardInterrupt:
        echo("\n[slurm] stopped waiting; the jobs keep running. Follow them with `clbench status` "
             "(same sweep options), or run the same command again to wait for them.")
        return None
    return [(r, s.error or f"still {s.state} when the wait ended") for r, s in zip(runs, states)
            if s.state != "done"]


# ================================================================================ plain sbatch


def emit_array(runs: list[PlannedRun], profile: SlurmProfile, out_root: Path, emit_dir: Path) -> Path:
    """Write ``emit_dir/array.sbatch`` and ``emit_dir/tasks.jsonl`` (one run per line) for
    ``sbatch emit_dir/array.sbatch``. The array's time limit is the longest of its runs'."""
    emit_dir = emit_dir.resolve()
    (emit_dir / "logs").mkdir(parents=True, exist_ok=True)
    tasks = emit_dir / "tasks.jsonl"
    lines = [json.dumps({"key": r.key, "out_root": str(out_root), "config": r.config.to_dict(),
                         "max_stalled_requeues": profile.max_stalled_requeues}) for r in runs]
    files.atomic_write_text(tasks, "\n".join(lines) + "\n")
    script = string.Template(ARRAY_TEMPLATE.read_text()).substitute(
        emit_dir=emit_dir, last=len(runs) - 1, parallelism=min(profile.array_parallelism, len(runs)),
        logs=emit_dir / "logs", time=max(profile.time_limit(r.config.method) for r in runs),
        signal_delay_s=profile.signal_delay_s, directives="\n".join(profile.sbatch_directives()),
        setup="\n".join(profile.setup), workdir=shlex.quote(str(Path.cwd())),
        python=shlex.quote(sys.executable), tasks=shlex.quote(str(tasks)))
    path = emit_dir / "array.sbatch"
    files.atomic_write_text(path, script)
    print(f"[sbatch] wrote {path} ({len(runs)} runs, one per line of {tasks})\n"
          f"         submit with: sbatch {path}", flush=True)
    return path


def run_task_file(tasks_file: Path, index: int) -> dict[str, Any] | None:
    """One element of an emitted array: line ``index`` of ``tasks_file`` through ``run_job``.
    The pre-time-out/preemption signal (USR2) asks the run to stop; once it has (at a safe
    point) the element requeues itself and later resumes from its last finished task. SIGTERM
    and SIGINT stop it as they stop a local sweep: ``Interrupted`` is raised."""
    lines = Path(tasks_file).read_text().splitlines()
    if not 0 <= index < len(lines):
        raise ConfigError(f"{tasks_file} has {len(lines)} runs; there is no index {index}")
    entry = json.loads(lines[index])
    key, out_root = entry["key"], entry["out_root"]
    identity = job_identity()
    logs = Path(tasks_file).parent / "logs" / str(identity["job_id"])  # array.sbatch: logs/%A_%a.{out,err}
    try:
        with stopping.handling((signal.SIGTERM, signal.SIGINT, signal.SIGUSR2)):
            update_status(Path(out_root), key, state="starting", stdout=f"{logs}.out", stderr=f"{logs}.err",
                          **identity)
            return _job(entry["config"], out_root)
    except stopping.Interrupted as err:
        if err.signum != signal.SIGUSR2:
            raise
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # what `scontrol requeue` sends: this process is leaving
    try:
        note_requeue(out_root, key, entry["max_stalled_requeues"])
    except NotRequeued as err:
        record_failure(Path(out_root), key, str(err))
        raise
    subprocess.run(["scontrol", "requeue", os.environ["SLURM_JOB_ID"]], check=True, timeout=60)
    raise SystemExit(0)  # SLURM ends the job now; the requeued one resumes from the checkpoint


# ================================================================================ the CLI


def profile_from_args(args: argparse.Namespace) -> SlurmProfile:
    name = args.profile or os.environ.get(PROFILE_ENV) or "local"
    return load_profile(name, args.slurm_overrides)


def launch(runs: list[PlannedRun], args: argparse.Namespace, out_root: Path) -> list[tuple[PlannedRun, str]] | None:
    """Run the unfinished runs of a sweep on SLURM. ``--launcher slurm`` submits what is neither
    queued/running nor failed before, then waits (unless ``--no-wait``) and returns the
    failures; ``--launcher sbatch`` writes the array script and returns None."""
    out_root = Path(out_root).resolve()
    profile = profile_from_args(args)
    if args.launcher == "sbatch":
        if args.emit is None:
            raise ConfigError("--launcher sbatch needs --emit DIR (where to write array.sbatch and tasks.jsonl)")
        if runs:
            emit_array(runs, profile, out_root, args.emit)
        else:
            print("[sbatch] nothing to emit: every run of this sweep is finished (--force reruns)")
        return None
    if shutil.which("sbatch") is None:
        raise ConfigError("--launcher slurm needs SLURM's sbatch on PATH (run on a login node); "
                          "--launcher local runs here, --launcher sbatch --emit DIR writes a script")
    if not runs:
        print("[slurm] nothing to submit: every run of this sweep is finished")
        return []
    states = run_states(runs, out_root)
    retry = args.retry_failed or args.force
    active = [r for r, s in zip(runs, states) if s.state in ("pending", "running")]
    failed = [(r, s) for r, s in zip(runs, states) if s.state == "failed" and not retry]
    skip = {r.key for r in active} | {r.key for r, _ in failed}
    submit = [r for r in runs if r.key not in skip]
    print(f"[slurm] profile: {profile.describe()}")
    if active:
        print(f"[slurm] {len(active)} run(s) already queued or running: not resubmitted")
    for r, s in failed:
        print(f"[slurm] {r.key} failed before (job {s.job_id}): {last_line(s.error)}")
    if failed:
        print(f"[slurm] {len(failed)} failed run(s) not resubmitted; `clbench status` shows their errors, "
              f"--retry-failed resubmits them")
    if submit:
        submit_runs(submit, profile, out_root)
    else:
        print("[slurm] nothing to submit")
    failures = [(r, s.error or "failed") for r, s in failed]
    watched = active + submit
    if args.no_wait or not watched:
        if args.no_wait and watched:
            print("[slurm] not waiting; follow the runs with `clbench status` (same sweep options)")
        return None if args.no_wait else failures
    timeout = args.wait_timeout * 60 if args.wait_timeout is not None else None
    waited = wait_for_runs(watched, out_root, args.poll, timeout)
    return None if waited is None else failures + waited


def main(argv: list[str] | None = None) -> int:
    """``python -m clbench.slurm.launcher TASKS.jsonl [--index I]``: one element of an emitted array
    (the index defaults to ``$SLURM_ARRAY_TASK_ID``)."""
    p = argparse.ArgumentParser(prog="python -m clbench.slurm.launcher", description=main.__doc__)
    p.add_argument("tasks", type=Path)
    p.add_argument("--index", type=int, default=None)
    args = p.parse_args(argv)
    index = args.index if args.index is not None else os.environ.get("SLURM_ARRAY_TASK_ID")
    if index is None:
        p.error("no --index and no $SLURM_ARRAY_TASK_ID (this runs inside an array element)")
    try:
        run_task_file(args.tasks, int(index))
    except KeyboardInterrupt as err:  # SIGTERM or SIGINT: the run was recorded interrupted
        return 128 + (stopping.interrupted_by(err) or signal.SIGINT)
    return 0


if __name__ == "__main__":
    sys.exit(main())
