"""Recipes train with the official codes' per-epoch learning rates, batches and loaders.

Every expected sequence here is written from the official code's behaviour, not from
``build_optimizer``:

* CODA-Prompt's ``CosineSchedule`` (GT-RIPL/CODA-Prompt utils/schedulers.py, copied by InfLoRA
  and by SD-LoRA's PILOT port): ``lr(e) = lr cos(99 pi e / (200 (K - 1)))``; its constructor
  calls ``step(0)`` and resets ``last_epoch`` to -1, so with one ``step()`` after each epoch
  (InfLoRA, PILOT) or one before every epoch but the first (CODA's learner) epoch ``e`` trains
  at ``lr(max(e - 1, 0))``.
* timm 0.6.7's schedulers stepped with ``step(epoch)`` after epoch ``epoch`` (HiDe-Prompt):
  the constructor leaves the base lr, so again epoch ``e`` trains at ``lr(max(e - 1, 0))``.
* torch's ``MultiStepLR`` stepped after each epoch (InfLoRA on DomainNet, SD-LoRA): ``lr(e)``.
"""
from __future__ import annotations

import contextlib
import math

import pytest
import torch

from clbench.config import TrainConfig
from clbench.errors import ConfigError
from clbench.methods.base import build_optimizer
from clbench.protocol import optimization_step
from clbench.recipes import resolve_config
from clbench.task import Stage, Task


def trained_lrs(train: TrainConfig, epochs: int) -> list[float]:
    """The learning rate each epoch trains at, with the protocol's one ``step()`` per epoch."""
    optimizer, scheduler = build_optimizer([{"params": [torch.nn.Parameter(torch.zeros(1))]}], train, epochs)
    lrs = []
    for _ in range(epochs):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()  # no gradients: changes nothing, keeps torch from warning
        if scheduler is not None:
            scheduler.step()
    return lrs


def coda_cosine_official(lr: float, epochs: int) -> list[float]:
    """CODA's CosineSchedule as its learners and InfLoRA/PILOT use it: one epoch behind."""
    return [lr * math.cos(99 * math.pi * max(e - 1, 0) / (200 * (epochs - 1))) for e in range(epochs)]


def timm_cosine_official(lr: float, min_lr: float, epochs: int) -> list[float]:
    """timm CosineLRScheduler(t_initial=epochs), ``step(epoch)`` after each epoch."""
    return [min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * max(e - 1, 0) / epochs)) for e in range(epochs)]


def timm_step_official(lr: float, decay_epochs: int, rate: float, epochs: int) -> list[float]:
    """timm StepLRScheduler(decay_t=decay_epochs), ``step(epoch)`` after each epoch."""
    return [lr * rate ** (max(e - 1, 0) // decay_epochs) for e in range(epochs)]


def recipe_train(bench: str, method: str, epochs: int, num_tasks: int = 10) -> TrainConfig:
    return resolve_config(bench, num_tasks, method, 0, overrides={"train": {"epochs": epochs}}).train


@pytest.mark.parametrize("epochs", [2, 50])
@pytest.mark.parametrize("method", ["inflora", "coda_prompt", "full_ft"])
def test_coda_cosine_recipes_lag_one_epoch(method, epochs):
    train = recipe_train("imr", method, epochs)
    expected = coda_cosine_official(train.lr, epochs)
    assert trained_lrs(train, epochs) == pytest.approx(expected, rel=1e-12)
    if epochs == 2:  # both epochs at the full rate: the difference the issue measured on synth
        assert trained_lrs(train, 2) == pytest.approx([train.lr, train.lr], rel=1e-12)


@pytest.mark.parametrize("epochs", [2, 50])
def test_hide_prompt_cosine_lags_one_epoch(epochs):
    train = recipe_train("imr", "hide_prompt", epochs)
    assert (train.schedule, train.min_lr) == ("cosine", 1e-5)
    expected = timm_cosine_official(train.lr, train.min_lr, epochs)
    assert trained_lrs(train, epochs) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("epochs", [2, 50])
def test_hide_prompt_step_schedule_lags_one_epoch(epochs):
    train = recipe_train("c100", "hide_prompt", epochs)  # timm 'step': x0.1 every 30 epochs
    expected = timm_step_official(train.lr, 30, 0.1, epochs)
    assert trained_lrs(train, epochs) == pytest.approx(expected, rel=1e-12)
    if epochs == 50:  # the drop reaches epoch 31, not 30
        lrs = trained_lrs(train, epochs)
        assert lrs[30] == pytest.approx(train.lr) and lrs[31] == pytest.approx(0.1 * train.lr)


@pytest.mark.parametrize("epochs", [2, 50])
def test_torch_multistep_recipes_do_not_lag(epochs):
    train = recipe_train("dn", "inflora", epochs, num_tasks=5)  # MultiStepLR([4]) stepped per epoch
    expected = [train.lr * (0.1 if e >= 4 else 1.0) for e in range(epochs)]
    assert trained_lrs(train, epochs) == pytest.approx(expected, rel=1e-12)
    train = recipe_train("ima", "sdlora", epochs)  # x0.05 at 10 and 15
    expected = [train.lr * 0.05 ** sum(e >= m for m in (10, 15)) for e in range(epochs)]
    assert trained_lrs(train, epochs) == pytest.approx(expected, rel=1e-12)


def test_coda_prompt_follows_its_own_schedule_and_drops_the_last_batch():
    for bench in ("imr", "c100", "dn", "synth"):
        train = resolve_config(bench, 10, "coda_prompt", 0).train
        assert (train.schedule, train.schedule_offset, train.drop_last) == ("coda_cosine", 1, True), bench


def test_offset_zero_keeps_the_plain_schedule():
    train = TrainConfig(lr=1.0, schedule="coda_cosine")
    assert trained_lrs(train, 3) == pytest.approx([math.cos(99 * math.pi * e / 400) for e in range(3)], rel=1e-12)


@pytest.mark.parametrize("item, fragment", [
    ({"schedule_offset": -1}, "schedule_offset must be >= 0"),
    ({"schedule": "cosin"}, "constant, multistep, cosine, coda_cosine"),
    ({"micro_batch_size": 7}, "divide train.batch_size=192"),
])
def test_bad_schedule_and_batch_values_are_named(item, fragment):
    with pytest.raises(ConfigError, match=fragment):
        resolve_config("imr", 10, "hide_prompt", 0, overrides={"train": item})


def test_hide_prompt_trains_at_the_official_global_batch():
    train = resolve_config("imr", 10, "hide_prompt", 0).train
    assert (train.batch_size, train.micro_batch_size) == (192, 24)
    assert train.lr == pytest.approx(0.03 * 24 / 256)  # scaled by the per-device batch only


class _BatchCoupled(torch.nn.Module):
    """A loss that is not a mean over samples (like HiDe's contrastive term): the logsumexp of
    all pairwise similarities of the batch."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(3, 4))

    def training_step(self, x, y, task, stage):
        f = x @ self.w
        return torch.logsumexp((f @ f.t()).flatten(), 0) + f.pow(2).mean()


@pytest.mark.parametrize("batch", [48, 21])  # a full batch, and a short last one
def test_micro_batches_average_gradients_as_ddp_does(batch):
    torch.manual_seed(0)
    model = _BatchCoupled()
    x, y = torch.randn(batch, 3), torch.zeros(batch, dtype=torch.long)
    train = TrainConfig(batch_size=48, micro_batch_size=12, optimizer="sgd", lr=1.0, momentum=0.0)
    task = Task(index=0, num_tasks=1, classes=range(1), train=train, device=torch.device("cpu"),
                make_loader=lambda **kw: None)
    # DDP on 4 devices: the sampler shards the batch, each device back-propagates its own mean
    # loss, the gradients are averaged
    shards = torch.tensor_split(torch.arange(batch), 4)
    grads = [torch.autograd.grad(model.training_step(x[s], y[s], task, Stage()), model.w)[0] for s in shards]
    expected = model.w.detach() - torch.stack(grads).mean(0)
    whole = torch.autograd.grad(model.training_step(x, y, task, Stage()), model.w)[0]
    assert not torch.allclose(whole, torch.stack(grads).mean(0), rtol=1e-3)  # the split matters
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    optimization_step(model, x, y, task, Stage(), optimizer, list(model.parameters()), contextlib.nullcontext)
    torch.testing.assert_close(model.w.detach(), expected, rtol=1e-6, atol=1e-6)
