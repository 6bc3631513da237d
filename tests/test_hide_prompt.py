"""HiDe-Prompt: class statistics, the stage order, data isolation between tasks, batch-independent
inference, and the resume contract, on the test-only ``toy`` benchmark (fast, CPU)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from helpers import TOY_CLASSES, TOY_METHOD_ARGS, ToyImages, load_toy, mean_final_acc
from torch.utils.data import DataLoader, TensorDataset

import clbench.methods.hide_prompt as hide_module
from clbench.benchmarks.base import BENCHMARKS, Benchmark, register_benchmark
from clbench.config import TrainConfig
from clbench.errors import ConfigError
from clbench.methods.base import Task
from clbench.methods.gaussian_stats import ClassGaussians, retrain_on_samples
from clbench.methods.hide_prompt import HiDePrompt, contrastive_term
from clbench.methods.prompts import prompted_forward
from clbench.protocol import Run
from clbench.recipes import resolve_config

# Small enough for seconds per run; every stage still runs (2 centroids of the 8 toy images/class).
FAST = {"train": {"epochs": 2}, "method": TOY_METHOD_ARGS["hide_prompt"]}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def toy_run(out, bench: str = "toy", overrides=None, run_cls=Run, **kwargs) -> Run:
    cfg = resolve_config(bench, 3, "hide_prompt", seed=0, overrides=overrides or FAST, device="cpu")
    return run_cls(cfg, out, progress=False, **kwargs)


def probe_images() -> torch.Tensor:
    """Test images of every toy class, a fixed batch to compare predictions on."""
    return torch.stack([ToyImages(2, 7)[i][0] for i in range(2 * TOY_CLASSES)])


class ProbingRun(Run):
    """The real protocol, also recording the method's logits on a fixed batch after each task."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.probe = probe_images()
        self.probes: list[torch.Tensor] = []

    def evaluate(self, t):
        counts = super().evaluate(t)  # puts the method in eval mode
        self.probes.append(self.method.predict(self.probe))
        return counts


# ------------------------------------------------------------------------------ statistics


def test_class_gaussians_fit_grow_and_sample():
    stats = ClassGaussians(dim=4, num_centroids=3)
    stats.grow(2)
    stats.grow(1)
    assert stats.mean.shape == (3, 3, 4) and stats.count.shape == (3, 3)
    gen = torch.Generator().manual_seed(0)
    centres = torch.tensor([[10.0, 0, 0, 0], [0, 10.0, 0, 0], [0, 0, 10.0, 0]])
    x = torch.cat([centres[c] + 0.1 * torch.randn(30, 4, generator=gen) for c in range(3)])
    y = torch.arange(3).repeat_interleave(30)
    stats.fit(x[:60], y[:60], range(0, 2), seed=0)
    assert stats.fitted().tolist() == [True, True, False]
    stats.fit(x, y, range(2, 3), seed=0)
    assert stats.count.sum(1).tolist() == [30, 30, 30]
    # the clusters of a class average back to its samples' mean
    weights = stats.count.unsqueeze(-1).float()
    assert torch.allclose((stats.mean * weights).sum(1) / weights.sum(1), centres, atol=0.05)

    torch.manual_seed(0)
    xs, ys = stats.sample(num_classes=2, per_centroid=5, total=1000)
    assert len(xs) == 2 * 3 * 5  # capped at the pool: 5 draws from each of 2 x 3 clusters
    assert set(ys.tolist()) == {0, 1}
    assert torch.allclose(xs[ys == 1].mean(0), centres[1], atol=0.2)


def test_small_classes_get_fewer_clusters_and_singletons_are_not_sampled():
    stats = ClassGaussians(dim=2, num_centroids=10)
    stats.grow(2)
    x = torch.tensor([[0.0, 0], [0, 1], [5, 5], [5, 6], [9, 9]])
    stats.fit(x, torch.tensor([0, 0, 0, 0, 1]), range(0, 2), seed=0)
    assert stats.count[0].tolist() == [2, 2] + [0] * 8  # 4 samples -> 2 clusters
    assert stats.count[1].tolist() == [1] + [0] * 9
    assert len(stats.centroids(2)) == 3
    _, ys = stats.sample(num_classes=2, per_centroid=4, total=100)
    assert ys.tolist() == [0] * 8  # class 1's only cluster has zero variance, as officially skipped


def test_retraining_on_samples_separates_the_classes():
    torch.manual_seed(0)
    stats = ClassGaussians(dim=8, num_centroids=2)
    stats.grow(3)
    centres = 3 * torch.eye(3, 8)
    x = centres.repeat_interleave(40, 0) + 0.3 * torch.randn(120, 8)
    stats.fit(x, torch.arange(3).repeat_interleave(40), range(0, 3), seed=0)
    head = torch.nn.Linear(8, 5)
    losses = retrain_on_samples(head, list(head.parameters()), stats, num_seen=3, epochs=5, iterations=6,
                                batch_size=16, lr=0.1)
    assert len(losses) == 5 and losses[-1] < 0.5 * losses[0]
    assert (head(centres)[:, :3].argmax(1) == torch.arange(3)).all()


def test_contrastive_term_is_the_cross_entropy_of_scaled_similarities():
    a = 2.0
    features = torch.tensor([[a, 0.0], [0.0, a]])
    # no stored centroids: each row's own similarity a^2/t against the other's 0
    expected = math.log(1 + math.exp(-a * a / 0.8))
    assert contrastive_term(features, torch.zeros(0, 2), 0.8).item() == pytest.approx(expected, rel=1e-6)
    centroid = torch.tensor([[a, 0.0]])  # equal to the first feature: its row and that row tie
    m = torch.cat([centroid, features])
    manual = F.cross_entropy(m @ m.t() / 0.8, torch.arange(3))
    assert contrastive_term(features, centroid, 0.8).item() == pytest.approx(manual.item(), rel=1e-6)


# ------------------------------------------------------------------------------ unit-level method


def make_method(**config) -> HiDePrompt:
    torch.manual_seed(0)
    backbone = timm.create_model("vit_toy_patch4_16", num_classes=0)
    cfg = HiDePrompt.Config(**{**FAST["method"], **config})
    return HiDePrompt(backbone, cfg, num_classes=TOY_CLASSES, num_tasks=3)


def toy_task(index: int, per_task: int = 4) -> Task:
    data = ToyImages(8, 0)
    classes = range(index * per_task, (index + 1) * per_task)
    keep = [i for i, c in enumerate(data.targets) if c in classes]
    dataset = TensorDataset(data.images[keep], torch.as_tensor(data.targets[keep]))

    def make_loader(augment=True, shuffle=True, batch_size=None, drop_last=None):
        return DataLoader(dataset, batch_size=batch_size or 16, shuffle=shuffle, drop_last=bool(drop_last))

    return Task(index=index, num_tasks=3, classes=classes, train=TrainConfig(epochs=1, lr=0.01, optimizer="adam"),
                device=torch.device("cpu"), make_loader=make_loader)


def test_invalid_prompt_layers_name_the_key_and_the_fix():
    with pytest.raises(ValueError, match=r"method.prompt_layers=\[0, 9\].*0\.\.5"):
        make_method(prompt_layers=[0, 9])


def test_a_pool_smaller_than_the_task_count_is_refused_with_the_official_reason():
    with pytest.raises(ConfigError, match=r"pool_size=2 .* 3 tasks.*pool_size=null"):
        make_method(pool_size=2)
    method = make_method(pool_size=3)  # a pool that holds every task is one prompt per task
    for t in range(3):
        method.grow(toy_task(t))
    assert len(method.prompts) == 3


def test_prompt_momentum_and_initialisation_from_the_previous_task():
    method = make_method(prompt_momentum=0.25)
    t0, t1 = toy_task(0), toy_task(1)
    method.grow(t0)
    method.grow(t1)
    fresh = method.prompts[1].detach().clone()
    method.begin_task(t1)
    assert torch.equal(method.prompts[1], method.prompts[0]) and not torch.equal(method.prompts[1], fresh)
    with torch.no_grad():
        method.prompts[1].add_(1.0)  # as if trained
    trained = method.prompts[1].detach().clone()
    mixed = method.training_prompt(t1)
    assert torch.allclose(mixed, 0.75 * trained + 0.25 * method.prompts[0])
    mixed.sum().backward()  # the earlier prompt enters detached
    assert method.prompts[0].grad is None and method.prompts[1].grad is not None
    assert [p.requires_grad for p in method.prompts] == [False, True]


def test_inference_picks_each_samples_own_task_prompt_whatever_the_batch():
    method = make_method()
    for t in range(3):
        method.grow(toy_task(t))
    with torch.no_grad():
        for p in method.prompts:  # three clearly different prompts
            p.uniform_(-3, 3)
    method.eval()
    x = probe_images()
    tasks = method.infer_task(x)
    assert tasks.min() >= 0 and tasks.max() <= 2
    logits = method.predict(x)
    assert logits.shape == (len(x), TOY_CLASSES)
    # one image at a time, and in another batch order: the same predictions
    one_by_one = torch.cat([method.predict(x[i:i + 1]) for i in range(len(x))])
    assert torch.allclose(logits, one_by_one, atol=1e-5)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(1))
    assert torch.allclose(method.predict(x[order]), logits[order], atol=1e-5)
    # and each sample's logits are those of its inferred task's prompt
    for i in (0, len(x) - 1):
        prompt = method.prompts[int(tasks[i])]
        feature = method.prompted_features(x[i:i + 1], prompt)
        assert torch.allclose(logits[i:i + 1], method.head(feature), atol=1e-5)
    # an explicit check that the prompt reaches the backbone through prompts.py
    plain = prompted_forward(method.backbone, x[:1]).cls
    assert not torch.allclose(method.prompted_features(x[:1], method.prompts[0]), plain)


# ------------------------------------------------------------------------------ the protocol


def test_stages_run_in_order_on_current_data_and_statistics_have_the_declared_sizes(tmp_path, monkeypatch):
    events: list[tuple] = []  # (hook, whether the data it saw belonged to its own task)

    def spy(name):
        original = getattr(HiDePrompt, name)

        def wrapper(self, task):
            events.append((name, True))
            return original(self, task)

        monkeypatch.setattr(HiDePrompt, name, wrapper)

    for hook in ("grow", "begin_task", "end_task"):
        spy(hook)
    original_step = HiDePrompt.training_step

    def training_step(self, x, y, task, stage):
        events.append((f"step:{stage.name}", set(y.tolist()) <= set(task.classes)))
        return original_step(self, x, y, task, stage)

    monkeypatch.setattr(HiDePrompt, "training_step", training_step)
    original_fit, original_retrain = ClassGaussians.fit, hide_module.retrain_on_samples

    def fit(stats, features, labels, classes, *args):
        events.append(("fit", set(labels.tolist()) == set(classes)))
        return original_fit(stats, features, labels, classes, *args)

    def retrain(logits_of, params, stats, *args, **kwargs):
        events.append(("retrain:" + ("tii" if logits_of == run.method.tii_logits else "head"), True))
        return original_retrain(logits_of, params, stats, *args, **kwargs)

    monkeypatch.setattr(ClassGaussians, "fit", fit)
    monkeypatch.setattr(hide_module, "retrain_on_samples", retrain)
    run = toy_run(tmp_path)
    result = run.execute()

    assert all(ok for _, ok in events), "a stage saw labels outside its own task"
    names = [name for name, _ in events]
    compressed = [n for i, n in enumerate(names) if i == 0 or n != names[i - 1]]
    one_task = ["grow", "begin_task", "step:tii", "step:prompt", "end_task", "fit"]
    assert compressed == one_task + one_task + ["retrain:tii", "retrain:head"] + one_task + [
        "retrain:tii", "retrain:head"]

    method, d, k = run.method, 32, FAST["method"]["num_centroids"]
    for stats in (method.tii_stats, method.prompt_stats):
        assert stats.mean.shape == stats.var.shape == (TOY_CLASSES, k, d)
        assert stats.count.sum(1).tolist() == [8] * TOY_CLASSES  # every training image, once
        assert (stats.var[stats.count > 1].sum(-1) > 0).all()
    assert len(method.prompts) == 3 and method.prompts[0].shape == (2, 2, 2, d)
    cost = result.cost
    assert cost["backbone_passes"] == 2
    assert cost["stored_features"] == 2 * TOY_CLASSES * k * (2 * d + 1)
    assert cost["trainable_params"] > 0 and cost["flops_per_image"] > 0
    assert 0 <= result.metrics["acc"] <= 100


def _swap_last_task_images(order: list[int], sizes: list[int]):
    """A toy benchmark whose last task's training images are replaced by other images."""
    last = set(order[sum(sizes[:-1]):])

    def load(data_dir, train_tf, test_tf, splits_dir):
        train, test = load_toy(data_dir, train_tf, test_tf, splits_dir)
        swapped = torch.from_numpy(np.isin(train.targets, list(last)))
        noise = torch.rand(train.images.shape, generator=torch.Generator().manual_seed(5))
        train.images = torch.where(swapped[:, None, None, None], noise, train.images)
        return train, test

    return load


def test_later_tasks_data_never_reaches_an_earlier_stage(tmp_path):
    """Every model state after task t (TII model, statistics, prompts, heads) must be a function
    of tasks <= t alone. Change only the last task's training images: everything the method
    predicts after the earlier tasks must stay bit-identical, and only the last row change.
    (HiDe's first release trained its task-identity model on all tasks at once.)"""
    first = toy_run(tmp_path / "a", run_cls=ProbingRun)
    result = first.execute()
    if "toy_last_swapped" not in BENCHMARKS:
        register_benchmark(Benchmark(
            name="toy_last_swapped", title="Toy", num_classes=TOY_CLASSES, default_tasks=[3],
            load=_swap_last_task_images(result.class_order, result.task_sizes), folder="toy",
            image_size=16, train_transform=BENCHMARKS["toy"].train_transform,
            test_transform=BENCHMARKS["toy"].test_transform, defaults=BENCHMARKS["toy"].defaults))
    second = toy_run(tmp_path / "b", bench="toy_last_swapped", run_cls=ProbingRun)
    second.execute()
    for t in range(2):
        assert torch.equal(first.probes[t], second.probes[t]), f"task {t}'s model saw later data"
    assert not torch.allclose(first.probes[2], second.probes[2]), "the swapped data had no effect"


def test_a_resumed_run_ends_with_the_same_numbers_and_the_state_round_trips(tmp_path):
    whole = toy_run(tmp_path / "whole", run_cls=ProbingRun)
    expected = whole.execute()

    class Preempted(Exception):
        pass

    def stop_after_two(tasks_done, num_tasks, elapsed_s):
        if tasks_done == 2:  # the checkpoint after task 2 is on disk
            raise Preempted

    with pytest.raises(Preempted):
        toy_run(tmp_path / "cut", on_progress=stop_after_two).execute()
    resumed = toy_run(tmp_path / "cut", run_cls=ProbingRun)
    result = resumed.execute()
    assert result.accuracy_matrix == expected.accuracy_matrix
    assert torch.equal(resumed.probes[-1], whole.probes[-1])

    # the state itself: a fresh method grown through the tasks loads it and predicts the same
    state = whole.method.state_dict()
    fresh = make_method()
    for t in range(3):
        fresh.grow(whole.task(t))
    fresh.load_state_dict(state)
    fresh.eval()
    x = probe_images()
    assert torch.equal(fresh.predict(x), whole.method.predict(x))
    assert torch.equal(fresh.prompt_stats.mean, whole.method.prompt_stats.mean)


# ------------------------------------------------------------------------------ end to end


@pytest.mark.slow
def test_hide_prompt_beats_full_fine_tuning_on_synth_with_10_tasks(synth_results):
    """Final Acc, mean over 3 seeds, through the real protocol and the recipes."""
    final = {name: mean_final_acc(name, synth_results) for name in ("hide_prompt", "full_ft")}
    assert final["hide_prompt"] > final["full_ft"], final
