"""Running a plan's runs: the one job entry point (``run_job``), claims, status records, and the
local launchers: one run after the other (``run_local``), or several at once (``run_parallel``).

``run_job`` needs nothing but the run's configuration dictionary and the results root; every
launcher calls it (in-process here, SLURM in ``clbench.slurm``).

Each run also has a status record, ``<out>/status/<key>.json``, for ``clbench status``:
``run_job`` writes its progress (state, task reached, time so far, who runs it) and the
launcher's job wrapper writes a failure with its traceback (``record_failure``). Records are
written atomically and never read by reports: results come from result files only.

A run is claimed before it trains (``claim``: a record lock on ``<out>/claims/<key>.lock``), so
concurrent sweeps and jobs on one results root train each run once. The claim's holder alone
writes the run's files: it removes the temporary files that a killed holder left, and moves a
result file that does not read back aside (``*.corrupt``) and redoes the run.

A run that fails for a reason its message states (``RunFailed``: its training diverged) is
recorded failed with that message, and the sweep goes on with the other runs; a ``UserError``
(bad data, a full disk) is recorded and stops the sweep, its message on one line. SIGTERM and
Ctrl-C stop a sweep at the run's next safe point (``clbench.stopping``): every file is complete
or absent, the run's last checkpoint holds its finished tasks, it is recorded interrupted (or
done, if its result was complete), no further run starts, and running the same command again
resumes it.

``run_parallel`` (``--jobs K``, ``--devices``) is a thin layer over ``run_local``: K child
processes each run the same serial loop over the same plan, each taking the next run that no
other process holds (the claims) or took before (a flag per run the children share, so a run
that failed in one is not retried by another), on its own device with its own thread count,
sharing one stop state.
"""
from __future__ import annotations

import contextlib
import fcntl
import multiprocessing
import multiprocessing.connection
import os
import queue as queue_module
import signal
import socket
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from clbench import files, record, stopping
from clbench.catalog import import_plugins
from clbench.config import RunConfig
from clbench.errors import CorruptFileError, RunFailed, UserError
from clbench.plan import PlannedRun, finished
from clbench.protocol import run


def status_path(out_root: Path, key: str) -> Path:
    """Where a run's status record lives: ``<out>/status/<key>.json``."""
    return Path(out_root) / "status" / f"{key}.json"


def read_status(out_root: Path, key: str) -> dict[str, Any] | None:
    """The run's status record, or None when there is none; one that does not read back is
    moved aside (``*.corrupt``) and the run has none."""
    path = status_path(out_root, key)
    try:
        return files.read_checked_json(path)
    except FileNotFoundError:
        return None
    except CorruptFileError as err:
        with contextlib.suppress(FileNotFoundError):  # another reader moved it first
            files.set_aside(path, err.why, "status record", "a new one is started")
        return None
    except OSError:  # unreadable (permissions): no record to show
        return None


def update_status(out_root: Path, key: str, **fields: Any) -> dict[str, Any]:
    """Merge ``fields`` into the run's status record (atomically) and return the record."""
    record = read_status(out_root, key) or {}
    record.update(fields, updated_at=time.time())
    files.atomic_write_json(status_path(out_root, key), record, checksum=True)
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
    """Mark the run failed with its traceback or message; called by the launcher that ran the
    job. A status record that cannot be written (a full disk) is not worth a second error."""
    with contextlib.suppress(OSError, UserError):
        update_status(out_root, key, state="failed", error=error, **job_identity())


def failure_text(err: BaseException) -> str:
    """How a failed run's error is recorded: a ``RunFailed``'s or ``UserError``'s message (it
    says everything), any other exception's traceback."""
    if isinstance(err, (RunFailed, UserError)):
        return str(err)
    return "".join(traceback.format_exception(err))


def claim_path(out_root: Path, key: str) -> Path:
    """The run's claim: ``<out>/claims/<key>.lock``, locked by the process that trains it."""
    return Path(out_root) / "claims" / f"{key}.lock"


@contextlib.contextmanager
def claim(out_root: Path, key: str) -> Iterator[bool]:
    """Hold the run's claim while the block runs; yields False (and holds nothing) when a live
    process holds it. A POSIX record lock (``fcntl.lockf``): NFS supports it across nodes, and the
    kernel (or the NFS lock manager) releases it when its holder dies, so a dead holder's claim is
    free to take. The lock file is never deleted: a deletion could race with another taker."""
    path = claim_path(out_root, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:  # "a+": no truncation, the file is shared
        try:
            fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # EACCES or EAGAIN: held by a live process
            yield False
            return
        try:
            yield True
        finally:
            fcntl.lockf(handle, fcntl.LOCK_UN)


def holder(out_root: Path, key: str) -> str:
    """Who trains the run, as its status record says."""
    status = read_status(out_root, key) or {}
    who = ", ".join(f"{k} {status[k]}" for k in ("job_id", "host", "pid") if status.get(k))
    return who or "another process"


def remove_leftovers(out_root: Path, key: str) -> None:
    """Remove the temporary files a killed holder of the run's claim left beside its result,
    checkpoint and status record; only the claim's holder may."""
    for written in (record.result_path(out_root, key), record.checkpoint_path(out_root, key),
                    status_path(out_root, key)):
        files.remove_temporaries(written)


def tidy(runs: list[PlannedRun], out_root: Path) -> None:
    """``remove_leftovers`` of the plan's finished runs (``run_job`` does it for the others)
    that no live process holds: a process killed while it wrote a status record after the
    result. Only finished runs: nobody claims those again, so holding their claim a moment
    makes no job skip its run."""
    for r in runs:
        if r.done:
            with claim(out_root, r.key) as claimed:
                if claimed:
                    remove_leftovers(Path(out_root), r.key)


def run_job(config: dict[str, Any], out_root: str, progress: bool = True,
            on_claim: Callable[[], bool] | None = None) -> dict[str, Any] | None:
    """The job entry point of every launcher: run one configuration and return its metrics.
    A finished run (its result file exists) is not run again. The run is claimed first
    (``claim``): while another live process trains it, this one says so and returns None. While
    it runs, its status record says how far it got; ``attempts`` lists every start
    (``from_task`` > 0: resumed from its checkpoint, e.g. after its holder died).
    ``on_claim()`` is called when this process holds the claim and is about to train the run;
    it may return False to skip it (a sibling process took it earlier). With it, a run that
    another process holds is skipped without a word (the caller's siblings run the same plan)."""
    import_plugins(config.get("plugins") or [])  # a worker registers what the sweep's process did
    cfg = RunConfig.from_dict(config)
    key = cfg.key
    path = record.result_path(Path(out_root), key)
    if finished(path):
        return record.read_result(path).metrics
    with claim(Path(out_root), key) as claimed:
        if not claimed:
            if on_claim is None:
                print(f"[{key}] skipped: being trained by {holder(Path(out_root), key)}", flush=True)
            return None
        remove_leftovers(Path(out_root), key)
        if path.exists():  # finished by the process that held the claim before us, or corrupt
            try:
                return record.read_result(path).metrics
            except CorruptFileError as err:
                files.set_aside(path, err.why, "result file", "the run is redone")
        if on_claim is not None and not on_claim():
            return None
        try:
            return _run_claimed(cfg, out_root, progress)
        except BaseException as err:
            signum = stopping.interrupted_by(err)
            if signum is None:
                raise
            if _record_stop(Path(out_root), cfg, signum):  # its result was complete: the run is done
                return record.read_result(path).metrics
            if isinstance(err, stopping.Interrupted):
                raise
            raise stopping.Interrupted(signum) from err  # what the stop set off is not the run's failure


def _run_claimed(cfg: RunConfig, out_root: str, progress: bool) -> dict[str, Any]:
    key = cfg.key
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


def _record_stop(out_root: Path, cfg: RunConfig, signum: int) -> bool:
    """After a stop (``signum``) of a run this process holds: a run whose result is complete is
    done, whatever its last status write met (returns True); any other is recorded interrupted,
    and how far it got and how to resume is said on stderr, in one write (a ``--jobs`` sweep's
    children's lines do not interleave)."""
    key, num_tasks = cfg.key, cfg.num_tasks
    status = read_status(out_root, key) or {}
    state = "done" if finished(record.result_path(out_root, key)) else "interrupted"
    if status.get("state") != state:
        with contextlib.suppress(OSError, UserError):
            update_status(out_root, key, state=state, error=None)
    if state == "done":
        return True
    kept = min(status.get("tasks_done", 0), num_tasks - 1)  # the last task is kept by the result alone
    held = f"its checkpoint holds tasks 1-{kept}" if kept else "no task had finished"
    then = ("the job is requeued and resumes from there" if signum == signal.SIGUSR2  # SLURM's time-out notice
            else "run the same command again to resume")
    sys.stderr.write(f"[{key}] interrupted by {signal.Signals(signum).name} during task {kept + 1}/{num_tasks}: "
                     f"{held}; {then}\n")
    sys.stderr.flush()
    return False


def run_local(runs: list[PlannedRun], out_root: Path, progress: bool = True, device: str | None = None,
              taken: Any = None) -> list[tuple[PlannedRun, str]]:
    """Run the plan in this process, one run after the other. Returns the failures
    (run, traceback or message); a failing run does not stop the others, a ``UserError`` (bad
    data, a full disk) is recorded and stops the sweep. SIGTERM or Ctrl-C stops the run at its
    next safe point (``clbench.stopping``; it is recorded interrupted and resumes when run
    again) and starts no further run: ``Interrupted`` is raised. ``device``: every run's, in
    place of its own (an execution setting). ``taken``: other processes run the same plan
    (``run_parallel``) and these flags, one per run, shared with them, say which runs one of
    them took: each run is trained by one process at most (one that failed in another process
    is not tried again here); a run another holds or took is skipped without a word, their stop
    is this loop's stop, and a user error here asks them to start no further run."""
    failures: list[tuple[PlannedRun, str]] = []
    with stopping.handling():
        for i, r in enumerate(runs):
            stopping.check()  # the sweep was interrupted: no further run
            if stopping.no_more_runs():  # a user error in another process of the sweep
                break
            where = f"[{i + 1}/{len(runs)}]"
            config = r.config.to_dict() if device is None else {**r.config.to_dict(), "device": device}

            def take(i: int = i, where: str = where, key: str = r.key) -> bool:
                """Under the run's claim: whether no sibling took the run before (they set the flag
                under the claim too, so one that failed and let go of it is not taken again)."""
                if taken[i]:
                    return False
                taken[i] = 1
                print(f"{where} {key}", flush=True)
                return True

            if taken is None:
                print(f"{where} {r.key}", flush=True)
            try:
                run_job(config, str(out_root), progress, on_claim=None if taken is None else take)
            except UserError as err:
                record_failure(out_root, r.key, failure_text(err))
                stopping.start_no_more_runs()
                raise  # the user must fix these; every later run would fail the same way
            except Exception as err:  # keep going: one broken run must not cost the rest of the sweep
                signum = stopping.interrupted_by(err)
                if signum is not None:  # what a stop set off outside the run's claim
                    raise stopping.Interrupted(signum) from err
                failures.append((r, failure_text(err)))
                record_failure(out_root, r.key, failures[-1][1])
                sep = " " if isinstance(err, RunFailed) else "\n"
                print(f"{where} {r.key} FAILED:{sep}{failures[-1][1]}", flush=True)
    return failures


# ----------------------------------------------------------------------------- parallel


class PrefixedLines:
    """A ``--jobs`` child's stdout or stderr: each complete line prefixed and written in one
    ``os.write``, so that the children's lines stay whole and say whose they are."""

    encoding, errors = "utf-8", "replace"

    def __init__(self, fd: int, prefix: str):
        self.fd, self.prefix, self.pending = fd, prefix, ""

    def write(self, text: str) -> int:
        self.pending += text
        *lines, self.pending = self.pending.split("\n")
        for line in lines:
            self._write(f"{self.prefix}{line}\n")
        return len(text)

    def _write(self, text: str) -> None:
        data = text.encode(errors="replace")
        while data:
            data = data[os.write(self.fd, data):]

    def flush(self) -> None:  # a partial line waits for its end
        pass

    def close(self) -> None:
        if self.pending:
            self._write(f"{self.prefix}{self.pending}\n")
            self.pending = ""

    def isatty(self) -> bool:
        return False

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self.fd


def _child(index: int, runs: list[PlannedRun], out_root: Path, device: str | None, threads: int,
           shared: stopping.SharedStop, taken: Any, parent: int, reports: Any, prefix: str) -> None:
    """One process of a ``--jobs`` sweep: ``run_local`` over the whole plan, then one report to
    the parent: ``(index, failures as (key, text), user error, signal that stopped it, crash)``."""
    sys.stdout, sys.stderr = PrefixedLines(1, prefix), PrefixedLines(2, prefix)
    stopping.join(shared, parent)
    torch.set_num_threads(threads)
    failures: list[tuple[str, str]] = []
    user_error = crash = None
    signum = None
    try:
        failures = [(r.key, text) for r, text in run_local(runs, out_root, False, device, taken)]
    except UserError as err:
        user_error = str(err)
    except KeyboardInterrupt as err:
        signum = stopping.interrupted_by(err)
    except Exception as err:  # a bug outside any run
        crash = failure_text(err)
    finally:
        if os.getppid() == parent:  # else nobody reads it, and the queue would wait for a reader at exit
            reports.put((index, failures, user_error, signum, crash))
        sys.stdout.close()
        sys.stderr.close()


def _collect_reports(children: list[Any], reports: Any) -> dict[int, tuple]:
    """Wait for every child to exit, reading their reports meanwhile (a child whose report
    does not fit the pipe exits only once it is read)."""
    received: dict[int, tuple] = {}

    def drain() -> None:
        while True:
            try:
                report = reports.get_nowait()
            except queue_module.Empty:
                return
            received[report[0]] = report

    while True:
        drain()
        alive = [c for c in children if c.exitcode is None]
        if not alive:
            break
        multiprocessing.connection.wait([c.sentinel for c in alive], timeout=0.2)
    drain()  # an exited child's report is in the pipe: its queue's feeder thread ended first
    return received


def run_parallel(runs: list[PlannedRun], out_root: Path, jobs: int = 1, devices: list[str] | None = None,
                 threads: int | None = None) -> list[tuple[PlannedRun, str]]:
    """Run the plan in ``len(devices)`` child processes, one per device, or in ``jobs`` on the
    runs' own device (never more than there are runs). Each child (spawned: no CUDA state is
    forked) runs ``run_local`` over the whole plan, taking the runs no other process holds, with
    ``threads`` CPU threads (default: the cores divided among the children), its lines prefixed
    with ``[wN]``; a run one child took (trained, or failed) no other takes. Their stop is
    shared: a signal that reaches the sweep or any child stops every child at its next safe
    point (a second one at once), and a user error in one lets no child start a further run.
    Once all have exited: raises the user error, or ``Interrupted`` if a signal stopped the
    sweep before every run finished; returns the failures."""
    workers = max(1, min(len(devices) if devices else jobs, len(runs)))
    threads = threads or max(1, (os.cpu_count() or 1) // workers)
    print(f"{len(runs)} run(s) on {workers} worker(s)"
          + (f" ({', '.join(devices[:workers])})" if devices else "") + f", {threads} thread(s) each", flush=True)
    if not runs:
        return []
    context = multiprocessing.get_context("spawn")
    shared = stopping.SharedStop(context)
    taken = context.RawArray("b", len(runs))  # which runs a child took (run_local)
    reports = context.Queue()
    prefixes = [f"[w{i + 1}{' ' + devices[i] if devices else ''}] " for i in range(workers)]
    children = [context.Process(target=_child, name=f"clbench-w{i + 1}", args=(
        i, runs, Path(out_root), devices[i] if devices else None, threads, shared, taken, os.getpid(), reports,
        prefixes[i]))
        for i in range(workers)]

    def forward(signum: int) -> None:  # the sweep's second signal: each child stops at once
        for child in children:
            if child.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child.pid, signum)

    with stopping.handling(shared=shared, forward=forward):
        with stopping.ignoring():  # a child ignores signals until it handles them (it hears of a stop from us)
            for child in children:
                child.start()
        received = _collect_reports(children, reports)
        signum = stopping.requested()

    failures: list[tuple[PlannedRun, str]] = []
    user_errors: list[str] = []
    crashes: list[str] = []
    by_key = {r.key: r for r in runs}
    for i, child in enumerate(children):
        if i not in received:  # killed (SIGKILL, the OOM killer) before it could say anything
            code = child.exitcode or 0
            why = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"
            lost = [r for r in runs if not finished(r.result_path)
                    and (read_status(out_root, r.key) or {}).get("pid") == child.pid]
            failures += [(r, f"its process ({child.pid}) ended by {why} while training it; rerun to resume it")
                         for r in lost]
            training = f" while training {', '.join(r.key for r in lost)}" if lost else ""
            print(f"{prefixes[i]}ended by {why}{training}", flush=True)
            continue
        _, child_failures, user_error, child_signum, crash = received[i]
        failures += [(by_key[key], text) for key, text in child_failures]
        if user_error:
            user_errors.append(user_error)
        if crash:
            crashes.append(f"worker {i + 1} crashed:\n{crash}")
        signum = signum or child_signum
    if user_errors:
        raise UserError("\n".join(dict.fromkeys(user_errors)))
    if crashes:
        raise RuntimeError("\n".join(crashes))
    if signum and any(not finished(r.result_path) for r in runs):
        raise stopping.Interrupted(signum)
    return failures
