"""The uint8 image cache: decode every image once, augment whole batches on the device.

The JPEG path (the default) decodes and augments every image in DataLoader workers with PIL, every
epoch. On a GPU that trains a ViT-B/16 at thousands of images per second, that is the bottleneck.
With ``data.image_cache: true`` the protocol instead

1. decodes each image **once** into a memory-mapped ``.npy`` file of uint8 pixels:

   - training images as their *source*: the whole image resized to ``S x S`` (``S`` =
     ``data.cache_source_size``, default ``round(image_size * 256 / 224)``, 256 for 224 px) with
     PIL's bicubic filter, plus the original ``(height, width)``;
   - test images as the exact output of the benchmark's test transform (Resize 256 + centre
     crop 224 for the ImageNet-style benchmarks), so evaluation sees the very tensors the JPEG
     path gives (``ToTensor`` is ``uint8 / 255``, which the cache reproduces bit for bit);

2. feeds the uint8 batches to the device (4x fewer bytes than float) and there runs, for the
   whole batch at once: RandomResizedCrop (scale 0.05-1, ratio 3/4-4/3, the official
   repositories' values), horizontal flip and scaling to [0, 1] (:class:`DeviceAugment`).

The crop is drawn in the *original* image's pixel frame, from its stored height and width, so
scale and aspect ratio mean what they mean in torchvision's RandomResizedCrop; the stored source
is squashed to a square only as a container, and the crop box is mapped into it. What differs
from the JPEG path: the crop is resampled bilinearly from the ``S``-pixel source instead of
from the full-resolution image (small crops are upsampled from fewer pixels; FFCV makes the same
trade), the crop box is continuous rather than rounded to whole pixels, and the random numbers
come from a device generator rather than the workers' torch RNG. Same seed, same crops: the
cache and a loader that decodes the JPEGs into the same source (``ToSource``) give identical
batches (``tests/test_image_cache.py``).

Where the files go: ``<data dir>/.clbench_cache/`` when that is writable (next to the data, shared
by every run on it), else ``<results root>/cache/``. A cache that exists in either place is
reused; a build holds a file lock, so the tasks of a SLURM array wait for one builder. File names
carry a digest of the dataset (its file list and labels), the source size and the transform, so a
changed dataset gets a new file; images edited in place under the same name are not noticed
(delete ``.clbench_cache/`` then).
"""
from __future__ import annotations

import hashlib
import json
import math
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from clbench.benchmarks.base import Benchmark
from clbench.benchmarks.transforms import with_transform
from clbench.errors import DataError
from clbench.files import atomic_path, atomic_replace, atomic_write_json, build_once

CACHE_FORMAT = 1  # bump when the stored bytes of a cache would change
CACHE_FOLDER = ".clbench_cache"
# The official repositories' RandomResizedCrop (benchmarks.transforms.default_train_transform).
CROP_SCALE = (0.05, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)


def default_source_size(image_size: int) -> int:
    """The size the standard pipeline resizes to before its crop: 256 for 224."""
    return int(round(image_size * 256 / 224))


# ------------------------------------------------------------------------------ decoded sources


class SourceImage(NamedTuple):
    """A training image as the cache holds it. Batched by the DataLoader's collate into
    ``pixels [B, 3, S, S]`` and ``size [B, 2]``."""

    pixels: torch.Tensor  # uint8 [3, S, S]: the whole image, resized to a square
    size: torch.Tensor  # int64 [2]: the original (height, width)


class ToSource:
    """Decoded image (PIL, or a uint8/[0, 1] tensor ``[3, H, W]``) -> :class:`SourceImage`.

    The one resize between a file and the cache: both the cache builder and the JPEG-path
    equivalent go through it, so they agree byte for byte.
    """

    def __init__(self, size: int):
        self.size = size

    def __call__(self, image: Any) -> SourceImage:
        from PIL import Image

        if isinstance(image, torch.Tensor):
            image = _tensor_to_pil(image)
        if not isinstance(image, Image.Image):
            raise TypeError(f"ToSource needs a PIL image or a [3, H, W] tensor, got {type(image).__name__}")
        image = image.convert("RGB")
        height, width = image.height, image.width
        square = image.resize((self.size, self.size), Image.BICUBIC)
        pixels = torch.from_numpy(np.asarray(square, dtype=np.uint8).transpose(2, 0, 1).copy())
        return SourceImage(pixels, torch.tensor([height, width], dtype=torch.int64))

    def __repr__(self) -> str:
        return f"ToSource(size={self.size}, bicubic)"


def _tensor_to_pil(x: torch.Tensor):
    from PIL import Image

    if x.dim() != 3 or x.shape[0] not in (1, 3):
        raise TypeError(f"expected an image tensor [3, H, W], got shape {tuple(x.shape)}")
    if x.dtype != torch.uint8:
        x = (x.float() * 255).round().clamp(0, 255).to(torch.uint8)
    return Image.fromarray(x.expand(3, -1, -1).permute(1, 2, 0).contiguous().numpy())


def to_uint8_exact(x: torch.Tensor, where: str) -> torch.Tensor:
    """A float image in [0, 1] that is exactly ``k / 255`` (what ``ToTensor`` gives) as uint8."""
    if x.dtype == torch.uint8:
        return x
    u8 = (x * 255).round().clamp(0, 255).to(torch.uint8)
    if not torch.equal(u8.float().div(255), x):
        raise DataError(
            f"{where}: the test transform's output is not an 8-bit image (values other than k/255: a "
            f"normalisation or a float-tensor resize?), so the uint8 image cache cannot reproduce it. "
            f"Run this benchmark with data.image_cache: false.")
    return u8


# ------------------------------------------------------------------------------ device augmentation


def random_resized_crop_boxes(size: torch.Tensor, generator: torch.Generator | None,
                              scale: tuple[float, float] = CROP_SCALE, ratio: tuple[float, float] = CROP_RATIO,
                              tries: int = 10) -> torch.Tensor:
    """torchvision's RandomResizedCrop parameters for a batch, drawn on ``size``'s device.

    ``size`` is ``[B, 2]`` (height, width) in original pixels. Returns boxes ``[B, 4]`` as
    fractions of the image: (left, top, width, height). Like torchvision: up to ``tries`` draws of
    (area fraction, log-uniform aspect ratio), the first that fits wins, else a centre crop with
    the ratio clamped into ``ratio``. Continuous, so no rounding to whole pixels. No host sync.
    """
    h, w = size[:, 0:1].float(), size[:, 1:2].float()  # [B, 1]
    b, dev = size.shape[0], size.device
    area_frac = torch.empty(b, tries, device=dev).uniform_(scale[0], scale[1], generator=generator)
    log_r = torch.empty(b, tries, device=dev).uniform_(math.log(ratio[0]), math.log(ratio[1]),
                                                       generator=generator)
    aspect = log_r.exp()  # crop width / crop height, in pixels
    area = h * w * area_frac
    cw, ch = (area * aspect).sqrt() / w, (area / aspect).sqrt() / h  # as fractions of the image
    fits = (cw <= 1) & (ch <= 1)
    first = torch.where(fits.any(1), fits.float().argmax(1), torch.full((b,), tries, device=dev))
    # fallback: torchvision's centre crop of the whole image with its ratio clamped into range
    in_ratio = w / h
    fw = torch.where(in_ratio > ratio[1], h * ratio[1] / w, torch.ones_like(w))
    fh = torch.where(in_ratio < ratio[0], w / ratio[0] / h, torch.ones_like(h))
    cw = torch.cat([cw, fw], 1).gather(1, first[:, None])
    ch = torch.cat([ch, fh], 1).gather(1, first[:, None])
    pos = torch.rand(b, 2, device=dev, generator=generator)
    drawn = (first < tries)[:, None]
    left = torch.where(drawn, pos[:, :1] * (1 - cw), (1 - cw) / 2)
    top = torch.where(drawn, pos[:, 1:] * (1 - ch), (1 - ch) / 2)
    return torch.cat([left, top, cw, ch], 1)


def center_crop_boxes(size: torch.Tensor, crop_fraction: float) -> torch.Tensor:
    """The box of "resize the shorter side to R, centre-crop ``crop_fraction * R``" (Resize 256 +
    CenterCrop 224 is ``crop_fraction = 224 / 256``), as (left, top, width, height) fractions."""
    h, w = size[:, 0:1].float(), size[:, 1:2].float()
    short = torch.minimum(h, w)
    cw, ch = crop_fraction * short / w, crop_fraction * short / h
    return torch.cat([(1 - cw) / 2, (1 - ch) / 2, cw, ch], 1)


def crop_resize(pixels: torch.Tensor, boxes: torch.Tensor, out_size: int,
                flip: torch.Tensor | None = None) -> torch.Tensor:
    """Crop each ``boxes[i]`` out of ``pixels[i]`` (uint8 ``[B, 3, S, S]``), resample it bilinearly to
    ``out_size`` (edge pixels replicated), optionally mirror it, and scale to float [0, 1]."""
    b = pixels.shape[0]
    left, top, cw, ch = boxes.unbind(1)
    sx = cw if flip is None else torch.where(flip, -cw, cw)  # a mirrored box: same centre, x reversed
    theta = torch.zeros(b, 2, 3, device=pixels.device, dtype=torch.float32)
    theta[:, 0, 0], theta[:, 0, 2] = sx, 2 * left + cw - 1
    theta[:, 1, 1], theta[:, 1, 2] = ch, 2 * top + ch - 1
    grid = F.affine_grid(theta, [b, 3, out_size, out_size], align_corners=False)
    out = F.grid_sample(pixels.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out.div_(255).clamp_(0, 1)


class DeviceAugment:
    """A batch of :class:`SourceImage` -> float images ``[B, 3, out, out]`` in [0, 1], on the
    batch's device: RandomResizedCrop + flip when ``train``, else the test transform's centre
    crop (``crop_fraction`` of the shorter side). Random numbers come from ``generator``."""

    def __init__(self, out_size: int, crop_fraction: float = 224 / 256, scale: tuple[float, float] = CROP_SCALE,
                 ratio: tuple[float, float] = CROP_RATIO, flip_p: float = 0.5):
        self.out_size, self.crop_fraction = out_size, crop_fraction
        self.scale, self.ratio, self.flip_p = tuple(scale), tuple(ratio), flip_p

    def __call__(self, batch: SourceImage, train: bool, generator: torch.Generator | None = None) -> torch.Tensor:
        pixels, size = batch
        if not train:
            return crop_resize(pixels, center_crop_boxes(size, self.crop_fraction), self.out_size)
        boxes = random_resized_crop_boxes(size, generator, self.scale, self.ratio)
        flip = torch.rand(pixels.shape[0], device=pixels.device, generator=generator) < self.flip_p
        return crop_resize(pixels, boxes, self.out_size, flip)

    def __repr__(self) -> str:
        return (f"DeviceAugment(out={self.out_size}, scale={self.scale}, ratio=({self.ratio[0]:.4f}, "
                f"{self.ratio[1]:.4f}), flip_p={self.flip_p}, eval crop {self.crop_fraction:.4f})")


class DeviceBatches:
    """A DataLoader of :class:`SourceImage` batches that yields ``(images on the device, labels)``.

    Drop-in for the loader the protocol hands to methods: ``len()``, iteration, ``.dataset``.
    Labels stay where the DataLoader put them (the caller moves them). One generator lives as
    long as the loader, so each epoch draws new crops; it is seeded, so runs repeat exactly.
    """

    def __init__(self, loader: DataLoader, augment: DeviceAugment, device: torch.device, train: bool,
                 seed: int | None):
        self.loader, self.augment, self.device, self.train = loader, augment, torch.device(device), train
        self.generator = torch.Generator(device=self.device)
        if seed is not None:
            self.generator.manual_seed(seed)
        self.dataset = loader.dataset

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for x, y in self.loader:
            if not isinstance(x, SourceImage):
                raise TypeError(f"DeviceBatches expects batches of SourceImage, got {type(x).__name__}")
            batch = SourceImage(x.pixels.to(self.device, non_blocking=True), x.size.to(self.device, non_blocking=True))
            yield self.augment(batch, self.train, self.generator), y


# ------------------------------------------------------------------------------ the memory-mapped files


class CachedImages(Dataset):
    """Images from a cache file: ``(SourceImage, label)`` for a source cache (it has sizes),
    ``(uint8 [3, H, W], label)`` for a test cache. ``targets`` are the original labels.

    The map is opened lazily in each process (DataLoader workers get the path, not the pages).
    """

    def __init__(self, pixels_path: Path, targets: np.ndarray, sizes: np.ndarray | None, provenance: str):
        self.pixels_path = Path(pixels_path)
        self.targets = np.asarray(targets, dtype=np.int64)
        self.sizes = None if sizes is None else torch.from_numpy(np.asarray(sizes, dtype=np.int64))
        self.provenance = provenance
        self._pixels: np.ndarray | None = None

    @property
    def pixels(self) -> np.ndarray:
        if self._pixels is None:
            self._pixels = np.load(self.pixels_path, mmap_mode="r")
        return self._pixels

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_pixels": None}

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        pixels = torch.from_numpy(np.array(self.pixels[i]))  # a copy out of the map
        if self.sizes is None:
            return pixels, int(self.targets[i])
        return SourceImage(pixels, self.sizes[i]), int(self.targets[i])

    def __repr__(self) -> str:
        return f"CachedImages({len(self)} images from {self.pixels_path})"


def _dataset_digest(dataset: Dataset) -> str:
    """What identifies a dataset's images: file paths (or raw arrays) and labels."""
    h = hashlib.sha1()
    h.update(f"{type(dataset).__name__}|{len(dataset)}|{getattr(dataset, 'provenance', '')}".encode())
    h.update(np.asarray(dataset.targets, dtype=np.int64).tobytes())
    if hasattr(dataset, "samples"):  # torchvision ImageFolder
        h.update("\n".join(str(p) for p, _ in dataset.samples).encode())
    elif hasattr(dataset, "_paths"):  # benchmarks.datasets.ImageList
        h.update(np.asarray(dataset._paths).tobytes())
    elif isinstance(getattr(dataset, "data", None), np.ndarray):  # CIFAR: decoded arrays
        h.update(np.ascontiguousarray(dataset.data).tobytes())
    elif isinstance(getattr(dataset, "images", None), (np.ndarray, torch.Tensor)):  # in-memory tensors
        h.update(np.ascontiguousarray(np.asarray(dataset.images)).tobytes())
    else:
        raise DataError(f"the image cache cannot tell {type(dataset).__name__}'s images apart (it has no "
                        f"samples, _paths, data or images attribute); run with data.image_cache: false")
    return h.hexdigest()[:16]


def _stable_repr(obj: Any) -> str:
    return re.sub(r" at 0x[0-9a-fA-F]+", "", repr(obj))  # no memory addresses in a cache key


def _writable(folder: Path) -> bool:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder):
            return True
    except OSError:
        return False


def _stack(items: list) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Collate for the builder: pixels ``[B, ...]`` and, for sources, sizes ``[B, 2]``."""
    xs = [x for x, _ in items]
    if isinstance(xs[0], SourceImage):
        return torch.stack([x.pixels for x in xs]), torch.stack([x.size for x in xs])
    return torch.stack(xs), None


class ImageCache:
    """Finds or builds the cache files of one dataset split and opens them.

    ``folders``: where to look, in order (the data's own cache folder first); a missing cache is
    built in the first writable one. ``workers``: DataLoader workers for the one-time decode.
    """

    def __init__(self, folders: list[Path], workers: int = 4, log: Callable[[str], None] | None = None):
        if not folders:
            raise ValueError("ImageCache needs at least one folder")
        self.folders = [Path(f) for f in folders]
        self.workers = workers
        self.log = log or (lambda msg: print(f"[image cache] {msg}", file=sys.stderr, flush=True))
        self.builds = 0  # files this object decoded (tests check that a cache is reused)

    def _name(self, dataset: Dataset, kind: str, transform: Any) -> str:
        key = f"{CACHE_FORMAT}|{kind}|{_stable_repr(transform)}|{_dataset_digest(dataset)}"
        return f"{kind}-{len(dataset)}-{hashlib.sha1(key.encode()).hexdigest()[:16]}"

    def open(self, dataset: Dataset, transform: Callable, kind: str, where: str) -> CachedImages:
        """The cache of ``dataset`` as decoded by ``transform`` (a ``ToSource`` for ``kind='source'``,
        the test transform for ``kind='test'``); ``dataset`` must already apply ``transform``."""
        name = self._name(dataset, kind, transform)
        for folder in self.folders:
            if (folder / f"{name}.npy").exists():
                return self._load(folder, name)
        for folder in self.folders:
            if _writable(folder):  # the .npy is written last, atomically: it marks a whole cache
                build_once(folder / f"{name}.npy", lambda _: self._build(dataset, folder, name, kind, transform, where))
                return self._load(folder, name)
        raise DataError(f"the image cache cannot write to any of {', '.join(map(str, self.folders))}; "
                        f"make one writable or run with data.image_cache: false")

    def _load(self, folder: Path, name: str) -> CachedImages:
        meta = json.loads((folder / f"{name}.json").read_text())
        sizes = np.load(folder / f"{name}.sizes.npy") if meta["kind"] == "source" else None
        return CachedImages(folder / f"{name}.npy", np.load(folder / f"{name}.targets.npy"), sizes,
                            f"uint8 cache {folder / name}.npy of: {meta['provenance']}")

    def _build(self, dataset: Dataset, folder: Path, name: str, kind: str, transform: Any, where: str) -> None:
        n = len(dataset)
        start = time.perf_counter()
        self.log(f"decoding {n} {where} images once into {folder / name}.npy ({transform!r})")
        loader = DataLoader(dataset, batch_size=64, shuffle=False, num_workers=self.workers, collate_fn=_stack)
        pixels: np.ndarray | None = None
        sizes = np.zeros((n, 2), dtype=np.int64)
        with atomic_path(folder / f"{name}.npy") as tmp:  # renamed last: the .npy existing means the cache is whole
            done = 0
            for x, size in loader:
                if kind == "test":
                    x = to_uint8_exact(x, where)
                if pixels is None:
                    pixels = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(n, *x.shape[1:]))
                if tuple(x.shape[1:]) != pixels.shape[1:]:
                    raise DataError(f"{where}: images of shape {tuple(x.shape[1:])} and {pixels.shape[1:]}; the "
                                    f"cache needs one shape (a test transform that crops to a fixed size)")
                pixels[done: done + len(x)] = x.numpy()
                if size is not None:
                    sizes[done: done + len(x)] = size.numpy()
                done += len(x)
            if pixels is None:
                raise DataError(f"{where}: no images to cache")
            pixels.flush()
            del pixels
            targets = np.asarray(dataset.targets, dtype=np.int64)
            atomic_replace(folder / f"{name}.targets.npy", lambda f: np.save(f, targets))
            if kind == "source":
                atomic_replace(folder / f"{name}.sizes.npy", lambda f: np.save(f, sizes))
            atomic_write_json(folder / f"{name}.json", {
                "format": CACHE_FORMAT, "kind": kind, "count": n, "transform": _stable_repr(transform),
                "provenance": getattr(dataset, "provenance", type(dataset).__name__)})
        self.builds += 1
        self.log(f"cached {n} {where} images in {time.perf_counter() - start:.0f}s")


def _with_transform(dataset: Dataset, transform: Callable) -> Dataset:
    def refuse() -> Dataset:
        raise DataError(f"the image cache needs a dataset with a 'transform' attribute to decode its images; "
                        f"{type(dataset).__name__} has none. Run with data.image_cache: false")

    return with_transform(dataset, transform, refuse)


def cached_datasets(bench: Benchmark, train: Dataset, test: Dataset, image_size: int, test_transform: Callable,
                    source_size: int | None, data_dir: Path, fallback_dir: Path,
                    workers: int = 4) -> tuple[CachedImages, CachedImages, DeviceAugment]:
    """The train split as cached sources, the test split as cached test-transform outputs, and
    the device augmentation that turns a source batch into training (or plain) images."""
    if bench.train_transform is not None:
        raise DataError(
            f"data.image_cache replaces the standard RandomResizedCrop + flip pipeline by its device "
            f"equivalent, but benchmark '{bench.name}' has its own train transform; run it with "
            f"data.image_cache: false")
    source_size = source_size or default_source_size(image_size)
    if source_size < image_size:
        raise DataError(f"data.cache_source_size={source_size} is below the training resolution {image_size}; "
                        f"use at least {image_size} (default {default_source_size(image_size)})")
    cache = ImageCache([Path(data_dir) / CACHE_FOLDER, Path(fallback_dir)], workers)
    to_source = ToSource(source_size)
    train_cached = cache.open(_with_transform(train, to_source), to_source, "source", f"{bench.name} train")
    test_cached = cache.open(_with_transform(test, test_transform), test_transform, "test", f"{bench.name} test")
    return train_cached, test_cached, DeviceAugment(image_size, crop_fraction=image_size / default_source_size(image_size))
