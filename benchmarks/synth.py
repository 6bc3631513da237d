"""``synth``: the built-in offline class-incremental benchmark and its small pretrained ViT.

Everything here is generated, so the whole suite runs on a laptop CPU with no download:

* **Images.** 32x32 RGB, drawn procedurally with seeded numpy. A *class* is a procedural object:
  two to four coloured parts (ellipses, polygons, rings, strokes, crosses; solid, striped,
  checkered or dotted) at class-specific offsets, sizes and angles. Every *sample* jitters the
  object (position, scale, rotation, colour, noise, background clutter) and draws it in one of
  six renditions: photo, sketch (coloured pencil), inverted, faded (an old print), cartoon, noisy.
* **Classes, as ImageNet-R's.** 200 continual-learning classes (5, 10 or 20 equal tasks: 40, 20
  or 10 classes per task) with 30 train and 10 test images each, drawn in the five renditions
  other than photo (mixed within every class, in train and test); and a disjoint pool of 200
  pretraining classes drawn as photos only. So the backbone meets the renditions first in the
  continual-learning tasks, as a ViT pretrained on ImageNet photos meets ImageNet-R's.
  Class ``c`` of a pool and each of its splits draw from their own ``SeedSequence`` stream, so
  one class never depends on how many others are generated.
* **Backbone.** ``vit_synth_patch8_32``: timm's own ``VisionTransformer`` (fused qkv, class
  token, ``global_pool='token'``), width 96, depth 6, 4 heads, MLP ratio 2, whose patch
  embedding is timm's ``HybridEmbed`` over a two-convolution stem: one token per 8x8-pixel
  patch (16 + [CLS]). It is pretrained once, supervised on the pretraining pool, and cached.
  The stem has BatchNorm while pretraining, and an auxiliary head on the mean patch embedding
  (a plain ViT this small learns nothing from this data in the budget); the BatchNorm is then
  folded into the convolutions and the auxiliary head dropped, so the backbone is a plain ViT.

Cache layout (``$CLBENCH_CACHE``, default ``~/.cache/clbench``)::

    synth/v{GENERATOR_VERSION}-seed{seed}/data.npz                                 the CL images
    synth/v{GENERATOR_VERSION}-seed{seed}/vit_synth_patch8_32-{recipe}.safetensors  the backbone

Files are written atomically (temporary file, fsync, ``os.replace``) under an ``fcntl`` lock:
when many processes start at once (a SLURM array), exactly one builds and the others wait and
load. **Bump ``GENERATOR_VERSION`` whenever a change alters the images or the pretraining
code**; a change of ``PretrainConfig`` changes the weights' file name by itself. So no stale
cache is ever read.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import HybridEmbed
from timm.models import build_model_with_cfg, register_model
from timm.models.vision_transformer import VisionTransformer
from torch.utils.data import Dataset

from clbench.backbones import register_pretrained_builder
from clbench.benchmarks.base import BENCHMARKS
from clbench.files import atomic_replace, build_once

GENERATOR_VERSION = 3
DEFAULT_SEED = 0
IMAGE_SIZE = BENCHMARKS["synth"].image_size  # 32
NUM_CLASSES = BENCHMARKS["synth"].num_classes  # 200: divisible by 5, 10 and 20 tasks
TRAIN_PER_CLASS = 30
TEST_PER_CLASS = 10
PRETRAIN_CLASSES = 200
MODEL_NAME = BENCHMARKS["synth"].backbone

PRETRAIN_THREADS = 2  # CPU threads that pretraining uses, whatever the process's own setting

STYLES = ("photo", "sketch", "inverted", "faded", "cartoon", "noisy")
SHAPES = ("ellipse", "polygon", "ring", "stroke", "cross")
TEXTURES = ("solid", "stripes", "checker", "dots")
MAX_PARTS = 4

# Seed-sequence stream ids: pools of classes, and the splits drawn from a class.
_POOL_CL, _POOL_PRETRAIN = 0, 1
# Like ImageNet -> ImageNet-R: the backbone is pretrained on photos only, and the CL classes
# come in the other renditions only, which the backbone has never seen.
POOL_RENDITIONS = {_POOL_PRETRAIN: (0,), _POOL_CL: (1, 2, 3, 4, 5)}
_SPLIT_TRAIN, _SPLIT_TEST, _SPLIT_PRETRAIN = 0, 1, 2

# How many times this process built each artefact (tests check that the cache is reused).
build_counts: Counter = Counter()


def _log(msg: str) -> None:
    print(f"[synth] {msg}", file=sys.stderr, flush=True)


# ================================================================================ the generator


@dataclass(frozen=True)
class ClassSpec:
    """One procedural object: arrays over its ``MAX_PARTS`` part slots (first ``num_parts`` used)."""

    num_parts: int
    scale_px: float  # pixels per object unit
    shape: np.ndarray  # [P] index into SHAPES
    sides: np.ndarray  # [P] polygon side count
    offset: np.ndarray  # [P, 2] part centre, object units
    size: np.ndarray  # [P, 2] half-extents (a, b), object units
    angle: np.ndarray  # [P] radians
    color: np.ndarray  # [P, 3] in [0, 1]
    color2: np.ndarray  # [P, 3] the texture's second colour
    texture: np.ndarray  # [P] index into TEXTURES
    tex_freq: np.ndarray  # [P] cycles per object unit
    tex_angle: np.ndarray  # [P] radians

    def as_vector(self) -> np.ndarray:
        """All parameters flattened (to compare two classes)."""
        parts = [np.array([self.num_parts, self.scale_px])]
        parts += [np.asarray(getattr(self, f), dtype=np.float64).ravel()
                  for f in ("shape", "sides", "offset", "size", "angle", "color", "color2",
                            "texture", "tex_freq", "tex_angle")]
        return np.concatenate(parts)


def _rng(*keys: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(k) for k in keys]))


def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Vectorised HSV -> RGB, all inputs in [0, 1]; returns [..., 3]."""
    k = (np.stack([5.0, 3.0, 1.0], -1) + h[..., None] * 6) % 6
    return v[..., None] - v[..., None] * s[..., None] * np.clip(np.minimum(k, 4 - k), 0, 1)


def class_spec(seed: int, pool: int, index: int) -> ClassSpec:
    """The object of class ``index`` of a pool (``_POOL_CL`` or ``_POOL_PRETRAIN``)."""
    rng = _rng(GENERATOR_VERSION, seed, pool, index)
    p = MAX_PARTS
    n = int(rng.integers(2, MAX_PARTS + 1))
    # Parts spread around the object's centre; the first part is the largest ("body").
    radius = rng.uniform(0.0, 0.55, p) * (np.arange(p) > 0)
    theta = rng.uniform(0, 2 * np.pi, p)
    size_a = np.sort(rng.uniform(0.25, 0.65, p))[::-1]
    hue = (rng.uniform() + np.arange(p) * rng.uniform(0.15, 0.5)) % 1.0  # distinct hues per part
    color = _hsv_to_rgb(hue, rng.uniform(0.5, 1.0, p), rng.uniform(0.45, 1.0, p))
    hue2 = (hue + rng.uniform(0.3, 0.7, p)) % 1.0
    color2 = _hsv_to_rgb(hue2, rng.uniform(0.0, 1.0, p), rng.uniform(0.1, 0.9, p))
    return ClassSpec(
        num_parts=n,
        scale_px=float(rng.uniform(11.5, 13.5)),
        shape=rng.integers(0, len(SHAPES), p),
        sides=rng.integers(3, 7, p),
        offset=np.stack([radius * np.cos(theta), radius * np.sin(theta)], -1),
        size=np.stack([size_a, size_a * rng.uniform(0.45, 1.0, p)], -1),
        angle=rng.uniform(0, np.pi, p),
        color=color,
        color2=color2,
        texture=rng.choice(len(TEXTURES), p, p=[0.4, 0.25, 0.15, 0.2]),
        tex_freq=rng.uniform(1.4, 2.6, p),
        tex_angle=rng.uniform(0, np.pi, p),
    )


def _part_sdf(shape: int, sides: int, u: np.ndarray, v: np.ndarray, a: float, b: float) -> np.ndarray:
    """Approximate signed distance (object units, < 0 inside) of one part in its own frame."""
    if shape == 0:  # ellipse
        return (np.sqrt((u / a) ** 2 + (v / b) ** 2) - 1.0) * b
    if shape == 1:  # regular polygon of circumradius a, squashed to b along v
        vs = v * (a / b)
        rho, phi = np.hypot(u, vs), np.arctan2(vs, u)
        sector = 2 * np.pi / sides
        return (rho * np.cos(np.mod(phi, sector) - sector / 2) - a * np.cos(np.pi / sides)) * (b / a)
    if shape == 2:  # ring
        return np.abs((np.sqrt((u / a) ** 2 + (v / b) ** 2) - 1.0) * b) - 0.22 * b
    if shape == 3:  # stroke: a capsule along u
        return np.hypot(np.maximum(np.abs(u) - a, 0.0), v) - 0.3 * b
    w = 0.3 * b  # cross: two bars
    bar1 = np.maximum(np.abs(u) - a, np.abs(v) - w)
    bar2 = np.maximum(np.abs(u) - w, np.abs(v) - a)
    return np.minimum(bar1, bar2)


def _texture(kind: int, u: np.ndarray, v: np.ndarray, freq: float, angle: float) -> np.ndarray:
    """Boolean pattern (True: first colour) in the part's frame, so it turns with the object."""
    if kind == 0:
        return np.ones(u.shape, dtype=bool)
    if kind == 1:
        return np.sin(2 * np.pi * freq * (u * np.cos(angle) + v * np.sin(angle))) > 0
    if kind == 2:
        return np.sin(2 * np.pi * freq * u) * np.sin(2 * np.pi * freq * v) > 0
    fu, fv = np.mod(u * freq * 1.5, 1.0) - 0.5, np.mod(v * freq * 1.5, 1.0) - 0.5
    return fu ** 2 + fv ** 2 > 0.09


def _smooth_noise(rng: np.random.Generator, n: int, channels: int, cells: int = 5) -> np.ndarray:
    """Low-frequency noise [n, channels, 32, 32] in [0, 1]: a cells x cells grid, bilinear up."""
    grid = rng.random((n, channels, cells, cells), dtype=np.float32)
    pos = np.linspace(0, cells - 1, IMAGE_SIZE)
    lo = np.minimum(np.floor(pos).astype(int), cells - 2)
    frac = (pos - lo).astype(np.float32)
    up = np.zeros((IMAGE_SIZE, cells), np.float32)  # interpolation matrix
    up[np.arange(IMAGE_SIZE), lo] = 1 - frac
    up[np.arange(IMAGE_SIZE), lo + 1] = frac
    return up @ grid @ up.T


def _uniform(rng: np.random.Generator, low: float, high: float, shape: Any) -> np.ndarray:
    return (low + (high - low) * rng.random(shape, dtype=np.float32)).astype(np.float32)


def _normal(rng: np.random.Generator, std: Any, shape: Any) -> np.ndarray:
    return rng.standard_normal(shape, dtype=np.float32) * np.float32(std)


@dataclass
class _Part:
    """One part rendered for a batch of samples."""

    alpha: np.ndarray  # [n, 1, H, W] coverage
    edge: np.ndarray  # [n, 1, H, W] outline strength
    pattern: np.ndarray  # [n, 1, H, W] bool, True where the first colour shows
    c1: np.ndarray  # [n, 3, 1, 1]
    c2: np.ndarray  # [n, 3, 1, 1]

    def fill(self, idx: np.ndarray) -> np.ndarray:
        return np.where(self.pattern[idx], self.c1[idx], self.c2[idx])


def render_class(spec: ClassSpec, n: int, rng: np.random.Generator,
                 renditions: tuple[int, ...] = tuple(range(len(STYLES)))) -> tuple[np.ndarray, np.ndarray]:
    """``n`` samples of one class: uint8 images ``[n, 3, 32, 32]`` and their style ids ``[n]``.

    Per sample: position +-3 px, scale x0.8-1.2, rotation +-30 degrees, colour jitter, a random
    background with clutter, pixel noise, and one of ``renditions`` (ids into ``STYLES``,
    balanced over the n samples: each appears n // k or n // k + 1 times).
    """
    styles = np.asarray(renditions)[rng.permutation(np.arange(n) % len(renditions))]
    ax = np.arange(IMAGE_SIZE, dtype=np.float32) - (IMAGE_SIZE - 1) / 2
    py, px = ax[None, :, None], ax[None, None, :]  # pixel centres, image-centred

    # ---- sample pose: pixel -> object frame
    shift = _uniform(rng, -3, 3, (n, 2, 1, 1))
    scale = spec.scale_px * _uniform(rng, 0.8, 1.2, (n, 1, 1))
    rot = _uniform(rng, -np.pi / 6, np.pi / 6, (n, 1, 1))
    c, s = np.cos(rot), np.sin(rot)
    dx, dy = px - shift[:, 0], py - shift[:, 1]
    u0, v0 = (c * dx + s * dy) / scale, (-s * dx + c * dy) / scale

    # ---- parts: coverage (1 px anti-aliasing), outline, texture pattern, jittered colours
    jitter = _normal(rng, 0.06, (n, MAX_PARTS, 3, 1, 1))
    parts = []
    for k in range(spec.num_parts):
        cu, su = math.cos(spec.angle[k]), math.sin(spec.angle[k])
        du, dv = u0 - float(spec.offset[k, 0]), v0 - float(spec.offset[k, 1])
        u, v = cu * du + su * dv, -su * du + cu * dv
        a, b = (float(z) for z in spec.size[k])
        sdf = _part_sdf(int(spec.shape[k]), int(spec.sides[k]), u, v, a, b) * scale
        pattern = _texture(int(spec.texture[k]), u, v, float(spec.tex_freq[k]), float(spec.tex_angle[k]))
        parts.append(_Part(
            alpha=np.clip(0.5 - sdf, 0, 1)[:, None], edge=np.clip(1.0 - np.abs(sdf), 0, 1)[:, None],
            pattern=pattern[:, None],
            c1=np.clip(spec.color[k].astype(np.float32)[:, None, None] + jitter[:, k], 0, 1),
            c2=np.clip(spec.color2[k].astype(np.float32)[:, None, None] + jitter[:, k], 0, 1)))

    out = np.empty((n, 3, IMAGE_SIZE, IMAGE_SIZE), np.float32)
    style = {name: np.flatnonzero(styles == i) for i, name in enumerate(STYLES)}
    # photo, inverted, faded and noisy all start from the photo rendition
    on_photo = np.sort(np.concatenate([style[k] for k in ("photo", "inverted", "faded", "noisy")]))
    photo = np.empty_like(out)
    photo[on_photo] = _render_photo(rng, on_photo, parts, u0, v0, px, py)
    out[style["photo"]] = photo[style["photo"]]
    out[style["inverted"]] = 1 - photo[style["inverted"]]
    idx = style["faded"]  # an old print: 30% of the colour left, a sepia tint, washed-out contrast
    gray = np.tensordot(np.array([0.299, 0.587, 0.114], np.float32), photo[idx], axes=([0], [1]))[:, None]
    faded = (gray + 0.3 * (photo[idx] - gray)) * np.array([1.0, 0.9, 0.75], np.float32)[:, None, None]
    out[idx] = 0.2 + 0.7 * faded
    idx = style["noisy"]  # colour noise and a colour cast
    out[idx] = photo[idx] * _uniform(rng, 0.7, 1.15, (len(idx), 3, 1, 1)) + \
        _normal(rng, _uniform(rng, 0.04, 0.09, (len(idx), 1, 1, 1)), (len(idx), 3, IMAGE_SIZE, IMAGE_SIZE))
    idx = style["sketch"]  # coloured pencil on paper: each part's outline in its own colour,
    if len(idx):           # darkened, over a light wash of its fill
        img = np.broadcast_to(_uniform(rng, 0.85, 1.0, (len(idx), 3, 1, 1)), (len(idx), 3, IMAGE_SIZE, IMAGE_SIZE))
        pressure = _uniform(rng, 0.7, 1.0, (len(idx), 1, 1, 1))
        for p in parts:
            wash = 0.3 * p.alpha[idx]
            img = img * (1 - wash) + p.fill(idx) * wash
            stroke = p.edge[idx] * pressure
            img = img * (1 - stroke) + p.c1[idx] * 0.7 * stroke
        out[idx] = img + _normal(rng, 0.02, (len(idx), 3, IMAGE_SIZE, IMAGE_SIZE))
    idx = style["cartoon"]  # flat saturated fills, black outlines, pastel backdrop
    if len(idx):
        img = np.broadcast_to(0.55 + 0.45 * rng.random((len(idx), 3, 1, 1), dtype=np.float32),
                              (len(idx), 3, IMAGE_SIZE, IMAGE_SIZE))
        for p in parts:
            flat = p.c1[idx]
            mean = flat.mean(1, keepdims=True)
            img = (img * (1 - p.alpha[idx]) + np.clip((flat - mean) * 1.5 + mean, 0, 1) * p.alpha[idx]) \
                * (1 - p.edge[idx])
        out[idx] = img
    return (np.clip(out, 0, 1) * 255 + 0.5).astype(np.uint8), styles.astype(np.int8)


def _render_photo(rng: np.random.Generator, idx: np.ndarray, parts: list[_Part], u0: np.ndarray,
                  v0: np.ndarray, px: np.ndarray, py: np.ndarray) -> np.ndarray:
    """Photo-like rendition of samples ``idx``: a gradient + smooth-noise background with 0-2
    clutter blobs, the textured parts under a linear light, exposure and pixel noise."""
    n = len(idx)
    bg_a, bg_b = 0.2 + 0.6 * rng.random((2, n, 3, 1, 1), dtype=np.float32)
    g = _uniform(rng, 0, 2 * np.pi, (n, 1, 1))
    ramp = ((np.cos(g) * px + np.sin(g) * py) / IMAGE_SIZE + 0.5)[:, None]
    img = bg_a + (bg_b - bg_a) * ramp + (_smooth_noise(rng, n, 3) - 0.5) * 0.25
    for _ in range(2):
        present = rng.random((n, 1, 1), dtype=np.float32) < 0.4
        centre = _uniform(rng, -14, 14, (n, 2, 1, 1))
        radius = _uniform(rng, 1.5, 3.5, (n, 2, 1, 1))
        blob = ((px - centre[:, 0]) / radius[:, 0]) ** 2 + ((py - centre[:, 1]) / radius[:, 1]) ** 2 < 1
        img = np.where((blob & present)[:, None], rng.random((n, 3, 1, 1), dtype=np.float32), img)
    light = _normal(rng, 0.15, (n, 2, 1, 1))
    shade = (1 + light[:, 0] * u0[idx] + light[:, 1] * v0[idx])[:, None]
    for p in parts:
        img = img * (1 - p.alpha[idx]) + np.clip(p.fill(idx) * shade, 0, 1) * p.alpha[idx]
    img = img * _uniform(rng, 0.75, 1.15, (n, 1, 1, 1))  # exposure
    return np.clip(img + _normal(rng, 0.03, img.shape), 0, 1)


def generate_pool(seed: int, pool: int, num_classes: int, per_class: int,
                  split: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Images ``[C*per_class, 3, 32, 32]`` uint8, labels ``[C*per_class]`` int64 and style ids,
    class-major, in the pool's renditions (``POOL_RENDITIONS``). Deterministic in
    (``GENERATOR_VERSION``, seed, pool, class, split)."""
    images, labels, styles = [], [], []
    for c in range(num_classes):
        spec = class_spec(seed, pool, c)
        x, st = render_class(spec, per_class, _rng(GENERATOR_VERSION, seed, pool, c, 100 + split),
                             POOL_RENDITIONS[pool])
        images.append(x)
        styles.append(st)
        labels.append(np.full(per_class, c, dtype=np.int64))
    return np.concatenate(images), np.concatenate(labels), np.concatenate(styles)


# ================================================================================ the cache


def cache_root() -> Path:
    """``$CLBENCH_CACHE/synth`` (default ``~/.cache/clbench/synth``)."""
    return Path(os.environ.get("CLBENCH_CACHE", "~/.cache/clbench")).expanduser() / "synth"


def cache_dir(seed: int = DEFAULT_SEED) -> Path:
    """Where this generator version and seed keep their data and weights."""
    return cache_root() / f"v{GENERATOR_VERSION}-seed{seed}"


def _build_once(path: Path, build: Callable[[Path], None]) -> Path:
    return build_once(path, build, lambda: _log(f"waiting for another process building in {path.parent} ..."))


# ================================================================================ the CL data


_ARRAYS: dict[tuple[int, Path], dict[str, np.ndarray]] = {}


def _data_meta(seed: int) -> dict[str, int]:
    return {"version": GENERATOR_VERSION, "seed": seed, "classes": NUM_CLASSES,
            "train_per_class": TRAIN_PER_CLASS, "test_per_class": TEST_PER_CLASS}


def _build_data(path: Path, seed: int) -> None:
    start = time.perf_counter()
    _log(f"generating {NUM_CLASSES} classes x ({TRAIN_PER_CLASS} train + {TEST_PER_CLASS} test) ...")
    train_x, train_y, train_s = generate_pool(seed, _POOL_CL, NUM_CLASSES, TRAIN_PER_CLASS, _SPLIT_TRAIN)
    test_x, test_y, test_s = generate_pool(seed, _POOL_CL, NUM_CLASSES, TEST_PER_CLASS, _SPLIT_TEST)
    meta = json.dumps(_data_meta(seed))
    atomic_replace(path, lambda f: np.savez(f, train_x=train_x, train_y=train_y, train_style=train_s,
                                           test_x=test_x, test_y=test_y, test_style=test_s,
                                           meta=np.array(meta)))
    build_counts["data"] += 1
    _log(f"wrote {path} ({time.perf_counter() - start:.1f} s)")


def load_arrays(seed: int = DEFAULT_SEED) -> dict[str, np.ndarray]:
    """The CL images as numpy arrays: ``train_x``/``test_x`` uint8 ``[N, 3, 32, 32]``,
    ``train_y``/``test_y`` int64 labels in ``[0, 60)``, ``train_style``/``test_style`` ids into
    ``STYLES``. Generated once per cache and seed, memoised in the process."""
    path = cache_dir(seed) / "data.npz"
    key = (seed, path)
    if key not in _ARRAYS:
        _build_once(path, lambda p: _build_data(p, seed))
        with np.load(path) as z:
            arrays = {k: z[k] for k in z.files}
        if json.loads(str(arrays.pop("meta"))) != _data_meta(seed):
            raise RuntimeError(f"{path} was written by another generator configuration; delete it")
        _ARRAYS[key] = arrays
    return _ARRAYS[key]


class SynthImages(Dataset):
    """In-memory images: yields ``(transform(uint8 [3, 32, 32]), original label)``.

    ``targets`` are the original labels; ``styles`` the rendition of each image (``groups``
    under ``group_names``: what ``clbench probe`` reports accuracy per).
    """

    group_names = STYLES

    def __init__(self, images: np.ndarray, targets: np.ndarray, styles: np.ndarray,
                 transform: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.images = torch.from_numpy(np.ascontiguousarray(images))
        self.targets = np.asarray(targets, dtype=np.int64)
        self.styles = np.asarray(styles)
        self.transform = transform if transform is not None else ToFloat()

    @property
    def groups(self) -> np.ndarray:
        return self.styles

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.images[i]), int(self.targets[i])


def load_synth(data_dir: Path | None = None, train_transform: Callable | None = None,
               test_transform: Callable | None = None, splits_dir: Path | None = None,
               seed: int = DEFAULT_SEED) -> tuple[SynthImages, SynthImages]:
    """The benchmark's loader: ``(train, test)``. ``data_dir``/``splits_dir`` are ignored (the
    images are generated; the cache lives under ``$CLBENCH_CACHE``)."""
    a = load_arrays(seed)
    return (SynthImages(a["train_x"], a["train_y"], a["train_style"], train_transform),
            SynthImages(a["test_x"], a["test_y"], a["test_style"], test_transform))


# ================================================================================ transforms


class ToFloat:
    """uint8 ``[3, H, W]`` -> float in [0, 1], resized (bilinear) when ``size`` differs."""

    def __init__(self, size: int = IMAGE_SIZE):
        self.size = size

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float().div_(255) if x.dtype == torch.uint8 else x.float()
        if x.shape[-1] != self.size or x.shape[-2] != self.size:
            x = F.interpolate(x[None], size=(self.size, self.size), mode="bilinear",
                              align_corners=False)[0]
        return x


class RandomCropFlip(ToFloat):
    """CIFAR-style augmentation on a tensor: random crop with ``padding`` zero pixels on each
    side, random horizontal flip, then ``ToFloat``. Uses torch's global RNG."""

    def __init__(self, size: int = IMAGE_SIZE, padding: int = 4):
        super().__init__(size)
        self.padding = padding

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        p = self.padding
        h, w = x.shape[-2:]
        dy, dx = (torch.randint(0, 2 * p + 1, (2,)) - p).tolist()  # content shift
        out = torch.zeros_like(x)
        out[:, max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
            x[:, max(-dy, 0):h - max(dy, 0), max(-dx, 0):w - max(dx, 0)]
        if torch.rand(()) < 0.5:
            out = out.flip(-1)
        return super().__call__(out)


def synth_train_transform(size: int) -> Callable[[torch.Tensor], torch.Tensor]:
    return RandomCropFlip(size)


def synth_test_transform(size: int) -> Callable[[torch.Tensor], torch.Tensor]:
    return ToFloat(size)


def _crop_flip_batch(x: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    """``RandomCropFlip`` for a float batch ``[B, 3, H, W]`` at once (pretraining speed)."""
    b, _, h, w = x.shape
    padded = F.pad(x, (padding,) * 4)
    oy = torch.randint(0, 2 * padding + 1, (b,), generator=generator)
    ox = torch.randint(0, 2 * padding + 1, (b,), generator=generator)
    rows = (oy[:, None] + torch.arange(h))[:, None, :, None]
    cols = (ox[:, None] + torch.arange(w))[:, None, None, :]
    out = padded[torch.arange(b)[:, None, None, None], torch.arange(3)[None, :, None, None], rows, cols]
    flip = torch.rand(b, generator=generator) < 0.5
    out[flip] = out[flip].flip(-1)
    return out


# ================================================================================ the backbone

default_cfgs = {
    MODEL_NAME: {
        "url": "", "num_classes": 0, "input_size": (3, IMAGE_SIZE, IMAGE_SIZE), "pool_size": None,
        "crop_pct": 1.0, "interpolation": "bilinear", "fixed_input_size": True,
        # pretrained on [0, 1] inputs, like the official repositories feed theirs
        "mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0),
        "first_conv": "patch_embed.proj", "classifier": "head",
        "license": "generated", "description": "pretrained offline on benchmarks/synth.py's pool",
    },
}

# patch_size is in the stem's 8x8 feature map: 2x2 features = one 8x8-pixel patch, 16 tokens.
MODEL_ARGS = dict(img_size=IMAGE_SIZE, patch_size=2, embed_dim=96, depth=6, num_heads=4, mlp_ratio=2.0,
                  class_token=True, global_pool="token")
STEM_WIDTH = 24


def conv_stem(batch_norm: bool = False) -> nn.Sequential:
    """32x32x3 -> 8x8x48: two 3x3 stride-2 convolutions with GELU ("early convolutions", Xiao
    et al. 2021). ``batch_norm`` is for pretraining only: without it a ViT this small finds no
    signal in this data for thousands of steps; it is folded into the convolutions afterwards."""
    def norm(c: int) -> nn.Module:
        return nn.BatchNorm2d(c) if batch_norm else nn.Identity()

    w = STEM_WIDTH
    return nn.Sequential(nn.Conv2d(3, w, 3, 2, 1), norm(w), nn.GELU(),
                         nn.Conv2d(w, 2 * w, 3, 2, 1), norm(2 * w), nn.GELU())


@torch.no_grad()
def fold_stem_batch_norm(model: VisionTransformer) -> VisionTransformer:
    """Fold the stem's BatchNorms (running statistics) into the convolutions before them, in
    place: the same function in eval mode, and no batch statistics left in the backbone."""
    stem = model.patch_embed.backbone
    for i, layer in enumerate(stem):
        if isinstance(layer, nn.BatchNorm2d):
            conv = stem[i - 1]
            scale = layer.weight / torch.sqrt(layer.running_var + layer.eps)
            conv.weight.mul_(scale[:, None, None, None])
            conv.bias.copy_((conv.bias - layer.running_mean) * scale + layer.bias)
            stem[i] = nn.Identity()
    return model


@register_model
def vit_synth_patch8_32(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """ViT for 32x32 inputs: a convolutional stem, then 8x8-pixel patches (16 tokens + [CLS]),
    width 96, depth 6, 4 heads, MLP ratio 2, final-norm [CLS] feature (about 0.5 M parameters).
    ``pretrained=True`` loads (building if needed) the cached synth weights."""
    stem_batch_norm = kwargs.pop("stem_batch_norm", False)
    if pretrained:
        overlay = dict(kwargs.pop("pretrained_cfg_overlay", None) or {})
        overlay["file"] = str(pretrained_weights())
        kwargs["pretrained_cfg_overlay"] = overlay
    args = {**MODEL_ARGS, "embed_layer": partial(HybridEmbed, backbone=conv_stem(stem_batch_norm)), **kwargs}
    model = build_model_with_cfg(VisionTransformer, MODEL_NAME, pretrained, **args)
    for block in model.blocks:
        # 17 tokens: plain attention is faster on CPU than the fused SDPA kernel (same math)
        block.attn.fused_attn = False
    return model


@dataclass(frozen=True)
class PretrainConfig:
    """Supervised pretraining on the pretraining pool. Non-default values go into the weights'
    file name, so a quick test build never stands in for the real one."""

    classes: int = PRETRAIN_CLASSES
    images_per_class: int = 128
    epochs: int = 6
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.05
    label_smoothing: float = 0.1
    warmup_steps: int = 100
    # Deep supervision: a linear head on the mean patch embedding gives the stem a short
    # gradient path. Without it this ViT stays at chance for the whole budget (on the first
    # version of this data: train accuracy 2% after 4 epochs, 37% after 6 with it).
    aux_weight: float = 1.0

    def file_name(self) -> str:
        """The recipe's digest is in the name, so changed pretraining never reads stale weights."""
        digest = hashlib.sha1(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:8]
        return f"{MODEL_NAME}-{digest}.safetensors"


def pretrain(seed: int = DEFAULT_SEED, config: PretrainConfig = PretrainConfig()) -> tuple[VisionTransformer, dict]:
    """Train the backbone from scratch on the pretraining pool; returns it (``num_classes=0``)
    and a summary. AdamW, warmup then cosine, label smoothing, crop+flip augmentation."""
    start = time.perf_counter()
    _log(f"generating the pretraining pool: {config.classes} classes x {config.images_per_class} ...")
    x_np, y_np, _ = generate_pool(seed, _POOL_PRETRAIN, config.classes, config.images_per_class,
                                  _SPLIT_PRETRAIN)
    x, y = torch.from_numpy(x_np), torch.from_numpy(y_np)
    gen_s = time.perf_counter() - start

    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = vit_synth_patch8_32(num_classes=config.classes, stem_batch_norm=True)
    aux_head = nn.Linear(model.embed_dim, config.classes)
    patches: dict[str, torch.Tensor] = {}
    hook = model.patch_embed.register_forward_hook(lambda mod, inp, out: patches.__setitem__("out", out))
    opt = torch.optim.AdamW([*model.parameters(), *aux_head.parameters()], lr=config.lr,
                            weight_decay=config.weight_decay)
    steps_per_epoch = math.ceil(len(y) / config.batch_size)
    total = steps_per_epoch * config.epochs
    warmup = min(config.warmup_steps, total // 4)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warmup if s < warmup else
        0.5 * (1 + math.cos(math.pi * (s - warmup) / max(total - warmup, 1))))
    model.train()
    for epoch in range(config.epochs):
        perm = torch.randperm(len(y), generator=generator)
        seen = correct = 0
        loss_sum = 0.0
        for i in range(steps_per_epoch):
            idx = perm[i * config.batch_size:(i + 1) * config.batch_size]
            xb = _crop_flip_batch(x[idx].float().div_(255), 4, generator)
            logits = model(xb)
            loss = F.cross_entropy(logits, y[idx], label_smoothing=config.label_smoothing)
            if config.aux_weight:
                aux_logits = aux_head(patches["out"].mean(1))
                loss = loss + config.aux_weight * F.cross_entropy(aux_logits, y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            seen += len(idx)
            correct += int((logits.argmax(1) == y[idx]).sum())
            loss_sum += float(loss.detach()) * len(idx)
        _log(f"pretraining epoch {epoch + 1}/{config.epochs}: loss {loss_sum / seen:.3f}, "
             f"train acc {correct / seen:.3f} ({time.perf_counter() - start:.0f} s)")
    hook.remove()
    model.reset_classifier(0)
    fold_stem_batch_norm(model.eval())
    summary = {"train_acc_last_epoch": correct / seen, "generation_s": round(gen_s, 2),
               "total_s": round(time.perf_counter() - start, 2)}
    return model, summary


def _build_weights(path: Path, seed: int, config: PretrainConfig) -> None:
    from safetensors.torch import save

    threads = torch.get_num_threads()
    # A float sum's order depends on the thread count, and pretraining's trajectory on those
    # last bits: pinned, the weights are the same in a serial sweep, a --jobs worker or a test.
    torch.set_num_threads(PRETRAIN_THREADS)
    try:
        with torch.random.fork_rng():  # built on first use inside a run: leave that run's RNG as seeded
            model, summary = pretrain(seed, config)
    finally:
        torch.set_num_threads(threads)
    metadata = {"generator_version": str(GENERATOR_VERSION), "seed": str(seed), "model": MODEL_NAME,
                "pretrain_config": json.dumps(asdict(config)), "summary": json.dumps(summary)}
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    blob = save(state, metadata=metadata)
    atomic_replace(path, lambda f: f.write(blob))
    build_counts["weights"] += 1
    _log(f"wrote {path}")


def pretrained_weights(seed: int = DEFAULT_SEED, config: PretrainConfig = PretrainConfig()) -> Path:
    """Path of the pretrained backbone's safetensors (``num_classes=0`` state dict), building
    it first if this cache does not have it yet (about 2 minutes on two CPU cores)."""
    path = cache_dir(seed) / config.file_name()
    return _build_once(path, lambda p: _build_weights(p, seed, config))


register_pretrained_builder(MODEL_NAME, pretrained_weights)
