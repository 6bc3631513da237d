"""Files that are complete or absent: atomic writes, exclusive locks, forgiving reads.

Every file the harness writes goes through ``atomic_replace``: a temporary file in the same
folder, fsync-ed and renamed over the target (then the folder is fsync-ed), so a killed process
never leaves half a file and readers see the old file or the new one. A write that fails removes
its temporary file (a full disk raises ``DiskFullError``); one that was killed leaves it, and
the next writer of that file removes it (``remove_temporaries``). A file that does not read back
is moved aside, never deleted (``set_aside``). Files get the mode
``open()`` would give them (readable by the group and others under the usual umask), so a results
folder can be shared on a cluster. JSON is strict: no NaN or infinity tokens.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator

from clbench.errors import CorruptFileError, DiskFullError


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
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFullError(f"no space left on the device of {path.parent} while writing {path.name} "
                                f"({format_size(free_bytes(path.parent))} free; nothing was left half-written): "
                                f"free some space (or use another --out) and rerun the same command; "
                                f"a run resumes from its last checkpoint") from err
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)  # make the rename itself durable
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def free_bytes(folder: Path) -> float:
    """Free space on ``folder``'s file system, in bytes (NaN when it cannot be told)."""
    try:
        return float(shutil.disk_usage(folder).free)
    except OSError:
        return float("nan")


def format_size(size: float) -> str:
    """A number of bytes for a reader, in the largest unit that keeps it at 1 or more, to three
    significant figures: ``1000 bytes``, ``12.5 KiB``, ``655 MiB``, ``1.20 GiB``."""
    if math.isnan(size):
        return "an unknown amount"
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if size >= scale:
            value = size / scale
            return f"{value:.{2 if value < 10 else 1 if value < 100 else 0}f} {unit}"
    return f"{size:.0f} bytes"


def remove_temporaries(path: Path) -> list[Path]:
    """Remove the temporary files that killed writers of ``path`` left beside it (``atomic_path``
    names them ``.<name>.<random>.tmp``) and return them. Only for a caller that alone writes
    ``path`` (it holds the run's claim, or the file's lock)."""
    path = Path(path)
    stale = sorted(path.parent.glob(f".{glob_escape(path.name)}.*.tmp")) if path.parent.is_dir() else []
    for tmp in stale:
        tmp.unlink(missing_ok=True)
    return stale


def glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def set_aside(path: Path, why: str, what: str = "file", then: str = "") -> Path:
    """Move a file that does not read back to ``<path>.corrupt`` (``.corrupt.1``, ... when taken),
    never deleting anything, and say so (and ``then``, what happens next) in one line on stderr;
    returns where it went."""
    path = Path(path)
    target = path.with_name(path.name + ".corrupt")
    n = 0
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.corrupt.{n}")
    os.replace(path, target)
    print(f"warning: {what} {path} is corrupt ({why}); moved to {target.name}" + (f"; {then}" if then else ""),
          file=sys.stderr, flush=True)
    return target


def json_checksum(obj: Any) -> str:
    """``sha256:<hex>`` of ``obj``'s canonical JSON (sorted keys, no spaces): what a file that
    carries a ``checksum`` was written with, less that key."""
    canonical = json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()


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
            remove_temporaries(path)  # of a builder that was killed
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


def atomic_write_json(path: Path, obj: Any, checksum: bool = False) -> None:
    """Strict JSON (every parser reads it): a non-finite number is written as null, and a
    mapping gets a ``non_finite`` list saying which values were and what they were. With
    ``checksum``, a mapping also gets a ``checksum`` (``json_checksum`` of the rest) that
    ``read_checked_json`` verifies."""
    clean, notes = finite_json(obj)
    if notes and isinstance(clean, dict):
        clean["non_finite"] = (clean.get("non_finite") or []) + notes
    if checksum and isinstance(clean, dict):
        clean.pop("checksum", None)
        clean["checksum"] = json_checksum(json.loads(json.dumps(clean, allow_nan=False)))  # as it reads back
    data = json.dumps(clean, indent=1, sort_keys=False, allow_nan=False).encode()
    atomic_replace(path, lambda f: f.write(data))


def atomic_write_text(path: Path, text: str) -> None:
    atomic_replace(path, lambda f: f.write(text.encode()))


class _WriteErrors:
    """A file whose writes remember the first ``OSError``: torch's zip writer turns a failed
    write (a full disk) into its own ``RuntimeError`` ("unexpected pos ..."), which says nothing
    of the cause."""

    def __init__(self, file: BinaryIO):
        self.file, self.error = file, None

    def write(self, data: Any) -> int:
        try:
            return self.file.write(data)
        except OSError as err:
            self.error = self.error or err
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self.file, name)


def atomic_torch_save(path: Path, obj: Any) -> None:
    """``torch.save`` atomically; a write that the OS refused raises the OS's error (a full disk:
    ``DiskFullError``), not the zip writer's."""
    import torch

    def save(f: BinaryIO) -> None:
        tracked = _WriteErrors(f)
        try:
            torch.save(obj, tracked)
        except Exception as err:
            if tracked.error is not None and tracked.error is not err:
                raise tracked.error from err
            raise

    atomic_replace(path, save)


def read_checked_json(path: Path) -> dict[str, Any]:
    """A JSON mapping that reads back whole: ``CorruptFileError`` (naming the cause) for a file
    that does not parse, is not a mapping, or whose ``checksum`` does not match; a file without
    a checksum (written before there was one) is taken as it parses. ``FileNotFoundError`` for
    a missing file."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        doc = json.loads(raw)
    except ValueError as err:
        raise CorruptFileError(path, f"not valid JSON: {err}") from err
    if not isinstance(doc, dict):
        raise CorruptFileError(path, f"a JSON {type(doc).__name__}, not a mapping")
    stored = doc.pop("checksum", None)
    if stored is not None and stored != json_checksum(doc):
        raise CorruptFileError(path, "its checksum does not match its content")
    return doc


def read_json(path: Path) -> Any:
    """The file's JSON, or None when it is missing or unreadable (a record, not a result)."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None
