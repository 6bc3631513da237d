"""The same seed gives the same numbers on any machine: the DataLoader worker count and the
evaluation batch size leave a run's numbers unchanged (and its identity); every JSON file the
harness writes is strict JSON; every file it writes gets the mode ``open()`` would give it."""
from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.datasets import ImageFolder

from clbench import files, record
from clbench.benchmarks import BENCHMARKS, Benchmark, get_benchmark, register_benchmark
from clbench.cli import main
from clbench.config import RunConfig
from clbench.jobs import claim_path, status_path, update_status
from clbench.loading import seeded_loader
from clbench.protocol import SOURCE_ROOT
from clbench.recipes import resolve_config

CLASSES = 6
RUN = ["--bench", "jpeg_tree", "--methods", "full_ft", "--seeds", "0", "--no-progress"]


def _load_tree(data_dir, train_tf, test_tf, splits_dir):
    return ImageFolder(str(data_dir / "train"), train_tf), ImageFolder(str(data_dir / "test"), test_tf)


if "jpeg_tree" not in BENCHMARKS:  # real JPEG decoding and the default (torchvision) augmentation
    register_benchmark(Benchmark(
        name="jpeg_tree", title="JPEG tree", num_classes=CLASSES, default_tasks=[2], load=_load_tree,
        folder="jpeg_tree", image_size=16,
        defaults={"backbone": {"name": "vit_toy_patch4_16", "pretrained": False},
                  "train": {"epochs": 3, "batch_size": 8, "lr": 0.003}}))


@pytest.fixture(scope="module")
def jpeg_tree(tmp_path_factory) -> Path:
    """``train/<class>/*.jpg`` and ``test/<class>/*.jpg``: class colours with noise, varied sizes."""
    root = tmp_path_factory.mktemp("data")
    rng = np.random.RandomState(0)
    colours = rng.rand(CLASSES, 3) * 200
    for split, n in (("train", 12), ("test", 6)):
        for c in range(CLASSES):
            folder = root / "jpeg_tree" / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(n):
                h, w = rng.randint(18, 48, size=2)
                pixels = np.clip(colours[c] + rng.randn(h, w, 3) * 40, 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.jpg", quality=90)
    return root


@pytest.mark.filterwarnings("ignore:This DataLoader will create 4 worker processes")  # more than the cores
def test_worker_count_and_evaluation_batch_change_no_number(jpeg_tree, tmp_path):
    """0, 2 and 4 workers, and another evaluation batch size: byte-identical accuracy matrices,
    and one run identity (no tag)."""
    matrices = {}
    for workers, extra in [(0, []), (2, []), (4, ["--set", "train.eval_batch_size=5"])]:
        out = tmp_path / f"workers{workers}"
        args = RUN + ["--data-root", str(jpeg_tree), "--out", str(out), "--set", f"train.num_workers={workers}"]
        assert main(args + extra) == 0
        (path,) = (out / "runs").rglob("*.json")
        result = record.read_result(path)
        assert result.config["train"]["num_workers"] == workers  # recorded, as the device is
        matrices[workers] = (str(path.relative_to(out)), json.dumps(result.accuracy_matrix))
    assert matrices[0][0] == "runs/jpeg_tree/N2/full_ft/seed0.json"  # no tag: the same run
    assert len(set(matrices.values())) == 1, matrices
    correct, total = json.loads(matrices[0][1]).values()
    assert 0 < sum(correct[-1]) < sum(total[-1])  # a matrix that augmentation could change


class Noisy(Dataset):
    """Each sample draws from torch's RNG, as an augmentation does."""

    def __len__(self) -> int:
        return 10

    def __getitem__(self, i: int):
        return torch.rand(3), i


def test_seeded_samples_draw_per_sample_not_per_process():
    def epochs(workers: int, batch_size: int):
        loader = seeded_loader(Noisy(), stream=5, batch_size=batch_size, shuffle=True, drop_last=False,
                               num_workers=workers)
        return [torch.cat([x for x, _ in loader]) for _ in range(2)], [torch.cat([i for _, i in loader])]

    (a0, a1), order = epochs(0, 4)
    (b0, b1), other_order = epochs(2, 3)
    assert torch.equal(a0, b0) and torch.equal(a1, b1) and torch.equal(order[0], other_order[0])
    assert not torch.equal(a0, a1)  # a new epoch draws new augmentations
    state = torch.get_rng_state()
    list(seeded_loader(Noisy(), 5, 4, True, False, 0))
    assert torch.equal(torch.get_rng_state(), state)  # the loading process's RNG is untouched


def test_worker_count_is_an_execution_setting():
    plain = resolve_config("toy", 3, "full_ft", 0)
    workers = resolve_config("toy", 3, "full_ft", 0, overrides={"train": {"num_workers": 3}})
    lr = resolve_config("toy", 3, "full_ft", 0, overrides={"train": {"num_workers": 3, "lr": 0.5}})
    assert workers.key == plain.key and workers.identity() == plain.identity()
    assert workers.to_dict() != plain.to_dict()  # still recorded
    assert lr.tag and lr.tag == resolve_config("toy", 3, "full_ft", 0, overrides={"train": {"lr": 0.5}}).tag


def _strict(text: str):
    def refuse(token: str):
        raise ValueError(f"non-standard JSON token {token}")

    return json.loads(text, parse_constant=refuse)


def test_every_json_file_the_harness_writes_is_strict(results_root, tmp_path):
    """A sweep whose magnitudes diverge to NaN (SD-LoRA at an absurd learning rate, trained on with
    ``train.on_divergence=continue``), its status records and its report: every .json parses with
    a strict parser; NaN became null, with a note."""
    args = ["--bench", "toy", "--methods", "sdlora", "--seeds", "0", "--no-progress",
            "--set", "train.lr=1e30", "--set", "train.epochs=1", "--set", "train.on_divergence=continue"]
    main(args)
    written = sorted(results_root.rglob("*.json"))
    assert any("runs" in p.parts for p in written) and any("status" in p.parts for p in written)
    for path in written:
        _strict(path.read_text())
    (result_file,) = (results_root / "runs").rglob("*.json")
    result = record.read_result(result_file)
    assert result.non_finite and all(": nan" in n or "inf" in n for n in result.non_finite), result.non_finite
    files.atomic_write_json(tmp_path / "x.json", {"a": [1.0, float("inf")], "b": {"c": float("nan")}})
    assert _strict((tmp_path / "x.json").read_text()) == {"a": [1.0, None], "b": {"c": None},
                                                         "non_finite": ["a[1]: inf", "b.c: nan"]}


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_every_file_gets_the_mode_open_would_give_it(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        writers = {
            "json": lambda p: files.atomic_write_json(p, {"v": 1}),
            "text": lambda p: files.atomic_write_text(p, "v"),
            "torch": lambda p: files.atomic_torch_save(p, {"v": torch.ones(1)}),
            "result": lambda p: record.write_result(p, record.RunResult(
                run_key="k", benchmark="toy", num_tasks=1, method="full_ft", seed=0, class_order_seed=0,
                class_order=[0], task_sizes=[1], config={}, tasks=[], accuracy_matrix={}, metrics={})),
        }
        for name, write in writers.items():
            write(tmp_path / name)
            assert stat.S_IMODE((tmp_path / name).stat().st_mode) == mode, name
        with files.atomic_path(tmp_path / "memmap.npy") as tmp:  # what the image cache writes through
            np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(2, 2)).flush()
        assert stat.S_IMODE((tmp_path / "memmap.npy").stat().st_mode) == mode
        # the split a loader makes (raw ImageNet-R's 80/20) and a run's status record
        raw = tmp_path / "raw" / "imagenet-r"
        for c in range(200):
            (raw / f"n{c:08d}").mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (8, 8), (c, i, 0)).save(raw / f"n{c:08d}" / f"{i}.jpg")
        cfg = RunConfig("imr", 2, "full_ft")
        get_benchmark("imr").load(raw, None, None, tmp_path / "splits")
        (split,) = (tmp_path / "splits").glob("*.json")
        assert stat.S_IMODE(split.stat().st_mode) == mode
        update_status(tmp_path, cfg.key, state="running")
        assert stat.S_IMODE(status_path(tmp_path, cfg.key).stat().st_mode) == mode
        assert not [p for p in tmp_path.rglob(".*.tmp")]  # no temporary file left behind
    finally:
        os.umask(old)


def test_what_a_run_writes_under_the_default_out_is_ignored_by_git():
    """A run started from the checkout root writes under ./results (the default --out): every file
    it writes there is ignored, so the commit it records (``source_commit``) is clean when the
    code is; results/paper/ (the papers' numbers, read by the report) stays tracked."""
    if shutil.which("git") is None or not (SOURCE_ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    key = "synth/N10/sdlora/seed0"
    out = Path("results")  # relative to the checkout root, as the default --out is there
    written = [record.result_path(out, key), record.checkpoint_path(out, key), record.model_path(out, key, 0),
               record.log_dir(out, key) / "events", status_path(out, key), claim_path(out, key),
               out / "splits" / "imr_split_0.json", out / "cache" / "synth" / "x.npy", out / "tables" / "acc.md",
               out / "figures" / "acc.png", out / "slurm" / "123_0_log.out", out / "report.md"]
    done = subprocess.run(["git", "check-ignore", "--no-index", *map(str, written)], cwd=SOURCE_ROOT,
                          capture_output=True, text=True)
    ignored = set(done.stdout.split())
    assert ignored == set(map(str, written)), f"not ignored: {sorted(set(map(str, written)) - ignored)}"
    tracked = subprocess.run(["git", "check-ignore", "--no-index", "results/paper/table2_imagenet_r.yaml"],
                             cwd=SOURCE_ROOT, capture_output=True, text=True)
    assert tracked.returncode == 1  # not ignored
