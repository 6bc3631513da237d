"""Interruption as a state, not an exception thrown into arbitrary code.

While a sweep or a SLURM job runs (``handling``), SIGTERM and SIGINT (and in a SLURM job the
signal that announces the time limit or a preemption) only record that a stop was asked for.
The run stops at its next safe point, where ``check()`` raises ``Interrupted``: before each
training step (the batch just handed over by the DataLoader is dropped), before each evaluation
batch, before each task (after the previous task's checkpoint and status writes), before each
run of a sweep. A write in flight therefore completes: nothing is raised inside torch's zip
writer, whose own clean-up used to replace the interruption with a ``RuntimeError`` (a run
recorded failed instead of interrupted). A run that finished before it reached a safe point is
done.

A second signal stops at once: ``Interrupted`` is raised wherever it lands. Atomic writes
(``clbench.files``) then leave the previous file in place, and whatever error the raise turns
into in a library still counts as the interruption (``interrupted_by``).

The processes of one ``--jobs`` sweep share a ``SharedStop``: a signal that reaches any of them
stops them all at their next safe point, the sweep's second signal stops the children at once,
and a user error in one child lets no child start a further run (``no_more_runs``).
"""
from __future__ import annotations

import contextlib
import os
import signal
import threading
from typing import Any, Callable, Iterator

from clbench.errors import UserError


class Interrupted(KeyboardInterrupt):
    """A run or sweep stopped by a signal (``signum``), as Ctrl-C stops it: the command line exits
    with 128 + ``signum``."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(signal.Signals(signum).name)

    def __reduce__(self) -> tuple:  # pickled (a job's error, a process's report) as its signal
        return type(self), (self.signum,)


class SharedStop:
    """The stop state of the processes of one sweep, in shared memory (pass it to a child
    process when it is created): the signal that asked the sweep to stop, whether its children
    are to stop at once, and whether a user error asked that no further run start."""

    def __init__(self, context: Any):
        self._cells = context.RawArray("i", 3)  # signum, at once, no further run

    @property
    def signum(self) -> int:
        return self._cells[0]

    def ask(self, signum: int) -> None:
        if not self._cells[0]:  # the first signal names the stop
            self._cells[0] = signum

    @property
    def at_once(self) -> bool:
        return bool(self._cells[1])

    def stop_at_once(self) -> None:
        self._cells[1] = 1

    @property
    def no_more_runs(self) -> bool:
        return bool(self._cells[2])

    def start_no_more_runs(self) -> None:
        self._cells[2] = 1


_requested: int | None = None  # the signal that asked this process to stop
_received = 0  # signals delivered to this process while ``handling``
_raised = False  # an Interrupted was raised: the process is stopping, further signals only count
_depth = 0  # nested ``handling`` blocks
_shared: SharedStop | None = None  # the sweep's stop state, in a --jobs sweep's processes
_parent: int | None = None  # a --jobs child's parent: when it dies, the child stops
_forward: Callable[[int], None] | None = None  # a --jobs sweep's parent: passes a repeated signal on


def requested() -> int | None:
    """The signal that asked this process (or its sweep) to stop, or None."""
    global _requested
    if _requested is None and _parent is not None and os.getppid() != _parent:
        _requested = signal.SIGTERM  # the sweep's process died (SIGKILL): stop as it would have asked
    if _requested is not None:
        return _requested
    if _shared is not None and _shared.signum:
        return _shared.signum
    return None


def check() -> None:
    """A safe point: raise ``Interrupted`` if a stop was asked for."""
    signum = requested()
    if signum:
        _raise(signum)


def _raise(signum: int) -> None:
    global _raised
    _raised = True
    raise Interrupted(signum)


def interrupted_by(err: BaseException) -> int | None:
    """The signal that stopped the code that raised ``err``: an ``Interrupted``'s, SIGINT for a
    plain ``KeyboardInterrupt``, and for any other error raised while a stop was asked for (a
    DataLoader whose workers the signal ended, a library that wrapped a second signal's
    ``Interrupted`` in an error of its own) the signal that asked. None: an error of its own,
    and a ``UserError`` (a full disk, bad data: the user has to fix it, stop or not)."""
    if isinstance(err, Interrupted):
        return err.signum
    if isinstance(err, KeyboardInterrupt):
        return signal.SIGINT
    if isinstance(err, Exception) and not isinstance(err, UserError):
        return requested()
    return None


def no_more_runs() -> bool:
    """Whether another process of this sweep asked that no further run start (a user error)."""
    return _shared is not None and _shared.no_more_runs


def start_no_more_runs() -> None:
    """Ask the other processes of this sweep (if any) to start no further run."""
    if _shared is not None:
        _shared.start_no_more_runs()


def join(shared: SharedStop, parent: int) -> None:
    """Make this process (a ``--jobs`` child) part of the sweep whose stop state is ``shared``
    and whose process is ``parent``."""
    global _shared, _parent
    _shared, _parent = shared, parent


def _on_signal(signum: int, frame: Any) -> None:
    global _requested, _received
    _received += 1
    if _requested is None:
        _requested = signum
    if _shared is not None:
        _shared.ask(signum)  # the whole sweep stops
    if _forward is not None:  # a --jobs sweep's parent only waits: a repeated signal stops its children at once
        if _received > 1:
            if _shared is not None:
                _shared.stop_at_once()
            _forward(signum)
        return
    at_once = _received > 1 or (_shared is not None and _shared.at_once)
    if at_once and not _raised:  # a second signal (or the sweep's): stop at once, wherever it lands
        _raise(signum)


@contextlib.contextmanager
def handling(signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT), shared: SharedStop | None = None,
             forward: Callable[[int], None] | None = None) -> Iterator[None]:
    """While the block runs, ``signals`` ask for a stop (``requested``, ``check``) instead of
    raising where they land; a second signal raises ``Interrupted`` at once. ``shared`` and
    ``forward``: this process is the parent of a ``--jobs`` sweep whose stop state is ``shared``;
    it never raises: a signal is the sweep's stop, and a repeated one is passed on
    (``forward(signum)``) to the children, which stop at once. Outside the main thread (where
    Python runs signal handlers) nothing changes. When the outermost block ends, the handlers
    before it are back and the state is cleared."""
    global _depth, _forward, _shared, _requested, _received, _raised
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.signal(signum, _on_signal) for signum in signals}
    saved = _forward, _shared
    if forward is not None:
        _forward, _shared = forward, shared
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        _forward, _shared = saved
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if _depth == 0:
            _requested, _received, _raised = None, 0, False


@contextlib.contextmanager
def ignoring(signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)) -> Iterator[None]:
    """While the block runs, ``signals`` are ignored, and so they are in a process started in it
    until that process handles them (an ignored signal stays ignored across ``exec``): a
    ``--jobs`` child importing torch is not killed half-started; the sweep's parent passes the
    stop on (``SharedStop``). A signal sent meanwhile to this process stays pending and is
    handled when the block ends."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, signals)  # Linux keeps a blocked, ignored signal pending
    previous = {signum: signal.signal(signum, signal.SIG_IGN) for signum in signals}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


def leave_to_the_main_process(worker_id: int) -> None:
    """A DataLoader worker's start (``worker_init_fn``): Ctrl-C reaches the whole process group,
    and a worker it ended would turn the main process's safe stop into a ``RuntimeError``;
    the main process stops its workers when it stops."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
