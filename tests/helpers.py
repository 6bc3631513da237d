"""The tests' shared helpers, in one module: test modules import from here (``from helpers import
...``), never from each other; fixtures live in ``conftest.py``, which imports this module.

Importing it registers the test-only ``toy`` benchmark and its ViT, ``vit_toy_patch4_16``:
Gaussian-cluster images and an untrained tiny ViT, so protocol tests run in a second without the
synthetic benchmark's pretraining. A subprocess that needs them imports ``conftest`` (or this
module) with ``tests/`` on its path.
"""
from __future__ import annotations

import copy
import pickle
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from timm.models import register_model
from timm.models.vision_transformer import VisionTransformer

from clbench import measure, record, speed
from clbench.benchmarks.base import BENCHMARKS, Benchmark, get_benchmark, register_benchmark
from clbench.config import RunConfig, TrainConfig
from clbench.methods import METHODS, get_method
from clbench.methods.base import Task
from clbench.methods.lora import LoRAQKV, lora_layers
from clbench.protocol import Run
from clbench.recipes import resolve_config
from clbench.record import RunResult, TaskRecord

# ------------------------------------------------------------------------------ the toy benchmark

TOY_CLASSES = 12
TOY_WIDTH = 32  # embed_dim of vit_toy_patch4_16


@register_model
def vit_toy_patch4_16(pretrained: bool = False, **kwargs) -> VisionTransformer:
    for hub_only in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(hub_only, None)
    kwargs = {"img_size": 16, "patch_size": 4, "embed_dim": TOY_WIDTH, "depth": 6, "num_heads": 2,
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


def load_toy(data_dir, train_tf, test_tf, splits_dir):
    """The toy benchmark's loader: 8 training and 4 test images per class."""
    return ToyImages(8, 0, train_tf), ToyImages(4, 1, test_tf)


if "toy" not in BENCHMARKS:
    register_benchmark(Benchmark(
        name="toy", title="Toy", num_classes=TOY_CLASSES, default_tasks=[3], load=load_toy, folder="toy",
        image_size=16, train_transform=lambda size: _flip, test_transform=lambda size: _identity,
        defaults={"backbone": {"name": "vit_toy_patch4_16", "pretrained": False},
                  "train": {"num_workers": 0, "epochs": 5, "batch_size": 16, "lr": 0.003}}))

# Method arguments that fit every method to the toy benchmark and to a test's seconds: CODA's
# orthogonal keys must fit the toy's width 32; HiDe-Prompt's every stage still runs, small
# (2 centroids of the 8 toy images per class, 2 epochs of each re-training, 2 prompted layers).
TOY_METHOD_ARGS: dict[str, dict] = {
    "coda_prompt": {"num_components": 30},
    "hide_prompt": {"tii_epochs": 2, "tii_align_epochs": 2, "tap_epochs": 2, "kmeans_n_init": 1,
                    "num_centroids": 2, "prompt_layers": [0, 1], "prompt_length": 2},
}


def toy_vit(seed: int = 0) -> nn.Module:
    """The toy benchmark's ViT, untrained, seeded, in eval mode, as a method's backbone."""
    torch.manual_seed(seed)
    return timm.create_model("vit_toy_patch4_16", num_classes=0).eval()


# ------------------------------------------------------------------------------ runs on synth


def synth_result(method: str, out, num_tasks: int = 10, seed: int = 0, bench: str = "synth") -> RunResult:
    """One run's result through the real protocol and recipes; a run already in ``out`` is read
    back, so tests sharing ``synth_results`` train each (method, N, seed) once per session."""
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


# ------------------------------------------------------------------------------ LoRA references
# Written independently of methods/lora.py: per task and per projection, in activation space,
# the way the official repositories run their branches.


def randomise_current(layers, scale: float = 0.3) -> None:
    """Give the current pair non-trivial values (B starts at zero)."""
    with torch.no_grad():
        for layer in layers:
            for p in layer.projections:
                layer.current_A[p].normal_()
                layer.current_B[p].normal_().mul_(scale)


def per_task_pairs(layer: LoRAQKV, p: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    a, b, tasks = layer.factors(p)
    return [(a[tasks == k], b[:, tasks == k]) for k in range(layer.num_tasks)]


class BranchQKV(nn.Module):
    """Reference: W0 x + b, then every task's branch added to its slice, B_k (A_k x) * c_k."""

    def __init__(self, layer: LoRAQKV, coefficient=lambda p, k, a, b: 1.0):
        super().__init__()
        self.weight, self.bias = layer.weight, layer.bias
        self.dim = layer.proj_dim
        self.branches = {p: [(a.detach().clone(), b.detach().clone(), coefficient(p, k, a, b))
                             for k, (a, b) in enumerate(per_task_pairs(layer, p))]
                         for p in layer.projections}

    def forward(self, x):
        out = F.linear(x, self.weight, self.bias)
        parts = list(out.split(self.dim, -1))
        for i, p in enumerate("qkv"):
            for a, b, c in self.branches.get(p, []):
                parts[i] = parts[i] + c * ((x @ a.t()) @ b.t())
        return torch.cat(parts, -1)


def branch_reference(model: nn.Module, coefficient=lambda p, k, a, b: 1.0) -> nn.Module:
    """A copy of ``model`` whose LoRA layers compute every task's branch apart (``BranchQKV``)."""
    memo = {id(m): BranchQKV(m, coefficient) for m in lora_layers(model)}
    for t in list(model.parameters()) + list(model.buffers()):
        memo.setdefault(id(t), t)
    return copy.deepcopy(model, memo)


# ------------------------------------------------------------------------------ methods without a run

CLASSES_PER_TASK = 3


def make_task(t: int, num_tasks: int, train: TrainConfig | None = None) -> Task:
    """Task ``t`` of ``CLASSES_PER_TASK`` classes each, with no data."""
    start = t * CLASSES_PER_TASK
    return Task(index=t, num_tasks=num_tasks, classes=range(start, start + CLASSES_PER_TASK),
                train=train or TrainConfig(), device=torch.device("cpu"), make_loader=None)


def build(name: str = "sdlora", num_tasks: int = 4, backbone: nn.Module | None = None, **config):
    """Method ``name`` on the toy ViT, for ``num_tasks`` tasks of ``CLASSES_PER_TASK`` classes."""
    cls = get_method(name)
    return cls(backbone if backbone is not None else toy_vit(), cls.Config(**config),
               num_classes=num_tasks * CLASSES_PER_TASK, num_tasks=num_tasks)


# ------------------------------------------------------------------------------ data trees on disk

WNIDS = ["n01443537", "n01484850", "n01494475"]  # three ImageNet-R classes stand in for 200
CUB_CLASSES = ["001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Sooty_Albatross"]


def write_image(path: Path, color: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (color, 128, 255 - color)).save(path, format="JPEG")
    return path


def class_tree(root: Path, classes: list[str], per_class: int, prefix: str = "img") -> list[Path]:
    return [write_image(root / c / f"{prefix}_{i:02d}.jpg", 20 * k + i)
            for k, c in enumerate(classes) for i in range(per_class)]


def domainnet_tree(root: Path, domains=("clipart", "sketch"), classes=("apple", "bee", "cat")) -> dict:
    """Images plus DomainNet's own per-domain lists; returns {side: [(relative path, label)]}."""
    entries: dict[str, list] = {"train": [], "test": []}
    for domain in domains:
        lines: dict[str, list[str]] = {"train": [], "test": []}
        for label, name in enumerate(classes):
            for i in range(3):
                rel = f"{domain}/{name}/{domain}_{label:03d}_{i:06d}.jpg"
                write_image(root / rel, 10 * label + i)
                side = "test" if i == 2 else "train"
                lines[side].append(f"{rel} {label}")
                entries[side].append((rel, label))
        for side in lines:
            (root / f"{domain}_{side}.txt").write_text("\n".join(lines[side]) + "\n")
    return entries


def fake_cifar100(root: Path, per_class: int = 2) -> None:
    """The torchvision ``cifar-100-python`` pickle tree with a few tiny images per class."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.RandomState(0)
    for name, n in (("train", per_class), ("test", 1)):
        labels = [c for c in range(100) for _ in range(n)]
        entry = {"data": rng.randint(0, 256, (len(labels), 3072), dtype=np.uint8),
                 "fine_labels": labels, "coarse_labels": [c // 5 for c in labels]}
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f)
    with open(folder / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"class{c}" for c in range(100)],
                     "coarse_label_names": [f"super{c}" for c in range(20)]}, f)


# ------------------------------------------------------------------------------ result files


def counts_for_curve(curve: list[float], per_task: int = 1000) -> tuple[list[list[int]], list[list[int]]]:
    """An accuracy matrix (counts) whose sample-weighted accuracy after task t is ``curve[t]``
    exactly: ``per_task`` test images per task, the correct ones spread evenly over tasks."""
    n = len(curve)
    correct = [[0] * n for _ in range(n)]
    total = [[0] * n for _ in range(n)]
    for t, acc in enumerate(curve):
        right = round(acc / 100 * per_task * (t + 1))
        assert abs(right - acc / 100 * per_task * (t + 1)) < 1e-6, "curve value not representable"
        for i in range(t + 1):
            total[t][i] = per_task
            correct[t][i] = right // (t + 1) + (1 if i < right % (t + 1) else 0)
    return correct, total


def write_run(root: Path, benchmark: str, method: str, seed: int, curve: list[float] | None = None,
              counts: tuple[list, list] | None = None, tag: str = "", magnitudes: bool = False,
              train_time_s: float = 10.0, flops: int = 4_000_000, argv: list[str] | None = None,
              memory: dict[str, float] | None = None) -> Path:
    """A result file as clbench/protocol.py writes it (only what the report reads is realistic),
    with the method's and benchmark's titles as their registrations give them."""
    correct, total = counts if counts is not None else counts_for_curve(curve)
    n = len(correct)
    tasks = []
    for t in range(n):
        log = {"magnitudes": [round(0.8 + 0.05 * k + 0.01 * t + 0.001 * seed, 4) for k in range(t + 1)]} \
            if magnitudes else {}
        tasks.append(TaskRecord(task=t, classes=[2 * t, 2 * t + 1], train_time_s=train_time_s / n, eval_time_s=0.1,
                                accuracy=0.0, **{"cpu_max_rss_mb": 512.0 + t, **(memory or {})},
                                cost={"trainable_params": 1000 * (t + 1), "stored_params": 5000, "stored_features": 0,
                                      "backbone_passes": 1, "flops_per_image": flops},
                                method_log=log))
    key = RunConfig(benchmark, n, method, seed, seed, tag=tag).key
    result = RunResult(run_key=key, benchmark=benchmark, benchmark_title=BENCHMARKS[benchmark].title, num_tasks=n,
                       method=method, method_info=METHODS[method].info, tag=tag, seed=seed, class_order_seed=seed,
                       class_order=[], task_sizes=[2] * n, config={"method_args": {}}, pretrained="test",
                       tasks=tasks, accuracy_matrix={"correct": correct, "total": total}, metrics={},
                       cost=tasks[-1].cost, wall_time_s=train_time_s + 1, argv=argv or [])
    path = record.result_path(root, key)
    record.write_result(path, result)
    return path


# ----------------------------------------------------------------------------- speed and GPU-path tests

SPEED_SYNTH = ["speed", "--bench", "synth", "--device", "cpu", "--set", "backbone.pretrained=false",
               "--steps", "3", "--warmup", "1", "--images-per-class", "2", "--threads", "1"]


def data_rows(out: str) -> list[list[str]]:
    lines = [line for line in out.splitlines() if line.startswith("| ")]
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines]


def built_for_speed(method_name: str, device: str, tasks: int = 2):
    """A method built, grown and begun on task 0 of the toy benchmark as `clbench speed` builds it,
    and a batch for it."""
    setting = speed.Setting(bench=get_benchmark("toy"), num_tasks=tasks, device=torch.device(device), overrides={},
                            seed=0, timing=measure.Timing(torch.device(device), 0, 1), steps_between=1,
                            images_per_class=2, batch_size=8, eval_batch_size=8)
    method, cfg, sizes, inputs = speed.build_method(setting, method_name)
    task = speed.synthetic_task(setting, cfg, sizes, 0, inputs)
    method.grow(task)
    method.to(device)
    method.begin_task(task)
    x, y = speed.random_batch(task, 8, speed.image_size(setting, cfg), inputs, 0)
    return method, task, x, y


def speed_bench(name: str):
    return get_benchmark(name)


def toy_run(root, method: str = "full_ft", seed: int = 0, **train):
    cfg = resolve_config("toy", 2, method, seed, None, {"train": {"epochs": 1, **train}}, "cpu")
    return Run(cfg, root, progress=False).execute()
