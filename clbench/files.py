"""Files that are complete or absent: atomic writes, exclusive locks, forgiving reads.

Every file the harness writes goes through ``atomic_replace``: a temporary file in the same
folder, fsync-ed and renamed over the target (then the folder is fsync-ed), so a killed process
never leaves half a file and readers see the old file or the new one. Files are created
readable by the group and others (mode 0644), so a results folder can be shared on a cluster.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator


def atomic_replace(path: Path, write) -> None:
    """Write through ``write(file)`` to a temporary file beside ``path``, fsync, rename: readers
    see no file or the complete one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o644)  # mkstemp's 0600 would hide shared files from others
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)  # make the rename itself durable
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


@contextlib.contextmanager
def file_lock(path: Path, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """An exclusive ``fcntl`` lock on ``path`` (created if needed), released on exit or death;
    ``on_wait()`` is called first when another process holds it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                on_wait()
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def build_once(path: Path, build: Callable[[Path], None], on_wait: Callable[[], None] | None = None) -> Path:
    """``path``, built by ``build(path)`` unless it exists; ``build`` must create it atomically.
    Concurrent callers (a SLURM array): one builds, the rest block on the lock, then find it."""
    path = Path(path)
    if path.exists():
        return path
    with file_lock(path.with_name(f".{path.name}.lock"), on_wait):
        if not path.exists():  # somebody else may have built it while we waited
            build(path)
    return path


def atomic_write_json(path: Path, obj: Any) -> None:
    data = json.dumps(obj, indent=1, sort_keys=False).encode()
    atomic_replace(path, lambda f: f.write(data))


def atomic_write_text(path: Path, text: str) -> None:
    atomic_replace(path, lambda f: f.write(text.encode()))


def atomic_torch_save(path: Path, obj: Any) -> None:
    import torch

    atomic_replace(path, lambda f: torch.save(obj, f))


def read_json(path: Path) -> Any:
    """The file's JSON, or None when it is missing or unreadable (a record, not a result)."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None
