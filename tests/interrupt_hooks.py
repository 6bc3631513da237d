"""Deliver a signal (or a full disk) at one chosen instant of a run, for the tests of signals.

The instants (``at``):

* ``checkpoint``: inside torch's zip writer, writing the ``nth`` checkpoint of the process (its
  second write call);
* ``result``: halfway through writing the result file;
* ``status``: halfway through the status write that follows task 1's checkpoint;
* ``done``: halfway through the final status write (``state: done``);
* ``loader``: inside a DataLoader worker handing over a training batch of task 2 (``train.num_workers``
  must be above 0);
* ``evaluate``: inside the method's ``predict`` while evaluating after task 2.

What happens there (``signal``): a signal's name (sent to ``target``, a process id), or ``ENOSPC``
(the write fails as on a full disk). It happens once across every process that shares the
``latch`` file, which it creates first; with ``target`` = ``wait`` no signal is sent: whoever
waits for the latch file sends one (a SLURM test, through ``scancel``). Then the writer (or
``predict``) holds on until this process knows of the stop (``clbench.stopping.requested``), so
the stop always arrives while the write is still in flight; a DataLoader worker, which cannot
see its main process's state, holds on for a second.

Two ways in: ``arm(monkeypatch.setattr, ...)`` in a test's own process, or as a ``--plugins``
file with ``CLBENCH_TEST_INTERRUPT`` set to ``spec(...)``, when it arms itself in every process of
the sweep but the sweep's own (``--jobs`` children, SLURM jobs). It registers the ``toy``
benchmark (``helpers.py``) there too.
"""
from __future__ import annotations

import errno
import json
import os
import re
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

ENV = "CLBENCH_TEST_INTERRUPT"
HOOKS_FILE = str(Path(__file__).resolve())


def spec(at: str, sig: str, target: int | str, latch: Path, out: Path, nth: int = 1,
         sweep_pid: int | None = None) -> str:
    """``CLBENCH_TEST_INTERRUPT``'s value."""
    return json.dumps({"at": at, "signal": sig, "target": target, "latch": str(latch), "out": str(out), "nth": nth,
                       "sweep_pid": sweep_pid if sweep_pid is not None else os.getpid()})


def _take_latch(latch: Path) -> bool:
    try:
        os.close(os.open(latch, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        return False


def arm(setattr_: Callable[[Any, str, Any], None], at: str, sig: str, target: int | str, latch: Path, out: Path,
        nth: int = 1, times: int = 1) -> None:
    """Patch what instant ``at`` goes through (see the module's docstring); the signal is sent
    ``times`` times in a row."""
    from clbench import files, stopping

    latch, out = Path(latch), Path(out)

    def held_until_stopped(in_worker: bool = False) -> None:
        deadline = time.time() + (1 if in_worker else 60)
        while time.time() < deadline and (in_worker or stopping.requested() is None):
            time.sleep(0.01)

    def fire(in_worker: bool = False) -> bool:
        """Send the signal (once across processes); False when it was sent before."""
        if not _take_latch(latch):
            return False
        for _ in range(times if target != "wait" else 0):
            os.kill(int(target), getattr(signal, sig))
        held_until_stopped(in_worker)
        return True

    def checkpoint_exists() -> bool:
        return any((out / "checkpoints").rglob("*.pt"))

    if at in ("checkpoint", "result", "status", "done"):
        real_replace = files.atomic_replace
        checkpoints = [0]

        def is_the_instant(path: Path, data: bytes) -> bool:
            kind = path.relative_to(out).parts[0] if path.is_relative_to(out) else ""
            if at == "result":
                return kind == "runs"
            if at == "status":
                return kind == "status" and b'"state": "running"' in data and \
                    re.search(rb'"tasks_done": 1[,\n}]', data) is not None
            if at == "done":
                return kind == "status" and b'"state": "done"' in data
            return False

        class Hooked:
            """The file a write goes to, with the instant inside one of its writes."""

            def __init__(self, file: Any, path: Path, is_checkpoint: bool):
                self.file, self.path, self.is_checkpoint, self.calls = file, path, is_checkpoint, 0

            def write(self, data: Any) -> int:
                self.calls += 1
                raw = bytes(data)
                hit = self.calls == 2 if self.is_checkpoint else is_the_instant(self.path, raw)
                if hit:
                    half = len(raw) // 2
                    if sig == "ENOSPC":
                        if _take_latch(latch):
                            self.file.write(raw[:half])
                            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                    else:
                        written = self.file.write(raw[:half])
                        fire()
                        return written + self.file.write(raw[half:])
                return self.file.write(data)

            def __getattr__(self, name: str) -> Any:
                return getattr(self.file, name)

        def hooked_replace(path: Path, write: Callable) -> None:
            is_checkpoint = False
            if at == "checkpoint" and Path(path).suffix == ".pt" and "checkpoints" in Path(path).parts:
                checkpoints[0] += 1
                is_checkpoint = checkpoints[0] == nth
            if at == "checkpoint" and not is_checkpoint:
                return real_replace(path, write)
            return real_replace(path, lambda f: write(Hooked(f, Path(path), is_checkpoint)))

        setattr_(files, "atomic_replace", hooked_replace)
    elif at == "loader":
        import helpers

        real_item = helpers.ToyImages.__getitem__

        def item(self, i):
            in_worker = torch.utils.data.get_worker_info() is not None
            if in_worker and len(self) == 8 * helpers.TOY_CLASSES and checkpoint_exists():  # the training set
                fire(in_worker=True)
            return real_item(self, i)

        setattr_(helpers.ToyImages, "__getitem__", item)
    elif at == "evaluate":
        from clbench.methods import get_method

        cls = get_method("full_ft")
        real_predict = cls.predict

        def predict(self, x):
            if not self.training and checkpoint_exists():
                fire()
            return real_predict(self, x)

        setattr_(cls, "predict", predict)
    else:
        raise ValueError(f"unknown instant {at}")


def _as_plugin() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import helpers  # noqa: F401  (the toy benchmark)

    raw = os.environ.get(ENV)
    if not raw:
        return
    s = json.loads(raw)
    if s["sweep_pid"] == os.getpid():  # the sweep's own process: its children are armed
        return
    arm(setattr, s["at"], s["signal"], s["target"], Path(s["latch"]), Path(s["out"]), s["nth"])


if __name__.startswith("clbench_plugin_"):
    _as_plugin()
