"""Files that are complete or absent: atomic writes, exclusive locks, forgiving reads.

Every file the harness writes goes through ``atomic_replace``: a temporary file in the same
folder, fsync-ed and renamed over the target (then the folder is fsync-ed), so a killed process
never leaves half a file and readers see the old file or the new one. Files get the mode
``open()`` would give them (readable by the group and others under the usual umask), so a results
folder can be shared on a cluster. JSON is strict: no NaN or infinity tokens.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator


def file_mode() -> int:
    """The mode a new file gets from ``open()`` under the current umask (0644 under the usual
    022, 0664 under a group's 002): what every file the harness writes gets too."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path`` for the block to write (a memmap, a library that wants
    a file name); on success it is fsync-ed, given ``file_mode()`` and renamed over ``path``,
    and the folder is fsync-ed; on failure it is removed. Readers see the old file or the new
    one, never a part. Every file the harness writes goes through here."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fchmod(f.fileno(), file_mode())  # mkstemp's 0600 would hide shared files from the group
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)  # make the rename itself durable
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_replace(path: Path, write: Callable[[BinaryIO], Any]) -> None:
    """Write ``path`` through ``write(file)`` atomically (``atomic_path``)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        write(f)


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


def finite_json(obj: Any, where: str = "") -> tuple[Any, list[str]]:
    """``obj`` with every non-finite float (NaN, infinities) replaced by None, and where each
    was with its value (``tasks[3].method_log.magnitudes[0]: nan``): strict JSON has no NaN."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None, [f"{where or '.'}: {obj}"]
    if isinstance(obj, dict):
        out, notes = {}, []
        for k, v in obj.items():
            out[k], found = finite_json(v, f"{where}.{k}" if where else str(k))
            notes += found
        return out, notes
    if isinstance(obj, (list, tuple)):
        out, notes = [], []
        for i, v in enumerate(obj):
            clean, found = finite_json(v, f"{where}[{i}]")
            out.append(clean)
            notes += found
        return out, notes
    return obj, []


def atomic_write_json(path: Path, obj: Any) -> None:
    """Strict JSON (every parser reads it): a non-finite number is written as null, and a
    mapping gets a ``non_finite`` list saying which values were and what they were."""
    clean, notes = finite_json(obj)
    if notes and isinstance(clean, dict):
        clean["non_finite"] = (clean.get("non_finite") or []) + notes
    data = json.dumps(clean, indent=1, sort_keys=False, allow_nan=False).encode()
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
