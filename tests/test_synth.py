"""The synthetic benchmark: deterministic generation, disjoint pools and splits, the registered
benchmark and its transforms, the ViT's contract, and the cache (reuse, concurrent builders).

Tests that build write into a temporary ``CLBENCH_CACHE`` with a tiny pretraining config; the
one test that needs the real pretrained backbone shares the default cache (built once, ever).
"""
from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

from clbench.backbones import create_backbone
from clbench.benchmarks import get_benchmark
from clbench.benchmarks import synth as S
from clbench.config import BackboneConfig

ROOT = Path(__file__).resolve().parent.parent
TINY = S.PretrainConfig(classes=4, images_per_class=8, epochs=1, batch_size=16, warmup_steps=1)


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch) -> Path:
    """A private, empty ``CLBENCH_CACHE`` for tests that build."""
    monkeypatch.setenv("CLBENCH_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="session")
def pretrained_backbone() -> torch.nn.Module:
    """The real pretrained backbone from the default cache (built there once if missing)."""
    model, _ = create_backbone(BackboneConfig(name=S.MODEL_NAME, pretrained=True))
    return model.eval()


# ---------------------------------------------------------------------------------- generator


def test_generation_is_deterministic_per_seed():
    a = S.generate_pool(0, S._POOL_CL, 3, 12, S._SPLIT_TRAIN)
    b = S.generate_pool(0, S._POOL_CL, 3, 12, S._SPLIT_TRAIN)
    c = S.generate_pool(1, S._POOL_CL, 3, 12, S._SPLIT_TRAIN)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a[0], c[0])


def test_the_pretraining_pool_is_photos_of_other_objects():
    _, _, styles = S.generate_pool(0, S._POOL_PRETRAIN, 3, 12, S._SPLIT_PRETRAIN)
    assert set(styles.tolist()) == {S.STYLES.index("photo")}


def test_a_class_does_not_depend_on_how_many_are_generated():
    two = S.generate_pool(0, S._POOL_CL, 2, 6, S._SPLIT_TEST)[0]
    three = S.generate_pool(0, S._POOL_CL, 3, 6, S._SPLIT_TEST)[0]
    np.testing.assert_array_equal(two, three[: len(two)])


def test_pretraining_classes_are_other_objects_than_the_cl_classes():
    cl = np.stack([S.class_spec(0, S._POOL_CL, c).as_vector() for c in range(S.NUM_CLASSES)])
    pre = [S.class_spec(0, S._POOL_PRETRAIN, c) for c in range(S.PRETRAIN_CLASSES)]
    pre = np.stack([spec.as_vector() for spec in pre if len(spec.as_vector()) == cl.shape[1]])
    assert len(pre) == S.PRETRAIN_CLASSES
    # no pretraining class repeats a CL class, and no two CL classes coincide
    gap = np.abs(cl[:, None] - pre[None]).max(-1)
    assert gap.min() > 1e-3
    within = np.abs(cl[:, None] - cl[None]).max(-1) + np.eye(len(cl))
    assert within.min() > 1e-3


def test_cl_arrays_shapes_ranges_and_disjoint_splits(tmp_cache):
    a = S.load_arrays()
    n_train, n_test = S.NUM_CLASSES * S.TRAIN_PER_CLASS, S.NUM_CLASSES * S.TEST_PER_CLASS
    assert a["train_x"].shape == (n_train, 3, 32, 32) and a["train_x"].dtype == np.uint8
    assert a["test_x"].shape == (n_test, 3, 32, 32) and a["test_x"].dtype == np.uint8
    assert np.bincount(a["train_y"]).tolist() == [S.TRAIN_PER_CLASS] * S.NUM_CLASSES
    assert np.bincount(a["test_y"]).tolist() == [S.TEST_PER_CLASS] * S.NUM_CLASSES
    # images use the whole range, and every class is drawn in every rendition but photo, equally
    # often, in both splits (as ImageNet-R holds renditions of ImageNet's classes, no photos)
    assert a["train_x"].min() == 0 and a["train_x"].max() == 255
    renditions = S.POOL_RENDITIONS[S._POOL_CL]
    assert S.STYLES.index("photo") not in renditions and len(renditions) == len(S.STYLES) - 1
    for split, per_class in (("train", S.TRAIN_PER_CLASS), ("test", S.TEST_PER_CLASS)):
        pairs = Counter(zip(a[f"{split}_y"].tolist(), a[f"{split}_style"].tolist()))
        assert set(pairs.values()) == {per_class // len(renditions)}, split
        assert len(pairs) == S.NUM_CLASSES * len(renditions), split
    # train and test are different images
    train = {x.tobytes() for x in a["train_x"]}
    assert not any(x.tobytes() in train for x in a["test_x"])
    assert len(train) == n_train


# ---------------------------------------------------------------------------------- benchmark


def test_benchmark_is_registered_with_its_backbone():
    bench = get_benchmark("synth")
    assert bench.num_classes == 200 and bench.image_size == 32 and bench.default_tasks == [10]
    assert all(200 % n == 0 for n in (5, 10, 20))
    assert bench.defaults["backbone"] == {"name": S.MODEL_NAME, "pretrained": True}
    assert bench.source.startswith("built in")


def test_loader_returns_datasets_with_targets(tmp_cache):
    bench = get_benchmark("synth")
    train_tf, test_tf = bench.transforms()
    train, test = bench.load(Path("/nonexistent"), train_tf, test_tf, Path("/nonexistent"))
    assert len(train) == S.NUM_CLASSES * S.TRAIN_PER_CLASS and len(test) == S.NUM_CLASSES * S.TEST_PER_CLASS
    assert np.asarray(train.targets).shape == (len(train),)
    assert set(np.asarray(test.targets).tolist()) == set(range(S.NUM_CLASSES))
    x, y = test[5]
    assert x.dtype == torch.float32 and x.shape == (3, 32, 32) and 0 <= x.min() <= x.max() <= 1
    assert isinstance(y, int) and y == test.targets[5]
    torch.testing.assert_close(x, torch.from_numpy(S.load_arrays()["test_x"][5]).float() / 255)
    x, _ = train[0]
    assert x.dtype == torch.float32 and x.shape == (3, 32, 32) and 0 <= x.min() <= x.max() <= 1
    assert hasattr(train, "transform")  # the protocol swaps it for the un-augmented pass


def test_train_transform_crops_flips_and_pickles():
    bench = get_benchmark("synth")
    train_tf, test_tf = bench.transforms()
    for tf in (train_tf, test_tf):
        assert type(pickle.loads(pickle.dumps(tf))) is type(tf)
    x = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    torch.manual_seed(0)
    outs = [train_tf(x) for _ in range(64)]
    assert all(o.dtype == torch.float32 and o.shape == (3, 32, 32) for o in outs)
    assert all(0 <= o.min() and o.max() <= 1 for o in outs)
    assert len({o.numpy().tobytes() for o in outs}) > 10  # random crops and flips differ
    # each output is x shifted by at most 4 px (zero fill), possibly mirrored
    ref = torch.nn.functional.pad(x.float() / 255, (4, 4, 4, 4))
    windows = {ref[:, i:i + 32, j:j + 32].numpy().tobytes() for i in range(9) for j in range(9)}
    windows |= {ref[:, i:i + 32, j:j + 32].flip(-1).numpy().tobytes() for i in range(9) for j in range(9)}
    assert all(o.numpy().tobytes() in windows for o in outs)
    torch.testing.assert_close(test_tf(x), x.float() / 255)


# ---------------------------------------------------------------------------------- backbone


def test_vit_contract():
    model = timm.create_model(S.MODEL_NAME, pretrained=False, num_classes=0)
    assert model.num_features == model.embed_dim == 96
    assert len(model.blocks) >= 6 and model.blocks[0].attn.num_heads == 4
    assert model.cls_token is not None and model.global_pool == "token"
    assert model.blocks[0].attn.qkv.out_features == 3 * 96  # fused qkv
    x = torch.rand(2, 3, 32, 32)
    assert model.forward_features(x).shape == (2, 1 + 16, 96)  # [CLS] + one token per 8x8 patch
    out = model(x)
    assert out.shape == (2, 96)
    torch.testing.assert_close(out, model.forward_features(x)[:, 0])  # the final-normed [CLS]
    # no batch statistics anywhere: one image's feature does not depend on the batch
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    model.train()
    torch.testing.assert_close(model(x)[:1], model(x[:1]))


def test_folding_the_stem_batch_norm_keeps_the_function():
    torch.manual_seed(0)
    model = S.vit_synth_patch8_32(num_classes=0, stem_batch_norm=True)
    with torch.no_grad():
        for _ in range(3):  # non-trivial running statistics
            model(torch.rand(16, 3, 32, 32) * 2)
    model.eval()
    x = torch.rand(4, 3, 32, 32)
    before = model(x)
    S.fold_stem_batch_norm(model)
    torch.testing.assert_close(model(x), before, atol=1e-5, rtol=1e-4)
    plain = timm.create_model(S.MODEL_NAME, num_classes=0)
    assert set(model.state_dict()) == set(plain.state_dict())  # loads into the plain backbone


def test_pretrained_cfg_says_inputs_are_not_normalised():
    model = timm.create_model(S.MODEL_NAME, num_classes=0)
    assert model.pretrained_cfg["mean"] == (0.0, 0.0, 0.0) and model.pretrained_cfg["std"] == (1.0, 1.0, 1.0)


# ---------------------------------------------------------------------------------- cache


def test_cache_is_reused_not_rebuilt(tmp_cache):
    before = dict(S.build_counts)
    path = S.pretrained_weights(config=TINY)
    assert path.parent == S.cache_dir(S.DEFAULT_SEED) and str(path).startswith(str(tmp_cache))
    assert path.name != S.PretrainConfig().file_name()  # a test config never poses as the real one
    mtime = path.stat().st_mtime_ns
    assert S.pretrained_weights(config=TINY) == path
    assert S.build_counts["weights"] == before.get("weights", 0) + 1
    assert path.stat().st_mtime_ns == mtime

    S.load_arrays()
    S._ARRAYS.clear()  # forget the in-process copy: the second load must come from disk
    S.load_arrays()
    assert S.build_counts["data"] == before.get("data", 0) + 1
    # the atomic writes leave only the artefacts and their lock files
    names = sorted(p.name for p in path.parent.iterdir())
    assert names == sorted([".data.npz.lock", "data.npz", f".{path.name}.lock", path.name])


def test_weights_load_into_the_model_through_the_harness(tmp_cache):
    path = S.pretrained_weights(config=TINY)
    model, weights_id = create_backbone(BackboneConfig(name=S.MODEL_NAME, pretrained_path=str(path)))
    assert str(path) in weights_id
    from safetensors.torch import load_file

    state = load_file(str(path))
    assert not any(k.startswith("head.") for k in state)
    torch.testing.assert_close(model.cls_token, state["cls_token"])


_WORKER = """
import json, sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from clbench.benchmarks import synth as S
config = S.PretrainConfig(**json.loads(sys.argv[2]))
Path(sys.argv[3]).touch()
while not Path(sys.argv[4]).exists():  # start together
    time.sleep(0.002)
path = S.pretrained_weights(config=config)
print(json.dumps({"built": S.build_counts["weights"], "path": str(path)}))
"""


def test_building_the_weights_leaves_the_callers_rng_alone(tmp_cache):
    """The first run in a fresh cache builds the backbone after seeding; it must then draw the
    same random numbers (head init, shuffling) as every later run, which finds it cached."""
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    S.pretrained_weights(config=TINY)
    assert S.build_counts["weights"] and torch.equal(torch.rand(3), expected)


def test_concurrent_builders_build_once(tmp_cache, tmp_path):
    go = tmp_path / "go"
    env = {**os.environ, "CLBENCH_CACHE": str(tmp_cache), "OMP_NUM_THREADS": "1"}
    procs, ready = [], []
    for i in range(2):
        ready.append(tmp_path / f"ready{i}")
        procs.append(subprocess.Popen(
            [sys.executable, "-c", _WORKER, str(ROOT), json.dumps(asdict(TINY)), str(ready[-1]), str(go)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    deadline = time.monotonic() + 300
    while not all(r.exists() for r in ready):
        assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
        assert time.monotonic() < deadline, "workers did not start"
        time.sleep(0.01)
    go.touch()
    outs = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=300)
        assert p.returncode == 0, stderr
        outs.append(json.loads(stdout.strip().splitlines()[-1]))
    assert sorted(o["built"] for o in outs) == [0, 1]  # exactly one built, the other loaded
    assert outs[0]["path"] == outs[1]["path"]
    from safetensors.torch import load_file

    assert "cls_token" in load_file(outs[0]["path"])


# ---------------------------------------------------------------------------------- pretrained


@pytest.mark.slow
def test_pretrained_features_separate_the_cl_classes(pretrained_backbone):
    """Nearest class mean on frozen [CLS] features (a weak probe) is far above chance (1/200):
    8.45% (Euclidean; cosine, SimpleCIL's, 8.50%) on renditions the backbone never saw in
    pretraining, where a linear probe on the same features reaches about 31% (``clbench probe``)."""
    a = S.load_arrays()
    with torch.no_grad():
        train = pretrained_backbone(torch.from_numpy(a["train_x"]).float() / 255)
        test = pretrained_backbone(torch.from_numpy(a["test_x"]).float() / 255)
    means = torch.stack([train[torch.from_numpy(a["train_y"] == c)].mean(0) for c in range(S.NUM_CLASSES)])
    pred = torch.cdist(test, means).argmin(1).numpy()
    assert (pred == a["test_y"]).mean() > 0.05
