"""The paper's real benchmarks: ImageNet-R, ImageNet-A, DomainNet, CIFAR-100 and CUB-200.

Every loader has the ``benchmarks.base.Loader`` signature plus a keyword ``num_classes`` (the
registered benchmark's count by default; tests pass a small one)::

    load(data_dir, train_transform, test_transform, splits_dir, *, num_classes=C) -> (train, test)

Contract of the two returned datasets:

- images are decoded lazily, one per ``__getitem__``, which yields
  ``(transform(RGB image), original label)``;
- ``.targets`` holds the original label of every sample: 0..C-1 in sorted class-folder order for
  folder layouts, the list's own integers for split-list layouts (CODA-Prompt's ImageNet-R
  targets are *not* in sorted-wnid order, and are kept as they are);
- ``.provenance`` is one line saying which layout and which split files were read, for the
  result file.

Layouts, tried in this order (``data_dir`` is ``Benchmark.data_dir(root)``):

- ``imr``: (1) ``train/<wnid>/*`` + ``test/<wnid>/*`` (the PILOT/APER archive SD-LoRA reads);
  (2) split-list files next to the images (see ``find_split_lists``); (3) the raw release
  ``<wnid>/*``, split 80/20 once (``split_raw_folder``) into ``splits_dir/imr_split_<hash>.json``.
- ``ima``: ``train/<wnid>/*`` + ``test/<wnid>/*`` only (the raw release is refused: no split
  of ours would match the published numbers).
- ``dn``: split-list files only (DomainNet's ``<domain>_{train,test}.txt`` or CODA-Prompt's /
  InfLoRA's ``domainnet_{train,test}.yaml``).
- ``c100``: torchvision's ``cifar-100-python/`` (md5-checked by torchvision).
- ``cub``: ``train/<class>/*`` + ``test/<class>/*`` (APER/PILOT), or the original
  ``CUB_200_2011/`` with images.txt, image_class_labels.txt, train_test_split.txt, images/.

Whatever is wrong with the data raises ``DataError`` with one message naming what was looked at
and what is accepted. An image that cannot be decoded raises ``DataError`` naming the file, when
that sample is loaded.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import yaml
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms as T
from torchvision.datasets import CIFAR100, ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension, make_dataset
from torchvision.datasets.utils import check_integrity

from clbench.benchmarks.base import BENCHMARKS, Benchmark
from clbench.catalog import missing_data_message
from clbench.errors import CorruptFileError, DataError
from clbench.files import atomic_write_json, read_checked_json, set_aside

# The raw ImageNet-R split. Both are recorded in every split file; changing them only affects
# file lists that have no split file yet, since existing ones are reused as written.
SPLIT_SEED = 0
TEST_FRACTION = 0.2
_SPLIT_FORMAT = 1

_FEW = 5  # how many names / lines an error message lists before "…"

# ----------------------------------------------------------------------------- decoding images


def load_rgb(path: str) -> Image.Image:
    """Decode one image file to RGB; any failure becomes a ``DataError`` naming the file."""
    try:
        with open(path, "rb") as f:
            image = Image.open(f)
            return image.convert("RGB")  # forces the decode while the file is open
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, … on bad files
        raise DataError(f"cannot read image {path}: {type(err).__name__}: {err}") from err


def _is_image_file(path: str) -> bool:
    # Skips hidden files too: macOS archives carry "._name.jpg" resource forks that are not images.
    return has_file_allowed_extension(path, IMG_EXTENSIONS) and not os.path.basename(path).startswith(".")


def class_folders(directory: Path) -> list[str]:
    """Sorted names of the non-hidden sub-folders of ``directory`` (one per class)."""
    try:
        return sorted(e.name for e in os.scandir(directory) if e.is_dir() and not e.name.startswith("."))
    except OSError:
        return []


class _ImageFolder(ImageFolder):
    """torchvision's ImageFolder, ignoring hidden folders (``.ipynb_checkpoints`` is not a class)."""

    def find_classes(self, directory: str | os.PathLike) -> tuple[list[str], dict[str, int]]:
        classes = class_folders(Path(directory))
        return classes, {name: i for i, name in enumerate(classes)}


class ImageList(Dataset):
    """Image files with integer labels, decoded lazily.

    Paths are kept in one numpy bytes array rather than a list of Python strings: DataLoader
    workers then share it without copy-on-access (DomainNet's ~600k paths would otherwise be
    duplicated into every worker as their reference counts are touched).
    """

    def __init__(self, paths: Sequence[str], targets: Sequence[int], transform: Callable | None = None,
                 classes: list[str] | None = None, provenance: str = ""):
        if len(paths) != len(targets):
            raise ValueError(f"{len(paths)} paths but {len(targets)} targets")
        self._paths = np.array([os.fsencode(p) for p in paths], dtype=np.bytes_)
        self.targets = np.asarray(targets, dtype=np.int64)
        self.transform = transform
        self.classes = classes
        self.provenance = provenance

    def __len__(self) -> int:
        return len(self.targets)

    def path(self, i: int) -> str:
        return os.fsdecode(self._paths[i])

    def __getitem__(self, i: int) -> tuple[Any, int]:
        image = load_rgb(self.path(i))
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.targets[i])

    def __repr__(self) -> str:
        return f"ImageList({len(self)} images; {self.provenance})"


# ----------------------------------------------------------------------------- error messages


@dataclass(frozen=True)
class _Info:
    """What a benchmark's error messages say about it."""

    name: str
    title: str
    folder: str
    layouts: str  # tree diagram of the accepted layouts
    source: str  # where the data is published


def _missing(info: _Info | Benchmark, data_dir: Path, why: str) -> DataError:
    """The one message for 'no usable data here' (``clbench.catalog.missing_data_message``)."""
    return DataError(missing_data_message(info, data_dir, why))


def _few(names: Sequence[Any]) -> str:
    shown = ", ".join(str(n) for n in list(names)[:_FEW])
    return shown + (", …" if len(names) > _FEW else "")


def _check_class_count(info: _Info, classes: Sequence[str], where: Path, num_classes: int) -> None:
    if len(classes) == num_classes:
        return
    msg = (f"{info.title} ({info.name}): found {len(classes)} class folders in {where}, "
           f"expected {num_classes}")
    msg += f" (e.g. {_few(classes)})." if classes else "."
    if len(classes) == 1:
        msg += f"\nThe data may be one level deeper: {where / classes[0]}."
    if where.name not in (info.folder, "train", "test") and not (where / info.folder).exists():
        msg += (f"\nNote: {where} has no {info.folder}/ folder, so it was read as the {info.title} "
                f"folder itself; --data-root / $CLBENCH_DATA name the folder that holds {info.folder}/.")
    raise DataError(msg)


def _check_same_classes(info: _Info, train: Iterable[Any], test: Iterable[Any], train_where: str,
                        test_where: str, what: str = "class folders") -> None:
    train, test = set(train), set(test)
    if train == test:
        return
    parts = []
    if train - test:
        parts.append(f"{len(train - test)} only in {train_where} ({_few(sorted(train - test))})")
    if test - train:
        parts.append(f"{len(test - train)} only in {test_where} ({_few(sorted(test - train))})")
    raise DataError(f"{info.title} ({info.name}): the {what} of train and test differ: "
                    + "; ".join(parts) + ".")


# ----------------------------------------------------------------------------- folder layouts


def _image_folder(info: _Info, directory: Path, transform: Callable, provenance: str) -> _ImageFolder:
    try:
        ds = _ImageFolder(str(directory), transform=transform, loader=load_rgb, is_valid_file=_is_image_file)
    except FileNotFoundError as err:  # a class folder without a single image
        raise DataError(f"{info.title} ({info.name}): class folders without images in {directory}: {err}") from err
    ds.provenance = provenance
    return ds


def _has_split_folders(info: _Info, data_dir: Path) -> bool:
    train, test = (data_dir / "train").is_dir(), (data_dir / "test").is_dir()
    if train != test:
        have, lack = ("train", "test") if train else ("test", "train")
        raise DataError(f"{info.title} ({info.name}): {data_dir} has a {have}/ folder but no {lack}/ "
                        f"folder; the pre-split layout needs both.\nAccepted layouts:\n{info.layouts}")
    return train


def _open_pre_split(info: _Info, data_dir: Path, train_transform: Callable, test_transform: Callable,
                    num_classes: int) -> tuple[Dataset, Dataset] | None:
    """Check that ``data_dir`` exists; the datasets of its pre-split ``train/`` and ``test/``
    folders when it has them, else None (the caller tries its benchmark's other layouts)."""
    if not data_dir.is_dir():
        raise _missing(info, data_dir, "the folder does not exist")
    if _has_split_folders(info, data_dir):
        return load_split_folders(info, data_dir, train_transform, test_transform, num_classes)
    return None


def load_split_folders(info: _Info, data_dir: Path, train_transform: Callable, test_transform: Callable,
                       num_classes: int) -> tuple[Dataset, Dataset]:
    """``data_dir/train/<class>/*`` and ``data_dir/test/<class>/*`` with the same class folders."""
    train_dir, test_dir = data_dir / "train", data_dir / "test"
    train_classes, test_classes = class_folders(train_dir), class_folders(test_dir)
    _check_class_count(info, train_classes, train_dir, num_classes)
    _check_same_classes(info, train_classes, test_classes, str(train_dir), str(test_dir))
    provenance = f"pre-split folders {train_dir} and {test_dir}"
    return (_image_folder(info, train_dir, train_transform, provenance),
            _image_folder(info, test_dir, test_transform, provenance))


# ----------------------------------------------------------------------------- split lists

_LIST_SUFFIXES = (".yaml", ".yml", ".txt")
_LIST_STEM = re.compile(r"(?:^|[_.-])(train|test)$", re.IGNORECASE)
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the C loader: DomainNet's lists are large


def find_split_lists(data_dir: Path) -> tuple[list[Path], list[Path]] | None:
    """The split-list files in ``data_dir`` or ``data_dir/splits``, as (train files, test files).

    A list file's name ends in ``train`` or ``test`` before its suffix: ``clipart_train.txt``,
    ``domainnet_test.yaml``, ``imagenet-r_train.yaml``, ``train.txt``. When YAML lists are present
    the ``.txt`` ones are ignored (they would describe the same images twice). Several lists of
    one side are concatenated in sorted name order. ``None`` when there are none.
    """
    found: dict[str, list[Path]] = {"train": [], "test": []}
    for folder in (data_dir, data_dir / "splits"):
        if not folder.is_dir():
            continue
        for path in sorted(folder.iterdir()):
            match = _LIST_STEM.search(path.stem)
            if path.is_file() and path.suffix.lower() in _LIST_SUFFIXES and match and not path.name.startswith("."):
                found[match.group(1).lower()].append(path)
    if not found["train"] and not found["test"]:
        return None
    if any(p.suffix.lower() != ".txt" for p in found["train"] + found["test"]):
        found = {side: [p for p in paths if p.suffix.lower() != ".txt"] for side, paths in found.items()}
    for side, other in (("train", "test"), ("test", "train")):
        if not found[side]:
            raise DataError(f"{data_dir}: found {other} split lists ({_few([p.name for p in found[other]])}) "
                            f"but no {side} list (a file named like <name>_{side}.txt or .yaml).")
    return found["train"], found["test"]


def _parse_list(list_file: Path) -> list[tuple[str, str, int]]:
    """(where, path as written, label) for every entry of a txt or YAML split list."""
    if list_file.suffix.lower() == ".txt":
        entries = []
        try:
            lines = list_file.read_text(encoding="utf-8-sig").splitlines()
        except (OSError, UnicodeDecodeError) as err:
            raise DataError(f"cannot read split list {list_file}: {err}") from err
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            fields = line.strip().rsplit(maxsplit=1)  # the label is the last field; a path may hold spaces
            if len(fields) != 2 or not _is_uint(fields[1]):
                raise DataError(f"{list_file}, line {number}: cannot parse {line.strip()!r}; "
                                f"expected '<relative/path.jpg> <integer label>'")
            entries.append((f"line {number}", fields[0], int(fields[1])))
        return entries
    try:
        with open(list_file, "rb") as f:
            doc = yaml.load(f, Loader=_YAML_LOADER)
    except (OSError, yaml.YAMLError) as err:
        raise DataError(f"cannot read split list {list_file}: {err}") from err
    if not isinstance(doc, dict) or not isinstance(doc.get("data"), list) or not isinstance(doc.get("targets"), list):
        raise DataError(f"{list_file}: expected a YAML mapping with a 'data:' list of image paths and a "
                        f"'targets:' list of integer labels (CODA-Prompt's split format)")
    data, targets = doc["data"], doc["targets"]
    if len(data) != len(targets):
        raise DataError(f"{list_file}: 'data' has {len(data)} entries but 'targets' has {len(targets)}")
    entries = []
    for i, (path, label) in enumerate(zip(data, targets)):
        if not isinstance(path, str) or not path or not isinstance(label, int) or isinstance(label, bool) or label < 0:
            raise DataError(f"{list_file}, entry {i} of data/targets: expected a path and a non-negative "
                            f"integer label, got {path!r} and {label!r}")
        entries.append((f"entry {i}", path, label))
    return entries


class _FileIndex:
    """Answers "does this file exist" with one directory listing per folder.

    DomainNet's lists name ~600k files in ~2k folders: listing the folders is seconds where a
    stat per file can be minutes on a network file system.
    """

    def __init__(self) -> None:
        self._names: dict[str, frozenset[str]] = {}

    def exists(self, path: str) -> bool:
        folder, name = os.path.split(path)
        if folder not in self._names:
            try:
                self._names[folder] = frozenset(os.listdir(folder))
            except OSError:
                self._names[folder] = frozenset()
        return name in self._names[folder]


def _is_uint(text: str) -> bool:
    return re.fullmatch(r"[0-9]+", text) is not None  # not str.isdigit: it accepts "²", which int() refuses


def _path_parts(path: str) -> list[str]:
    return [p for p in path.replace("\\", "/").split("/") if p not in ("", ".")]


def read_split_list(list_file: Path, data_dir: Path, num_classes: int | None = None) -> tuple[list[str], list[int]]:
    """Read one split list; return the resolved image paths and their labels.

    Accepts ``<relative/path.jpg> <label>`` lines (DomainNet's ``*_train.txt``; blank lines are
    skipped) or a YAML mapping ``{data: [paths], targets: [ints]}`` (CODA-Prompt, InfLoRA).
    Paths are resolved against ``data_dir``; a leading prefix that the data dir already stands for
    (``data/domainnet/``, or an absolute path of the machine that wrote the list) is dropped: the
    number of leading folders to drop is the smallest that makes one of the first entries exist,
    and is then applied to every entry of that file. Every file must exist, and every label be
    below ``num_classes`` when given; otherwise ``DataError`` names the list file and line.
    """
    entries = _parse_list(list_file)
    if not entries:
        raise DataError(f"split list {list_file} has no entries")
    if num_classes is not None:
        for where, path, label in entries:
            if label >= num_classes:
                raise DataError(f"{list_file}, {where}: label {label} of {path!r} is out of range for "
                                f"{num_classes} classes (labels are 0..{num_classes - 1})")
    index, base = _FileIndex(), str(data_dir)
    strip = None
    for _, path, _ in entries[:50]:
        parts = _path_parts(path)
        strip = next((k for k in range(len(parts)) if index.exists(os.path.join(base, *parts[k:]))), None)
        if strip is not None:
            break
    if strip is None:
        where, path, _ = entries[0]
        raise DataError(f"{list_file}: none of its first {min(50, len(entries))} entries names a file under "
                        f"{data_dir} (e.g. {where}: {path!r}; tried {os.path.join(base, *_path_parts(path))} "
                        f"and with its leading folders removed). Put the images the list names under {data_dir}.")
    paths, labels, missing = [], [], []
    for where, path, label in entries:
        parts = _path_parts(path)
        resolved = os.path.join(base, *parts[strip:]) if len(parts) > strip else base
        if not index.exists(resolved):
            missing.append(f"  {where}: {path!r} -> {resolved}")
        paths.append(resolved)
        labels.append(label)
    if missing:
        raise DataError(f"{list_file}: {len(missing)} of {len(entries)} entries point to missing files, e.g.\n"
                        + "\n".join(missing[:_FEW]))
    return paths, labels


def load_split_lists(info: _Info, data_dir: Path, train_lists: Sequence[Path], test_lists: Sequence[Path],
                     train_transform: Callable, test_transform: Callable,
                     num_classes: int) -> tuple[ImageList, ImageList]:
    """Concatenate the train lists and the test lists; both must cover the same ``num_classes`` labels."""
    sides = []
    for lists in (train_lists, test_lists):
        paths: list[str] = []
        labels: list[int] = []
        for list_file in lists:
            p, l = read_split_list(list_file, data_dir, num_classes)
            paths += p
            labels += l
        sides.append((paths, labels))
    (train_paths, train_labels), (test_paths, test_labels) = sides
    names = lambda lists: ", ".join(str(p) for p in lists)  # noqa: E731
    seen = sorted(set(train_labels))
    if len(seen) != num_classes:
        absent = sorted(set(range(num_classes)) - set(seen))
        raise DataError(f"{info.title} ({info.name}): the train lists ({names(train_lists)}) cover "
                        f"{len(seen)} classes, expected {num_classes} (labels never used: {_few(absent)}).")
    _check_same_classes(info, train_labels, test_labels, "the train lists", "the test lists", "labels")
    provenance = f"split lists {names(train_lists)} / {names(test_lists)} over images in {data_dir}"
    return (ImageList(train_paths, train_labels, train_transform, provenance=provenance),
            ImageList(test_paths, test_labels, test_transform, provenance=provenance))


# ----------------------------------------------------------------------------- raw ImageNet-R split


def _stratified_split(files: Sequence[str], labels: Sequence[int]) -> tuple[list[str], list[str]]:
    """Per class: a seeded permutation of its sorted files; the first 20 % (rounded half up, at
    least one when the class has two or more images) go to test.

    numpy's legacy ``RandomState`` stream is frozen by numpy's compatibility policy, and no torch
    RNG is involved, so the split does not depend on library versions or on the run's seed.
    """
    rng = np.random.RandomState(SPLIT_SEED)
    by_class: dict[int, list[str]] = {}
    for f, y in sorted(zip(files, labels), key=lambda fy: (fy[1], fy[0])):
        by_class.setdefault(y, []).append(f)
    train, test = [], []
    for y in sorted(by_class):
        members = by_class[y]
        n = len(members)
        n_test = min(max(int(np.floor(n * TEST_FRACTION + 0.5)), 1), n - 1) if n > 1 else 0
        chosen = set(rng.permutation(n)[:n_test].tolist())
        for i, f in enumerate(members):
            (test if i in chosen else train).append(f)
    return train, test


def _read_split_file(split_file: Path, files: Sequence[str]) -> tuple[list[str], list[str]]:
    """The split in ``split_file``; ``CorruptFileError`` unless it reads back and partitions ``files``."""
    try:
        doc = read_checked_json(split_file)
        train, test = doc["train"], doc["test"]
        if not all(isinstance(f, str) for f in train + test):
            raise TypeError("non-string entries")
    except OSError as err:
        raise DataError(f"cannot read the split file {split_file}: {err}") from err
    except (ValueError, KeyError, TypeError) as err:
        raise CorruptFileError(split_file, f"unreadable: {err}") from err
    if set(train) & set(test) or set(train) | set(test) != set(files) or len(train) + len(test) != len(files):
        raise CorruptFileError(split_file, f"does not partition the {len(files)} images it was made for")
    return train, test


def split_raw_folder(data_dir: Path, classes: Sequence[str], splits_dir: Path,
                     prefix: str) -> tuple[list[str], list[str], Path, bool]:
    """The 80/20 split of the images under ``data_dir/<class>/``, made once and reused.

    The split file is ``splits_dir/<prefix>_split_<hash>.json``, ``<hash>`` being the first 12 hex
    digits of the SHA-256 of the sorted list of relative image paths (``<class>/<file>``, '/'-
    separated, joined by newlines). Any later run over the same files reads that file; a changed
    set of files gets a new one. Returns (train paths, test paths) relative to ``data_dir``, the
    split file, and whether it was written now.
    """
    class_to_idx = {c: i for i, c in enumerate(classes)}
    samples = make_dataset(str(data_dir), class_to_idx, is_valid_file=_is_image_file)
    files = sorted(Path(p).relative_to(data_dir).as_posix() for p, _ in samples)
    digest = hashlib.sha256("\n".join(files).encode()).hexdigest()
    split_file = Path(splits_dir) / f"{prefix}_split_{digest[:12]}.json"
    if split_file.exists():
        try:
            train, test = _read_split_file(split_file, files)
            return train, test, split_file, False
        except CorruptFileError as err:  # the split is a function of the files: make it again
            with contextlib.suppress(FileNotFoundError):  # another process moved it first
                set_aside(split_file, err.why, "split file", "made again from the images")
    train, test = _stratified_split(files, [class_to_idx[f.split("/", 1)[0]] for f in files])
    doc = {"format": _SPLIT_FORMAT, "source": str(data_dir), "files_sha256": digest, "num_files": len(files),
           "method": f"stratified per class: numpy RandomState({SPLIT_SEED}).permutation over each class's "
                     f"sorted files (classes in sorted order), first round({TEST_FRACTION}*n) to test",
           "seed": SPLIT_SEED, "test_fraction": TEST_FRACTION, "classes": list(classes),
           "train": train, "test": test}
    try:
        atomic_write_json(split_file, doc, checksum=True)
    except OSError as err:
        raise DataError(f"cannot write the split file {split_file}: {err}") from err
    return train, test, split_file, True


# ----------------------------------------------------------------------------- ImageNet-R

_IMR = BENCHMARKS["imr"]  # folder, accepted layouts, source: its registration (builtin.py)


def load_imagenet_r(data_dir: Path, train_transform: Callable, test_transform: Callable, splits_dir: Path,
                    *, num_classes: int = 200) -> tuple[Dataset, Dataset]:
    """ImageNet-R: pre-split folders, else split lists, else the raw release split 80/20 once."""
    data_dir = Path(data_dir)
    pre_split = _open_pre_split(_IMR, data_dir, train_transform, test_transform, num_classes)
    if pre_split is not None:
        return pre_split
    lists = find_split_lists(data_dir)
    if lists is not None:
        return load_split_lists(_IMR, data_dir, *lists, train_transform, test_transform, num_classes)
    classes = class_folders(data_dir)
    if not classes:
        raise _missing(_IMR, data_dir, "no train/ and test/ folders, split lists or class folders")
    _check_class_count(_IMR, classes, data_dir, num_classes)
    return _split_class_folders(data_dir, classes, Path(splits_dir), "imr", "ImageNet-R (imr)",
                                "raw ImageNet-R folders", train_transform, test_transform)


def _split_class_folders(data_dir: Path, classes: Sequence[str], splits_dir: Path, prefix: str, who: str,
                         what: str, train_transform: Callable, test_transform: Callable) -> tuple[Dataset, Dataset]:
    """One folder of class folders as (train, test), split once by ``split_raw_folder`` (the split
    file ``<prefix>_split_<hash>.json`` in ``splits_dir``, reused afterwards)."""
    try:
        train, test, split_file, made = split_raw_folder(data_dir, classes, splits_dir, prefix)
    except FileNotFoundError as err:  # make_dataset: a class folder without a single image
        raise DataError(f"{who}: class folders without images in {data_dir}: {err}") from err
    provenance = (f"{what} {data_dir}, stratified {1 - TEST_FRACTION:.0%}/{TEST_FRACTION:.0%} split "
                  f"{'written to' if made else 'read from'} {split_file}")
    label = {c: i for i, c in enumerate(classes)}
    make = lambda files, transform: ImageList(  # noqa: E731
        [str(data_dir / f) for f in files], [label[f.split("/", 1)[0]] for f in files], transform,
        classes=list(classes), provenance=provenance)
    return make(train, train_transform), make(test, test_transform)


# ----------------------------------------------------------------------------- ImageNet-A

_IMA = BENCHMARKS["ima"]  # folder, accepted layouts, source: its registration (builtin.py)


def load_imagenet_a(data_dir: Path, train_transform: Callable, test_transform: Callable, splits_dir: Path,
                    *, num_classes: int = 200) -> tuple[Dataset, Dataset]:
    """ImageNet-A from pre-split ``train/`` and ``test/`` folders.

    The raw release (``<wnid>/*.jpg`` only) is refused: a split made here would not be the
    archive's, and results would not be comparable with the published ones.
    """
    data_dir = Path(data_dir)
    pre_split = _open_pre_split(_IMA, data_dir, train_transform, test_transform, num_classes)
    if pre_split is not None:
        return pre_split
    classes = class_folders(data_dir)
    if classes:
        raise _missing(_IMA, data_dir, f"it holds {len(classes)} class folders directly ({_few(classes)}), like the "
                                       f"raw release; this benchmark needs the pre-split train/ and test/ folders")
    raise _missing(_IMA, data_dir, "no train/ and test/ folders")


# ----------------------------------------------------------------------------- DomainNet

_DN = BENCHMARKS["dn"]  # folder, accepted layouts, source: its registration (builtin.py)


def load_domainnet(data_dir: Path, train_transform: Callable, test_transform: Callable, splits_dir: Path,
                   *, num_classes: int = 345) -> tuple[Dataset, Dataset]:
    """DomainNet from split lists (txt or YAML) resolved against ``data_dir``."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise _missing(_DN, data_dir, "the folder does not exist")
    lists = find_split_lists(data_dir)
    if lists is None:
        folders = class_folders(data_dir)
        why = (f"it has image folders ({_few(folders)}) but no split lists" if folders
               else "it holds neither images nor split lists")
        raise _missing(_DN, data_dir, why)
    return load_split_lists(_DN, data_dir, *lists, train_transform, test_transform, num_classes)


# ----------------------------------------------------------------------------- CIFAR-100

_C100 = BENCHMARKS["c100"]  # folder, accepted layouts, source: its registration (builtin.py)


def cifar_test_transform(size: int) -> Callable:
    """InfLoRA's and PILOT's ``cifar224`` test pipeline: the 32 px image resized to ``size``."""
    return T.Compose([T.Resize(size), T.ToTensor()])


def load_cifar100(data_dir: Path, train_transform: Callable, test_transform: Callable, splits_dir: Path,
                  *, num_classes: int = 100) -> tuple[Dataset, Dataset]:
    """CIFAR-100 through torchvision (no download); ``data_dir`` holds ``cifar-100-python/`` or is it."""
    data_dir = Path(data_dir)
    root = data_dir.parent if data_dir.name == CIFAR100.base_folder else data_dir
    folder = root / CIFAR100.base_folder
    if not folder.is_dir():
        raise _missing(_C100, data_dir, f"there is no {CIFAR100.base_folder}/ folder")
    try:
        train = CIFAR100(str(root), train=True, transform=train_transform, download=False)
        test = CIFAR100(str(root), train=False, transform=test_transform, download=False)
    except RuntimeError as err:  # torchvision: a file is missing or its md5 differs
        expected = CIFAR100.train_list + CIFAR100.test_list + [[CIFAR100.meta["filename"], CIFAR100.meta["md5"]]]
        bad = [f"{name} ({'missing' if not (folder / name).is_file() else 'md5 differs from the official archive'})"
               for name, md5 in expected if not check_integrity(str(folder / name), md5)]
        raise DataError(f"CIFAR-100 (c100): files in {folder} are missing or corrupt: {', '.join(bad) or err}.\n"
                        f"Re-extract cifar-100-python.tar.gz from {_C100.source}.") from err
    except (pickle.UnpicklingError, EOFError, KeyError, ValueError) as err:
        raise DataError(f"CIFAR-100 (c100): cannot unpickle the files in {folder}: {err!r}") from err
    found = sorted(set(train.targets))
    if len(found) != num_classes:
        raise DataError(f"CIFAR-100 (c100): {folder}/train has {len(found)} classes, expected {num_classes}.")
    provenance = f"torchvision CIFAR-100 in {folder}"
    train.provenance = test.provenance = provenance
    return train, test


# ----------------------------------------------------------------------------- CUB-200

_CUB = BENCHMARKS["cub"]  # folder, accepted layouts, source: its registration (builtin.py)


def _read_id_table(path: Path) -> dict[int, tuple[str, str]]:
    """CUB's ``<id> <value>`` files as {id: (value, 'file, line n')}."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"CUB-200 (cub): cannot read {path}: {err}") from err
    table = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        fields = line.split(maxsplit=1)
        if len(fields) != 2 or not _is_uint(fields[0]):
            raise DataError(f"{path}, line {number}: cannot parse {line.strip()!r}; expected '<image id> <value>'")
        table[int(fields[0])] = (fields[1].strip(), f"{path}, line {number}")
    return table


def _load_cub_original(root: Path, train_transform: Callable, test_transform: Callable,
                       num_classes: int) -> tuple[ImageList, ImageList]:
    images = _read_id_table(root / "images.txt")
    labels = _read_id_table(root / "image_class_labels.txt")
    is_train = _read_id_table(root / "train_test_split.txt")
    index = _FileIndex()
    sides: dict[bool, tuple[list[str], list[int]]] = {True: ([], []), False: ([], [])}
    classes: dict[int, str] = {}
    for image_id, (rel, where) in images.items():
        for table, name in ((labels, "image_class_labels.txt"), (is_train, "train_test_split.txt")):
            if image_id not in table:
                raise DataError(f"{where}: image id {image_id} has no entry in {root / name}")
        label_text, label_where = labels[image_id]
        split_text, split_where = is_train[image_id]
        if not _is_uint(label_text) or not 1 <= int(label_text) <= num_classes:
            raise DataError(f"{label_where}: class id {label_text!r} is not in 1..{num_classes}")
        if split_text not in ("0", "1"):
            raise DataError(f"{split_where}: expected 1 (train) or 0 (test), got {split_text!r}")
        path = os.path.join(root, "images", *_path_parts(rel))
        if not index.exists(path):
            raise DataError(f"{where}: the image {path} does not exist")
        label = int(label_text) - 1  # CUB numbers classes 1..200 in the order of their sorted folders
        classes.setdefault(label, _path_parts(rel)[0])
        sides[split_text == "1"][0].append(path)
        sides[split_text == "1"][1].append(label)
    train_labels, test_labels = sides[True][1], sides[False][1]
    if len(set(train_labels)) != num_classes:
        raise DataError(f"CUB-200 (cub): {root} has training images of {len(set(train_labels))} classes, "
                        f"expected {num_classes} (found: {_few([classes[c] for c in sorted(set(train_labels))])}).")
    _check_same_classes(_CUB, [classes[c] for c in train_labels], [classes[c] for c in test_labels],
                        "train", "test", "classes")
    provenance = f"original CUB_200_2011 release in {root} (train_test_split.txt)"
    names = [classes[c] for c in range(num_classes)]
    return (ImageList(*sides[True], train_transform, classes=names, provenance=provenance),
            ImageList(*sides[False], test_transform, classes=names, provenance=provenance))


def load_cub(data_dir: Path, train_transform: Callable, test_transform: Callable, splits_dir: Path,
             *, num_classes: int = 200) -> tuple[Dataset, Dataset]:
    """CUB-200: pre-split folders, else the original ``CUB_200_2011`` release."""
    data_dir = Path(data_dir)
    pre_split = _open_pre_split(_CUB, data_dir, train_transform, test_transform, num_classes)
    if pre_split is not None:
        return pre_split
    for root in (data_dir / "CUB_200_2011", data_dir):
        if (root / "images.txt").is_file():
            return _load_cub_original(root, train_transform, test_transform, num_classes)
    raise _missing(_CUB, data_dir, "no train/ and test/ folders and no CUB_200_2011/images.txt")


# ----------------------------------------------------------------------------- your own folder


def load_folder(data_dir: Path, train_transform: Callable, test_transform: Callable, splits_dir: Path,
                *, num_classes: int) -> tuple[Dataset, Dataset]:
    """``--bench folder:PATH``: ``PATH/train/<class>/*`` + ``PATH/test/<class>/*``, or one folder
    of class folders ``PATH/<class>/*`` split once as raw ImageNet-R is (stratified, seeded, 80/20,
    recorded in ``splits_dir/folder_split_<hash>.json`` and reused; ``split_raw_folder``)."""
    data_dir = Path(data_dir)
    info = _Info(name=f"folder:{data_dir}", title=data_dir.name, folder=data_dir.name, layouts="""\
  (1) pre-split:  PATH/train/<class>/*.jpg and PATH/test/<class>/*.jpg, the same class folders
  (2) one folder: PATH/<class>/*.jpg, split 80/20 once (stratified, seeded), the split recorded""",
                 source="your own images")
    pre_split = _open_pre_split(info, data_dir, train_transform, test_transform, num_classes)
    if pre_split is not None:
        return pre_split
    classes = class_folders(data_dir)
    _check_class_count(info, classes, data_dir, num_classes)
    return _split_class_folders(data_dir, classes, Path(splits_dir), "folder", info.name, "class folders",
                                train_transform, test_transform)
