"""Running a plan's runs: the one job entry point (``run_job``), claims, status records, and the
local launchers (one run after the other, or several at once).

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
recorded failed with that message, and a serial sweep goes on with the other runs; a
``UserError`` (bad data, a full disk) is recorded and stops the sweep, its message on one line.
SIGTERM, like Ctrl-C, stops a serial sweep at once (``stop_on_signals``): every file is
complete or absent, the run's last checkpoint holds its finished tasks, and running the same
command again resumes it. ``run_parallel`` runs a plan
in a process pool on this machine, one worker per device (or ``--jobs`` workers).
"""
from __future__ import annotations

import contextlib
import fcntl
import multiprocessing
import os
import queue as queue_module
import signal
import socket
import sys
import threading
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any, Iterator

import torch

from clbench import files, record
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


def run_job(config: dict[str, Any], out_root: str, progress: bool = True) -> dict[str, Any] | None:
    """The job entry point of every launcher: run one configuration and return its metrics.
    A finished run (its result file exists) is not run again. The run is claimed first
    (``claim``): while another live process trains it, this one says so and returns None. While
    it runs, its status record says how far it got; ``attempts`` lists every start
    (``from_task`` > 0: resumed from its checkpoint, e.g. after its holder died)."""
    import_plugins(config.get("plugins") or [])  # a worker registers what the sweep's process did
    cfg = RunConfig.from_dict(config)
    key = cfg.key
    path = record.result_path(Path(out_root), key)
    if finished(path):
        return record.read_result(path).metrics
    with claim(Path(out_root), key) as claimed:
        if not claimed:
            print(f"[{key}] skipped: being trained by {holder(Path(out_root), key)}", flush=True)
            return None
        remove_leftovers(Path(out_root), key)
        if path.exists():  # finished by the process that held the claim before us, or corrupt
            try:
                return record.read_result(path).metrics
            except CorruptFileError as err:
                files.set_aside(path, err.why, "result file", "the run is redone")
        return _run_claimed(cfg, out_root, progress)


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


class Interrupted(KeyboardInterrupt):
    """A signal (SIGTERM) that stops a sweep as Ctrl-C does; ``signum`` says which."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(signal.Signals(signum).name)


def _raise_interrupted(signum: int, frame: Any) -> None:
    raise Interrupted(signum)


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """While the block runs, SIGTERM raises ``Interrupted`` (a ``KeyboardInterrupt``, as Ctrl-C
    does) in the main thread: the run stops at once, its files complete or absent, its claim
    released. Elsewhere than the main thread, nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_interrupted)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def record_interruption(out_root: Path, key: str, num_tasks: int, where: str) -> None:
    """Mark the run interrupted (if this process was training it), and say how far it got and
    how to resume (on stderr)."""
    status = read_status(out_root, key) or {}
    done = status.get("tasks_done", 0)
    if status.get("pid") == os.getpid() and status.get("host") == socket.gethostname():
        with contextlib.suppress(OSError, UserError):
            update_status(out_root, key, state="interrupted", error=None)
    kept = f"its checkpoint holds tasks 1-{done}" if done else "no task had finished"
    sys.stderr.write(f"{where} {key} interrupted during task {done + 1}/{num_tasks}: {kept}; "
                     "run the same command again to resume\n")  # one write: workers' lines do not interleave
    sys.stderr.flush()


def run_local(runs: list[PlannedRun], out_root: Path, progress: bool = True) -> list[tuple[PlannedRun, str]]:
    """Run the plan in this process, one run after the other. Returns the failures
    (run, traceback or message); a failing run does not stop the others, a ``UserError`` (bad
    data, a full disk) is recorded and stops the sweep, and so does SIGTERM or Ctrl-C
    (``stop_on_signals``; the run is recorded interrupted and resumes when run again)."""
    failures = []
    with stop_on_signals():
        for i, r in enumerate(runs):
            where = f"[{i + 1}/{len(runs)}]"
            print(f"{where} {r.key}", flush=True)
            try:
                run_job(r.config.to_dict(), str(out_root), progress)
            except UserError as err:
                record_failure(out_root, r.key, failure_text(err))
                raise  # the user must fix these; every later run would fail the same way
            except KeyboardInterrupt:
                record_interruption(out_root, r.key, r.config.num_tasks, where)
                raise
            except Exception as err:  # keep going: one broken run must not cost the rest of the sweep
                failures.append((r, failure_text(err)))
                record_failure(out_root, r.key, failures[-1][1])
                sep = " " if isinstance(err, RunFailed) else "\n"
                print(f"{where} {r.key} FAILED:{sep}{failures[-1][1]}", flush=True)
    return failures


# ----------------------------------------------------------------------------- parallel


_worker_device: str | None = None  # the device this pool worker runs on (None: the run's own)


def _init_worker(devices: Any, threads: int, pids: Any, stop: Any) -> None:
    """A pool worker's start: take one device from the queue (one worker per device), use
    ``threads`` CPU threads, so that the workers share the cores instead of oversubscribing them,
    and say its pid (so that an interrupted sweep can stop it); SIGTERM stops its run as Ctrl-C."""
    global _worker_device, _worker_stop
    _worker_device = devices.get()
    _worker_stop = stop
    torch.set_num_threads(threads)
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _interrupt_run)
    pids.put(os.getpid())


_worker_in_run = False  # whether this pool worker is inside a run (else it waits for one)
_worker_stop: Any = None  # set when the sweep is interrupted: a run the pool still hands out is not started


def _interrupt_run(signum: int, frame: Any) -> None:
    """A pool worker's SIGINT/SIGTERM: stop the run it trains (recorded interrupted); a worker
    waiting for a run ignores it and exits when the pool, being shut down, tells it to, and so
    does a run already stopping (Ctrl-C reaches the worker, then the sweep's SIGTERM)."""
    global _worker_in_run
    if _worker_in_run:
        _worker_in_run = False
        raise Interrupted(signum)


def _worker_job(config: dict[str, Any], out_root: str) -> tuple[str, str | None]:
    """One run in a pool worker, on the worker's device (an execution setting: the run's identity
    and numbers do not change). Returns ``(outcome, detail)``: done, skipped (claimed elsewhere),
    failed (with its traceback, recorded) or user_error (with its message)."""
    if _worker_device is not None:
        config = {**config, "device": _worker_device}
    global _worker_in_run
    run_config = RunConfig.from_dict(config)
    key = run_config.key
    if _worker_stop is not None and _worker_stop.is_set():
        return "cancelled", None
    try:
        _worker_in_run = True
        metrics = run_job(config, out_root, progress=False)
    except KeyboardInterrupt:  # Ctrl-C reaches the workers too; SIGTERM from the sweep
        record_interruption(Path(out_root), key, run_config.num_tasks, "[worker]")
        return "interrupted", None
    except UserError as err:
        record_failure(Path(out_root), key, str(err))
        return "user_error", str(err)
    except Exception as err:  # recorded like a serial sweep's failure; the other runs go on
        error = failure_text(err)
        record_failure(Path(out_root), key, error)
        return "failed", error
    finally:
        _worker_in_run = False
    return ("skipped", None) if metrics is None else ("done", None)


def run_parallel(runs: list[PlannedRun], out_root: Path, jobs: int = 1, devices: list[str] | None = None,
                 threads: int | None = None) -> list[tuple[PlannedRun, str]]:
    """Run the plan in ``len(devices)`` worker processes, one per device, or in ``jobs`` workers
    on the runs' own device: a ``ProcessPoolExecutor`` (spawn, so no CUDA state is forked) whose
    workers each take one device. Each worker uses ``threads`` CPU threads (default: the cores
    divided among the workers). Runs go through ``run_job`` as in a serial sweep: same claims,
    status records and result files. Returns the failures (run, traceback)."""
    workers = len(devices) if devices else jobs
    threads = threads or max(1, (os.cpu_count() or 1) // workers)
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    for device in devices or [None] * workers:
        queue.put(device)
    failures: list[tuple[PlannedRun, str]] = []
    user_errors: list[str] = []
    print(f"{len(runs)} run(s) on {workers} worker(s)"
          + (f" ({', '.join(devices)})" if devices else "") + f", {threads} thread(s) each", flush=True)
    pids, stop = context.Queue(), context.Event()
    pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker,
                               initargs=(queue, threads, pids, stop))
    try:
        with stop_on_signals():
            futures = {pool.submit(_worker_job, r.config.to_dict(), str(out_root)): r for r in runs}
            for i, future in enumerate(as_completed(futures)):
                r = futures[future]
                outcome, detail = ("cancelled", None) if future.cancelled() else future.result()
                print(f"[{i + 1}/{len(runs)}] {r.key}: {outcome}", flush=True)
                if outcome == "failed":
                    failures.append((r, detail or "failed"))
                    print(detail, flush=True)
                elif outcome == "user_error":
                    user_errors.append(f"{r.key}: {detail}")
                    stop.set()  # every later run would fail the same way: start none
                    pool.shutdown(cancel_futures=True)
    except KeyboardInterrupt:
        # Start no other run (the pool has already handed some to its queue: ``stop`` turns
        # them away), and stop the running ones: a Ctrl-C at the terminal reaches the workers
        # already, a SIGTERM to this process does not. Each records itself interrupted; the
        # sweep's own message comes after theirs, once every worker has exited.
        stop.set()
        while not pids.empty():
            with contextlib.suppress(ProcessLookupError, queue_module.Empty):
                os.kill(pids.get_nowait(), signal.SIGTERM)
        raise
    finally:  # waits for every worker to exit (a run it had started ends first)
        pool.shutdown(wait=True, cancel_futures=True)
    if user_errors:
        raise UserError("\n".join(user_errors))
    return failures
