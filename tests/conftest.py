"""Shared fixtures. ``toy`` is a test-only benchmark: Gaussian-cluster images and an untrained
tiny ViT, so protocol tests run in a second without the synthetic benchmark's pretraining."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from timm.models import register_model
from timm.models.vision_transformer import VisionTransformer

from clbench.benchmarks.base import BENCHMARKS, Benchmark, register_benchmark

# Sweeps in the tests run in their own process, one run after the other, unless a test asks for
# --jobs: the benchmarks and models the tests register here do not exist in a spawned worker.
os.environ.setdefault("CLBENCH_JOBS", "1")

TOY_CLASSES = 12


@register_model
def vit_toy_patch4_16(pretrained: bool = False, **kwargs) -> VisionTransformer:
    for hub_only in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(hub_only, None)
    kwargs = {"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 6, "num_heads": 2,
              "mlp_ratio": 2.0, **kwargs}
    return VisionTransformer(**kwargs)


class ToyImages(torch.utils.data.Dataset):
    def __init__(self, n_per_class: int, seed: int, transform=None):
        rng = np.random.RandomState(seed)
        # each class: one solid colour, far from the others, plus a little noise
        colours = np.random.RandomState(123).rand(TOY_CLASSES, 3, 1, 1).astype(np.float32)
        self.targets = np.repeat(np.arange(TOY_CLASSES), n_per_class)
        noise = rng.randn(len(self.targets), 3, 16, 16).astype(np.float32) * 0.05
        self.images = torch.from_numpy(np.clip(colours[self.targets] + noise, 0, 1))
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        x = self.images[i]
        return (self.transform(x) if self.transform else x), int(self.targets[i])


def _flip(x):
    return torch.flip(x, dims=[2]) if torch.rand(()) < 0.5 else x


def _identity(x):
    return x


def _load_toy(data_dir, train_tf, test_tf, splits_dir):
    return ToyImages(8, 0, train_tf), ToyImages(4, 1, test_tf)


if "toy" not in BENCHMARKS:
    register_benchmark(Benchmark(
        name="toy", title="Toy", num_classes=TOY_CLASSES, default_tasks=[3], load=_load_toy, folder="toy",
        image_size=16, train_transform=lambda size: _flip, test_transform=lambda size: _identity,
        defaults={"backbone": {"name": "vit_toy_patch4_16", "pretrained": False},
                  "train": {"num_workers": 0, "epochs": 5, "batch_size": 16, "lr": 0.003}}))


def synth_result(method: str, out, num_tasks: int = 10, seed: int = 0, bench: str = "synth") -> dict:
    """One run's result through the real protocol and recipes; a run already in ``out`` is read
    back, so tests sharing ``synth_results`` train each (method, N, seed) once per session."""

    from clbench import record
    from clbench.protocol import Run
    from clbench.recipes import resolve_config

    cfg = resolve_config(bench, num_tasks, method, seed, device="cpu")
    run = Run(cfg, out, progress=False)
    if run.result_path.exists():
        return record.read_result(run.result_path)
    return run.execute()


def mean_final_acc(method: str, out, bench: str = "synth", num_tasks: int = 10, seeds=(0, 1, 2)) -> float:
    """Final Acc of ``method``, mean over ``seeds``."""
    accs = [synth_result(method, out, num_tasks, seed, bench).metrics["acc"] for seed in seeds]
    return sum(accs) / len(accs)


@pytest.fixture(scope="session")
def synth_results(tmp_path_factory):
    """A results root shared by the learning-on-synth tests (full_ft's runs are reused)."""
    return tmp_path_factory.mktemp("synth_results")


@pytest.fixture
def one_thread():
    """One torch thread for the test: the toy models' tensors are tiny, one thread is faster than
    two, does not collapse when other processes load the cores, and is what a SLURM job with
    ``cpus_per_task: 1`` runs with."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def results_root(tmp_path, monkeypatch):
    root = tmp_path / "results"
    monkeypatch.setenv("CLBENCH_RESULTS", str(root))
    return root


def pytest_collection_modifyitems(config, items):
    import shutil

    has_gpu = torch.cuda.is_available()
    has_slurm = all(shutil.which(tool) for tool in ("sbatch", "sacct", "srun"))
    for item in items:
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))
        if "slurm" in item.keywords and not has_slurm:
            item.add_marker(pytest.mark.skip(reason="needs a SLURM cluster (sbatch, sacct, srun)"))


torch.set_num_threads(min(2, os.cpu_count() or 1))
