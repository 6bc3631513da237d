"""``clbench probe``: which regime a benchmark is in, measured on its own pretrained backbone.

On all of the benchmark's continual-learning classes at once (no tasks, no forgetting), three
classifiers that bracket what a continual learner can reach:

* **NCM**: cosine similarity to the class means of the frozen backbone's features of the
  un-augmented training images (SimpleCIL's classifier with every class known: its final Acc);
* **linear probe**: multinomial logistic regression on the same frozen features (full batch,
  L-BFGS, a little weight decay; no augmentation);
* **joint fine-tuning**: full fine-tuning on every class at once (``--tasks 1``, full_ft's recipe
  for the benchmark, through the same protocol as a sweep's runs): the usual upper bound.

Each accuracy is given over the whole test set and per group where the dataset has groups (a
``group_names`` tuple and per-sample ``groups`` ids: synth's renditions). On a benchmark in the
regime of ImageNet-R, joint fine-tuning is well above NCM (the backbone's features are not yet
what the classes need) and the linear probe lies between; ``synth`` is built to be so.
"""
from __future__ import annotations

import argparse
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from clbench.backbones import create_backbone, normalization
from clbench.benchmarks import get_benchmark
from clbench.config import RunConfig, parse_set
from clbench.files import atomic_write_json
from clbench.protocol import Inputs, Run, resolve_device, seed_everything
from clbench.recipes import resolve_config


@dataclass
class Probe:
    """Accuracies (%) of one classifier: over all test images, and per group."""

    name: str
    acc: float
    groups: dict[str, float] = field(default_factory=dict)


def group_accuracies(correct: np.ndarray, dataset: Dataset) -> dict[str, float]:
    """Accuracy (%) per group of ``dataset`` (``group_names``/``groups``), or {} without groups."""
    names = getattr(dataset, "group_names", None)
    if names is None:
        return {}
    groups = np.asarray(dataset.groups)
    return {name: float(correct[groups == g].mean() * 100) for g, name in enumerate(names) if (groups == g).any()}


def probe_of(name: str, predicted: np.ndarray, targets: np.ndarray, dataset: Dataset) -> Probe:
    correct = predicted == targets
    return Probe(name, float(correct.mean() * 100), group_accuracies(correct, dataset))


@torch.no_grad()
def features(backbone: torch.nn.Module, dataset: Dataset, inputs: Inputs, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The frozen backbone's pooled features of ``dataset`` (float32) and its original labels."""
    backbone.eval()
    feats, labels = [], []
    for x, y in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        feats.append(backbone(inputs(x)).float().cpu())
        labels.append(y)
    return torch.cat(feats), torch.cat(labels)


def ncm_predict(train_f: torch.Tensor, train_y: torch.Tensor, test_f: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Nearest class mean by cosine similarity (SimpleCIL's rule)."""
    means = torch.zeros(num_classes, train_f.shape[1]).index_add_(0, train_y, train_f)
    means /= torch.bincount(train_y, minlength=num_classes).clamp(min=1)[:, None].float()
    return (F.normalize(test_f, dim=1) @ F.normalize(means, dim=1).T).argmax(1)


def linear_probe_predict(train_f: torch.Tensor, train_y: torch.Tensor, test_f: torch.Tensor, num_classes: int,
                         weight_decay: float = 1e-4, steps: int = 200, seed: int = 0) -> torch.Tensor:
    """Multinomial logistic regression on the features (standardised by the training set's
    statistics), full batch with L-BFGS."""
    mean, std = train_f.mean(0), train_f.std(0).clamp(min=1e-6)
    xs, xt = (train_f - mean) / std, (test_f - mean) / std
    generator = torch.Generator().manual_seed(seed)
    weight = (torch.randn(num_classes, xs.shape[1], generator=generator) * 0.01).requires_grad_()
    bias = torch.zeros(num_classes, requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=steps, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(xs @ weight.T + bias, train_y) + weight_decay * weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return (xt @ weight.T + bias).argmax(1)


def joint_fine_tuning(config: RunConfig, test: Dataset, batch_size: int) -> Probe:
    """Full fine-tuning on every class at once through the protocol (results in a temporary
    folder), evaluated per group on ``test``."""
    with tempfile.TemporaryDirectory() as out:
        run = Run(config, Path(out), progress=False)
        result = run.execute()
        harness = {c: h for h, c in enumerate(result.class_order)}
        predicted, targets = [], []
        run.method.eval()
        with torch.no_grad():
            for x, y in DataLoader(test, batch_size=batch_size, shuffle=False):
                predicted.append(run.method.predict(run.inputs(x)).argmax(1).cpu())
                targets.append(torch.tensor([harness[int(c)] for c in y]))
    probe = probe_of("joint fine-tuning", torch.cat(predicted).numpy(), torch.cat(targets).numpy(), test)
    if abs(probe.acc - result.metrics["acc"]) > 1e-6:  # the same test images as the run evaluated
        raise RuntimeError(f"joint fine-tuning: {probe.acc} here, {result.metrics['acc']} in its result file")
    return probe


def run_probe(bench_name: str, seed: int = 0, device: str = "auto", overrides: dict[str, Any] | None = None,
              joint: bool = True) -> tuple[list[Probe], dict[str, Any]]:
    """The probes of ``bench_name`` and what they were measured on."""
    bench = get_benchmark(bench_name)
    # full_ft's run with one task: its backbone, data settings and (for the joint row) recipe
    config = resolve_config(bench_name, 1, "full_ft", seed, overrides=overrides, device=device)
    torch_device = resolve_device(config.device)
    _, test_tf = bench.transforms(config.data.image_size)
    data_dir = bench.data_dir(config.data.root)
    with tempfile.TemporaryDirectory() as splits:
        train, test = bench.load(data_dir, test_tf, test_tf, Path(splits))  # training images un-augmented
    seed_everything(seed)
    backbone, weights = create_backbone(config.backbone)
    backbone = backbone.to(torch_device)
    inputs = Inputs(torch_device, normalization(backbone) if config.backbone.normalize else None)
    batch_size = config.train.eval_batch_size
    train_f, train_y = features(backbone, train, inputs, batch_size)
    test_f, test_y = features(backbone, test, inputs, batch_size)
    targets = test_y.numpy()
    probes = [probe_of("NCM (cosine, frozen)", ncm_predict(train_f, train_y, test_f, bench.num_classes).numpy(),
                       targets, test),
              probe_of("linear probe (frozen)",
                       linear_probe_predict(train_f, train_y, test_f, bench.num_classes, seed=seed).numpy(),
                       targets, test)]
    if joint:
        probes.append(joint_fine_tuning(config, test, batch_size))
    about = {"bench": bench_name, "seed": seed, "backbone": weights, "classes": bench.num_classes,
             "train_images": len(train), "test_images": len(test),
             "joint_recipe": {"epochs": config.train.epochs, "lr": config.train.lr,
                              "batch_size": config.train.batch_size, "optimizer": config.train.optimizer}}
    return probes, about


def format_probes(probes: list[Probe], about: dict[str, Any]) -> str:
    groups = list(dict.fromkeys(g for p in probes for g in p.groups))
    header = f"| classifier | all | {' | '.join(groups)} |" if groups else "| classifier | all |"
    lines = [f"probe of {about['bench']}: {about['classes']} classes, {about['train_images']} training and "
             f"{about['test_images']} test images; backbone {about['backbone']}; seed {about['seed']}",
             "", header, "|:---|" + "---:|" * (1 + len(groups))]
    for p in probes:
        cells = [f"{p.acc:.2f}"] + [f"{p.groups[g]:.2f}" if g in p.groups else "–" for g in groups]
        lines.append(f"| {p.name} | " + " | ".join(cells) + " |")
    r = about["joint_recipe"]
    lines.append(f"\naccuracy (%) on the test images. Joint fine-tuning: full_ft with --tasks 1 "
                 f"({r['optimizer']} lr {r['lr']:g}, batch {r['batch_size']}, {r['epochs']} epochs).")
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bench", default="synth", help="benchmark name (default synth)")
    p.add_argument("--seed", type=int, default=0, help="seed of the joint run and the probe's initialisation")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--data-root", default=None, metavar="DIR",
                   help="dataset root, as the sweep's (default $CLBENCH_DATA or ./data)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override full_ft's recipe for the joint run and the data settings (repeatable)")
    p.add_argument("--no-joint", action="store_true", help="skip joint fine-tuning (the frozen probes only)")
    p.add_argument("--json", type=Path, default=None, metavar="FILE", help="also write the figures to FILE")


def probe_overrides(args: argparse.Namespace) -> dict[str, Any] | None:
    """The configuration layer the options give: ``--set`` items, and ``--data-root`` as
    ``data.root`` (where the sweep's ``--data-root`` goes too)."""
    overrides = parse_set(args.overrides)
    if args.data_root is not None:
        overrides.setdefault("data", {})["root"] = args.data_root
    return overrides or None


def main(args: argparse.Namespace) -> int:
    probes, about = run_probe(args.bench, args.seed, args.device, probe_overrides(args), not args.no_joint)
    print(format_probes(probes, about))
    if args.json:
        atomic_write_json(args.json, {**about, "probes": [p.__dict__ for p in probes]})
    return 0


COMMANDS = {"probe": (add_arguments, main)}
