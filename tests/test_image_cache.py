"""The uint8 image cache (benchmarks/image_cache.py) against the JPEG path it replaces."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder

from clbench import record
from clbench.benchmarks import image_cache
from clbench.benchmarks.base import BENCHMARKS, Benchmark, register_benchmark
from clbench.benchmarks.image_cache import (
    CachedImages,
    DeviceAugment,
    DeviceBatches,
    ImageCache,
    SourceImage,
    ToSource,
    center_crop_boxes,
    crop_resize,
    random_resized_crop_boxes,
)
from clbench.errors import DataError
from clbench.protocol import Run
from clbench.recipes import resolve_config

SIZE = 16  # training resolution of the test benchmark (the toy ViT's input)
SOURCE = image_cache.default_source_size(SIZE)  # 18
CLASSES = 4
# (height, width): landscape, portrait, square, a panorama wider than the crop's 4/3 ratio
SHAPES = [(30, 41), (44, 25), (20, 20), (17, 60), (33, 33), (26, 35)]


def smooth_image(rng: np.random.RandomState, h: int, w: int) -> Image.Image:
    """Low-frequency colour fields: resampling differences stay small, geometry errors do not."""
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    channels = [np.sin(rng.uniform(1, 4) * xx + rng.uniform(0, 6)) * np.cos(rng.uniform(1, 4) * yy)
                for _ in range(3)]
    return Image.fromarray(((np.stack(channels, -1) + 1) * 127.5).astype(np.uint8))


def write_jpegs(root, per_class: int, seed: int) -> None:
    rng = np.random.RandomState(seed)
    for c in range(CLASSES):
        folder = root / f"class{c}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            h, w = SHAPES[(c + i) % len(SHAPES)]
            smooth_image(rng, h, w).save(folder / f"{i}.jpg", quality=90)


def load_jpeg_folders(data_dir, train_tf, test_tf, splits_dir):
    train, test = ImageFolder(str(data_dir / "train"), train_tf), ImageFolder(str(data_dir / "test"), test_tf)
    train.provenance = test.provenance = f"test JPEG folders in {data_dir}"
    return train, test


if "jpegs" not in BENCHMARKS:
    register_benchmark(Benchmark(
        name="jpegs", title="JPEG files", num_classes=CLASSES, default_tasks=[2], load=load_jpeg_folders,
        folder="jpegs", image_size=SIZE,
        defaults={"backbone": {"name": "vit_toy_patch4_16", "pretrained": False},
                  "train": {"num_workers": 0, "epochs": 1, "batch_size": 4, "lr": 0.003}}))


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_jpegs(root / "jpegs" / "train", per_class=5, seed=0)
    write_jpegs(root / "jpegs" / "test", per_class=3, seed=1)
    return root


def jpeg_datasets(data_root):
    bench = BENCHMARKS["jpegs"]
    train_tf, test_tf = bench.transforms()
    return load_jpeg_folders(data_root / "jpegs", ToSource(SOURCE), test_tf, None), test_tf


def build_cache(data_root, tmp_path):
    (train, test), test_tf = jpeg_datasets(data_root)
    return image_cache.cached_datasets(BENCHMARKS["jpegs"], train, test, SIZE, test_tf, None,
                                       data_root / "jpegs", tmp_path / "fallback", workers=0)


# ------------------------------------------------------------------------------ cache == JPEG path


def test_cached_sources_are_the_decoded_jpegs_byte_for_byte(data_root, tmp_path):
    cached_train, _, _ = build_cache(data_root, tmp_path)
    (jpeg_train, _), _ = jpeg_datasets(data_root)
    assert len(cached_train) == len(jpeg_train) == 20
    np.testing.assert_array_equal(cached_train.targets, jpeg_train.targets)
    for i in range(len(jpeg_train)):
        (cached, label), (decoded, jpeg_label) = cached_train[i], jpeg_train[i]
        assert isinstance(cached, SourceImage) and label == jpeg_label
        assert cached.pixels.dtype == torch.uint8 and cached.pixels.shape == (3, SOURCE, SOURCE)
        assert torch.equal(cached.pixels, decoded.pixels)
        with Image.open(jpeg_train.samples[i][0]) as f:
            assert cached.size.tolist() == [f.height, f.width]


def test_cache_and_jpeg_path_give_identical_training_batches_for_the_same_seed(data_root, tmp_path):
    cached_train, _, augment = build_cache(data_root, tmp_path)
    (jpeg_train, _), _ = jpeg_datasets(data_root)

    def batches(dataset, seed, train=True):
        loader = DataLoader(dataset, batch_size=6, shuffle=True, generator=torch.Generator().manual_seed(seed))
        return [(x, y) for _ in range(2) for x, y in DeviceBatches(loader, augment, torch.device("cpu"), train, seed)]

    cached, jpeg = batches(cached_train, 7), batches(jpeg_train, 7)
    assert len(cached) == 8
    for (xc, yc), (xj, yj) in zip(cached, jpeg):
        assert xc.shape[1:] == (3, SIZE, SIZE) and xc.dtype == torch.float32
        assert torch.equal(xc, xj) and torch.equal(yc, yj)
        assert 0 <= xc.min() and xc.max() <= 1
    assert not torch.equal(cached[0][0], cached[4][0])  # the second epoch draws new crops
    other = batches(cached_train, 8)
    assert not torch.equal(cached[0][0], other[0][0])  # another seed, other crops
    for (xc, _), (xj, _) in zip(batches(cached_train, 7, train=False), batches(jpeg_train, 7, train=False)):
        assert torch.equal(xc, xj)


def test_cached_test_images_are_the_jpeg_test_transform_exactly(data_root, tmp_path):
    _, cached_test, _ = build_cache(data_root, tmp_path)
    (_, jpeg_test), _ = jpeg_datasets(data_root)
    assert len(cached_test) == len(jpeg_test) == 12
    for i in range(len(jpeg_test)):
        (u8, label), (expected, jpeg_label) = cached_test[i], jpeg_test[i]
        assert u8.dtype == torch.uint8 and label == jpeg_label
        assert torch.equal(u8.float().div(255), expected)  # the protocol's Inputs do exactly this


def test_protocol_feeds_the_same_test_tensors_with_and_without_the_cache(data_root, results_root):
    def test_tensors(cache: bool):
        cfg = resolve_config("jpegs", 2, "full_ft", 0, overrides={"data": {"image_cache": cache}})
        cfg.data.root = str(data_root)
        run = Run(cfg, results_root, progress=False)
        run.prepare()
        return [run.inputs(x) for x, _ in run.loader(run.scenario.test, 5, False, False, None)]

    plain, cached = test_tensors(False), test_tensors(True)
    assert len(plain) == len(cached) == 3
    for a, b in zip(plain, cached):
        assert torch.equal(a, b)


def test_plain_view_crops_like_the_test_transform(data_root, tmp_path):
    """Un-augmented training images (methods' statistics passes) come from the sources with the
    test transform's geometry; only the resampling differs from the JPEG test transform."""
    cached_train, _, augment = build_cache(data_root, tmp_path)
    (jpeg_train, _), test_tf = jpeg_datasets(data_root)
    jpeg_train.transform = test_tf
    x, _ = next(iter(DeviceBatches(DataLoader(cached_train, batch_size=20), augment, torch.device("cpu"),
                                   train=False, seed=None)))
    expected = torch.stack([jpeg_train[i][0] for i in range(20)])
    assert (x - expected).abs().mean() < 0.02
    shifted = torch.roll(expected, shifts=3, dims=-1)  # a box off by 3 of 16 pixels is clearly worse
    assert (x - shifted).abs().mean() > 2 * (x - expected).abs().mean()


def test_full_run_with_the_cache_repeats_exactly_with_workers_and_reuses_the_cache(data_root, results_root, tmp_path, monkeypatch):
    from clbench.cli import main

    builds = []
    real_build = ImageCache._build
    monkeypatch.setattr(ImageCache, "_build", lambda self, *a, **k: (builds.append(a[2]), real_build(self, *a, **k)))
    args = ["--bench", "jpegs", "--methods", "full_ft", "--seeds", "0", "--no-progress", "--data-root", str(data_root),
            "--set", "data.image_cache=true"]
    assert main(args) == 0
    assert len(builds) <= 2 and len(set(builds)) == len(builds)  # each split decoded at most once
    # Crops are drawn on the device from seeded generators: worker processes change nothing.
    assert main(args + ["--out", str(tmp_path / "again"), "--set", "train.num_workers=2"]) == 0
    assert len(builds) <= 2  # the second run reads what the first one (or an earlier test) wrote
    first = record.read_result(next((results_root / "runs").rglob("*.json")))
    again = record.read_result(next((tmp_path / "again" / "runs").rglob("*.json")))
    assert first.config["data"]["image_cache"] is True
    assert first.accuracy_matrix == again.accuracy_matrix
    assert sum(first.accuracy_matrix["total"][-1]) == 12


# ------------------------------------------------------------------------------ the device augmentation


def test_random_resized_crop_boxes_follow_torchvision_ranges():
    size = torch.tensor([[300, 400]] * 2000)
    boxes = random_resized_crop_boxes(size, torch.Generator().manual_seed(0))
    left, top, w, h = boxes.unbind(1)
    assert (left >= 0).all() and (top >= 0).all() and (left + w <= 1 + 1e-6).all() and (top + h <= 1 + 1e-6).all()
    area = w * h  # as a fraction of the image
    aspect = (w * 400) / (h * 300)  # in pixels
    assert area.min() >= 0.05 - 1e-6 and area.max() <= 1 + 1e-6
    assert aspect.min() >= 3 / 4 - 1e-5 and aspect.max() <= 4 / 3 + 1e-5
    # the same distribution as torchvision's (rejection of boxes that do not fit trims large crops)
    from torchvision.transforms import RandomResizedCrop

    torch.manual_seed(0)
    reference = torch.tensor([math.prod(RandomResizedCrop.get_params(torch.zeros(3, 300, 400), (0.05, 1.0),
                                                                     (3 / 4, 4 / 3))[2:]) / 120000
                              for _ in range(2000)])
    assert float(area.mean()) == pytest.approx(float(reference.mean()), abs=0.02)
    assert float(area.median()) == pytest.approx(float(reference.median()), abs=0.03)
    assert math.log(aspect.max() / aspect.min()) > 0.5  # the whole ratio range is drawn
    # positions are uniform over where the box fits: the centres span the image
    assert (left + w / 2).min() < 0.15 and (left + w / 2).max() > 0.85


def test_random_resized_crop_falls_back_to_a_clamped_centre_crop():
    # a 10 x 60 panorama: no draw of >= 90% area with ratio 1 fits, so torchvision's fallback
    boxes = random_resized_crop_boxes(torch.tensor([[10, 60]]), torch.Generator().manual_seed(0),
                                      scale=(0.9, 1.0), ratio=(1.0, 1.0))
    left, top, w, h = boxes[0].tolist()
    assert (w * 60, h * 10) == pytest.approx((10, 10))  # ratio clamped to 1: a 10 x 10 square
    assert (left, top) == pytest.approx((25 / 60, 0))  # centred


def test_crop_resize_full_box_is_identity_and_flip_mirrors():
    pixels = torch.randint(0, 256, (2, 3, 12, 12), dtype=torch.uint8)
    full = torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 2)
    out = crop_resize(pixels, full, 12)
    assert torch.allclose(out, pixels.float() / 255, atol=1e-5)
    mirrored = crop_resize(pixels, full, 12, flip=torch.tensor([True, False]))
    assert torch.allclose(mirrored[0], out[0].flip(-1), atol=1e-5) and torch.allclose(mirrored[1], out[1], atol=1e-5)
    # the left half of the image, upsampled: its first column is the image's first column
    half = crop_resize(pixels, torch.tensor([[0.0, 0.0, 0.5, 1.0]] * 2), 12)
    assert torch.allclose(half[..., 0], out[..., 0], atol=1 / 255)


def test_centre_crop_box_is_resize_then_centre_crop():
    box = center_crop_boxes(torch.tensor([[300, 400]]), 224 / 256)[0].tolist()
    # Resize(256) makes it 256 x 341.33; a 224 crop is 224/341.33 of the width, all but 32 rows
    assert box[2:] == pytest.approx([224 / (400 * 256 / 300), 224 / 256])
    assert box[0] + box[2] / 2 == pytest.approx(0.5) and box[1] + box[3] / 2 == pytest.approx(0.5)


@pytest.mark.gpu
def test_device_augmentation_runs_on_cuda_like_on_cpu():
    pixels = torch.randint(0, 256, (8, 3, 40, 40), dtype=torch.uint8)
    size = torch.tensor([[30, 50]] * 8)
    augment = DeviceAugment(32)
    on_cpu = augment(SourceImage(pixels, size), train=False)
    on_gpu = augment(SourceImage(pixels.cuda(), size.cuda()), train=False)
    assert torch.allclose(on_cpu, on_gpu.cpu(), atol=1e-5)
    batch, generator = SourceImage(pixels.cuda(), size.cuda()), torch.Generator(device="cuda").manual_seed(0)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # drawing crops must not wait on the device
    try:
        augment(batch, train=True, generator=generator)
    finally:
        torch.cuda.set_sync_debug_mode("default")


# ------------------------------------------------------------------------------ where and when it refuses


def test_read_only_data_dir_puts_the_cache_under_the_results(data_root, tmp_path, monkeypatch):
    data_cache = data_root / "jpegs" / image_cache.CACHE_FOLDER
    real_writable = image_cache._writable
    monkeypatch.setattr(image_cache, "_writable", lambda folder: folder != data_cache and real_writable(folder))
    monkeypatch.setattr(image_cache, "CACHE_FOLDER", ".another_cache")  # nothing prebuilt next to the data
    data_cache = data_root / "jpegs" / ".another_cache"
    train, test, _ = build_cache(data_root, tmp_path)
    assert train.pixels_path.parent == tmp_path / "fallback" and test.pixels_path.parent == tmp_path / "fallback"
    assert not data_cache.exists() or not any(data_cache.glob("*.npy"))


def test_a_benchmark_with_its_own_train_transform_is_refused(data_root, tmp_path):
    (train, test), test_tf = jpeg_datasets(data_root)
    custom = Benchmark(name="custom", title="Custom", num_classes=CLASSES, default_tasks=[2], load=load_jpeg_folders,
                       folder="jpegs", image_size=SIZE, train_transform=lambda size: (lambda x: x))
    with pytest.raises(DataError, match="has its own train transform"):
        image_cache.cached_datasets(custom, train, test, SIZE, test_tf, None, data_root, tmp_path)
    with pytest.raises(DataError, match="below the training resolution"):
        image_cache.cached_datasets(BENCHMARKS["jpegs"], train, test, SIZE, test_tf, SIZE - 1, data_root, tmp_path)


def test_a_test_transform_that_is_not_8_bit_is_refused(data_root, tmp_path):
    (train, test), test_tf = jpeg_datasets(data_root)

    def normalised(image):
        return test_tf(image) * 0.5 + 0.25

    with pytest.raises(DataError, match="not an 8-bit image"):
        image_cache.cached_datasets(BENCHMARKS["jpegs"], train, test, SIZE, normalised, None,
                                    tmp_path / "data", tmp_path / "fallback", workers=0)


def test_cached_images_pickle_without_their_pages(data_root, tmp_path):
    import pickle

    train, _, _ = build_cache(data_root, tmp_path)
    _ = train[0]  # opens the map
    clone = pickle.loads(pickle.dumps(train))  # what a DataLoader worker receives
    assert isinstance(clone, CachedImages) and clone._pixels is None
    assert torch.equal(clone[3][0].pixels, train[3][0].pixels)
