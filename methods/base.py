"""The contract between the protocol (``clbench/protocol.py``) and a continual-learning method.

The protocol owns the loop; a method owns its math. For every task ``t`` the protocol calls
(``clbench.protocol.learn_task``, the one task loop, which ``clbench speed`` drives too)::

    method.grow(task)                    # add this task's components (head rows, LoRA, prompts)
    method.begin_task(task)              # data-dependent set-up (InfLoRA subspace, prompt copy)
    for stage in method.stages(task):    # usually one stage; HiDe-Prompt has several
        if the stage has epochs and parameters to train:
            optimizer, scheduler = method.configure_optimizers(task, stage)  # param_groups + recipe
            method.train()
            for epoch in range(stage.epochs):
                for x, y in task's training batches:
                    loss = method.training_step(x, y, task, stage); backward; clip; step
                scheduler.step()
    method.eval()
    method.end_task(task)                # merge, statistics, distillation (in eval mode)
    evaluate method.predict(x) on the test data of every class seen so far (in eval mode)
    checkpoint method.state_dict()

Labels are harness labels: task ``t`` owns classes ``task.classes`` = ``[task.known, task.num_seen)``
and ``predict`` returns logits over the ``task.num_seen`` classes seen so far.

``training_step`` returns the loss, a scalar tensor; nothing else. The module is in train mode
for ``training_step`` and in eval mode for ``end_task`` and ``predict``; a method that needs
train mode inside ``end_task`` (HiDe-Prompt's re-training) sets it there and restores it.

A method that trains nothing (a prototype classifier, say) returns no stages from ``stages``,
or stages with ``epochs=0`` (``train.epochs: 0`` in its recipe does the same for the default
stage): no optimizer is built, and ``begin_task``/``end_task`` do its work. Its cost report
then counts 0 trainable parameters.

Resuming: a fresh method is ``grow``-n through every finished task (structure only, no data)
and then ``load_state_dict``-ed. ``grow`` must therefore build exactly the parameters that
training will fill, and any non-tensor state belongs in ``get_extra_state``/``set_extra_state``
(the standard ``nn.Module`` hooks, saved inside ``state_dict``).

Adding a method = one file in ``methods/`` with a ``@register_method("name", title=...)`` class
and a ``Config`` dataclass, plus its recipe ``benchmarks/recipes/<name>.yaml``.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_ as timm_trunc_normal_

from clbench.config import TrainConfig, validate
from clbench.errors import ConfigError
from clbench.record import MethodInfo
from clbench.task import CostReport, Stage, Task

__all__ = ["CLMethod", "CostReport", "ExpandingLinear", "HEAD_INITS", "LaggedSchedule", "METHODS", "Stage", "Task", "build_optimizer",
           "masked_cross_entropy", "register_method"]


class CLMethod(nn.Module):
    """Base class of every method. Subclasses set ``Config`` and implement ``training_step``
    and ``predict``; the other hooks have sensible defaults.

    Constructor arguments: ``backbone`` is a timm ViT created with ``num_classes=0`` (its
    forward returns the pooled, normed [CLS] feature of size ``backbone.num_features``);
    ``config`` is an instance of ``Config``; ``num_classes`` and ``num_tasks`` describe the
    whole scenario.
    """

    Config: ClassVar[type] = None  # a dataclass of the method's hyper-parameters
    name: ClassVar[str] = ""  # set by @register_method, with ``info``
    info: ClassVar[MethodInfo]

    def __init__(self, backbone: nn.Module, config: Any, num_classes: int, num_tasks: int):
        super().__init__()
        if dataclasses.is_dataclass(config):
            validate(config, "method", num_tasks)  # for a Config built directly; resolve_config checked a run's
        self.backbone = backbone
        self.config = config
        self.num_classes = num_classes
        self.num_tasks = num_tasks
        self.feature_dim: int = backbone.num_features
        self.tasks_seen = 0  # tasks grown so far
        # Names of the pretrained weights: what the cost report does not count as "stored".
        self._pretrained_names = {n for n, _ in backbone.named_parameters()}

    # -- lifecycle --------------------------------------------------------------------------

    def grow(self, task: Task) -> None:
        """Add this task's components. Structure only: no data, called again on resume."""
        self.tasks_seen = task.index + 1

    def begin_task(self, task: Task) -> None:
        """Data-dependent preparation before training (may iterate ``task.batches()``)."""

    def stages(self, task: Task) -> list[Stage]:
        """Training phases of this task; each gets its own optimizer and epochs. An empty list (or
        stages with no epochs) trains nothing."""
        return [Stage()]

    def param_groups(self, task: Task, stage: Stage) -> list[dict[str, Any]]:
        """Parameters to optimise in this stage; default: everything with ``requires_grad``."""
        return [{"params": [p for p in self.parameters() if p.requires_grad]}]

    def recipe(self, task: Task, stage: Stage) -> TrainConfig:
        """The optimizer recipe of this stage; default: the task's. Override to give a stage or a
        variant its own optimizer, learning rate or schedule."""
        return task.train

    def configure_optimizers(self, task: Task, stage: Stage):
        """A fresh optimizer and per-epoch LR scheduler for this stage, from ``recipe``."""
        groups = [g for g in self.param_groups(task, stage) if g["params"]]
        epochs = stage.epochs if stage.epochs is not None else task.train.epochs
        return build_optimizer(groups, self.recipe(task, stage), epochs)

    def training_step(self, x: torch.Tensor, y: torch.Tensor, task: Task, stage: Stage) -> torch.Tensor:
        """The loss of one batch (harness labels), a scalar tensor. The protocol does
        backward/clip/step. Called in train mode."""
        raise NotImplementedError

    def end_task(self, task: Task) -> None:
        """After training: merge, store statistics, distil. Runs in eval mode, before evaluation."""

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Logits over the classes seen so far, ``[B, num_seen]``, in eval mode. One image's
        prediction must not depend on the other images of the batch."""
        raise NotImplementedError

    # -- reporting ----------------------------------------------------------------------------

    def backbone_passes(self) -> int:
        """Full backbone forwards per test image (2 for query-then-prompt methods)."""
        return 1

    def stored_features(self) -> int:
        """Floats of data statistics kept between tasks (0 for rehearsal-free methods)."""
        return 0

    def stored_params(self) -> int:
        """Parameters the method keeps beyond the frozen pretrained backbone."""
        total = 0
        for name, p in self.named_parameters():
            pretrained = name.startswith("backbone.") and name[len("backbone."):] in self._pretrained_names
            if not pretrained or p.requires_grad:
                total += p.numel()
        return total

    def cost_report(self, task: Task, trainable_params: int) -> CostReport:
        """``trainable_params`` is what the protocol counted in this task's optimizers."""
        return CostReport(trainable_params=trainable_params, stored_params=self.stored_params(),
                          stored_features=self.stored_features(),
                          backbone_passes=self.backbone_passes())

    def task_log(self, task: Task) -> dict[str, Any]:
        """Method-specific facts about this task for the result file (e.g. learned magnitudes)."""
        return {}

    # -- helpers for subclasses -----------------------------------------------------------------

    def freeze_backbone(self) -> None:
        for p in self.backbone.parameters():
            p.requires_grad_(False)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The backbone's pooled feature (final-norm [CLS] for a timm ViT)."""
        return self.backbone(x)


# ------------------------------------------------------------------------------ shared pieces


HEAD_INITS = ("kaiming_linear", "trunc_normal", "torch_linear")


def init_head_rows(weight: torch.Tensor, bias: torch.Tensor | None, init: str) -> None:
    """Initialise new head rows in place as an official code's head starts (``HEAD_INITS``):

    * ``kaiming_linear``: PILOT's ``SimpleLinear`` (SD-LoRA): kaiming-uniform weights with
      ``nonlinearity='linear'``, zero bias;
    * ``trunc_normal``: timm's ViT head (``init_weights_vit_timm``; the L2P, DualPrompt and
      HiDe-Prompt codes): timm's ``trunc_normal_(std=0.02)``, whose bounds of +-2 are absolute
      (so in effect a normal with std 0.02), zero bias;
    * ``torch_linear``: ``nn.Linear``'s own ``reset_parameters`` (CODA-Prompt's ``last``,
      PILOT's CODA port, InfLoRA's ``classifier_pool``): kaiming-uniform with ``a = sqrt(5)``,
      bias uniform in ``+-1/sqrt(fan_in)``.

    Rows are drawn independently in every scheme, so a head grown task by task has the
    distribution of the official head created whole."""
    if init == "kaiming_linear":
        nn.init.kaiming_uniform_(weight, nonlinearity="linear")
        if bias is not None:
            nn.init.zeros_(bias)
    elif init == "trunc_normal":
        timm_trunc_normal_(weight, std=0.02)  # timm's draw; its bounds are +-2 absolute, 100 std
        if bias is not None:
            nn.init.zeros_(bias)
    elif init == "torch_linear":
        nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
        if bias is not None:
            bound = 1 / math.sqrt(weight.shape[1])
            nn.init.uniform_(bias, -bound, bound)
    else:
        raise ConfigError(f"method.head_init '{init}' is unknown; use one of {list(HEAD_INITS)}")


class ExpandingLinear(nn.Module):
    """A linear classifier that gains rows as tasks arrive (PILOT's ``SimpleLinear``/``update_fc``).

    Rows of earlier tasks are kept; new rows are initialised by ``init`` (``init_head_rows``; by
    default PILOT's: kaiming-uniform weights with ``nonlinearity='linear'``, zero bias). Stored
    as one parameter per task so that old rows can be frozen or left out of the optimizer
    without masking gradients.
    """

    def __init__(self, in_features: int, bias: bool = True, init: str = "kaiming_linear"):
        super().__init__()
        if init not in HEAD_INITS:
            raise ConfigError(f"method.head_init '{init}' is unknown; use one of {list(HEAD_INITS)}")
        self.in_features = in_features
        self.use_bias = bias
        self.init = init
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()

    @property
    def out_features(self) -> int:
        return sum(w.shape[0] for w in self.weights)

    def grow(self, num_new: int, freeze_old: bool = False) -> None:
        """Add ``num_new`` rows; ``freeze_old`` stops the earlier rows from training."""
        if freeze_old:
            self.requires_grad_(False)
        ref = self.weights[0] if len(self.weights) else None
        w = torch.empty(num_new, self.in_features,
                        device=ref.device if ref is not None else None,
                        dtype=ref.dtype if ref is not None else None)
        b = torch.empty(num_new, device=w.device, dtype=w.dtype) if self.use_bias else None
        init_head_rows(w, b, self.init)
        self.weights.append(nn.Parameter(w))
        if b is not None:
            self.biases.append(nn.Parameter(b))

    def task_parameters(self, t: int) -> list[nn.Parameter]:
        return [self.weights[t]] + ([self.biases[t]] if self.use_bias else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = torch.cat(list(self.weights), 0)
        b = torch.cat(list(self.biases), 0) if self.use_bias else None
        return F.linear(x, w, b)


def masked_cross_entropy(logits: torch.Tensor, y: torch.Tensor, task: Task,
                         mode: str = "current") -> torch.Tensor:
    """Cross-entropy restricted to a label range: ``current`` = this task's classes only
    (SD-LoRA, InfLoRA, CODA's mask of previous tasks), ``seen`` = every class so far."""
    if mode == "seen":
        return F.cross_entropy(logits[:, : task.num_seen], y)
    if mode == "current":
        return F.cross_entropy(logits[:, task.known: task.num_seen], y - task.known)
    raise ValueError(f"unknown loss mask '{mode}' (expected 'current' or 'seen')")


class LaggedSchedule:
    """A per-epoch scheduler held back ``offset`` epochs: its first ``offset`` ``step()`` calls are
    ignored, so epoch ``e`` trains at the wrapped schedule's ``lr(max(e - offset, 0))``.

    This is how the official codes' schedulers behave with ``offset=1``: CODA-Prompt's
    ``CosineSchedule`` (also InfLoRA's and PILOT's copies) calls ``step(0)`` in its constructor and
    then resets ``last_epoch`` to -1, so its first ``step()`` sets lr(0) again; timm's schedulers,
    stepped with ``step(epoch)`` after epoch ``epoch`` (HiDe-Prompt), set lr(epoch) for epoch
    ``epoch + 1``. Either way the first two epochs train at lr(0).
    """

    def __init__(self, scheduler: Any, offset: int):
        self.scheduler = scheduler
        self.offset = offset
        self.skipped = 0

    def step(self) -> None:
        if self.skipped < self.offset:
            self.skipped += 1
        else:
            self.scheduler.step()

    def get_last_lr(self) -> list[float]:
        return self.scheduler.get_last_lr()


def build_optimizer(groups: list[dict[str, Any]], train: TrainConfig, epochs: int):
    """The optimizer and per-epoch scheduler a recipe names. Groups may carry their own ``lr``.
    The scheduler is stepped once after every epoch; ``train.schedule_offset`` holds it back
    (``LaggedSchedule``). No schedule (``constant``) gives ``None``."""
    name = train.optimizer.lower()
    if name == "sgd":
        opt = torch.optim.SGD(groups, lr=train.lr, momentum=train.momentum, weight_decay=train.weight_decay)
    elif name == "adam":
        opt = torch.optim.Adam(groups, lr=train.lr, betas=tuple(train.betas), weight_decay=train.weight_decay)
    elif name == "adamw":
        opt = torch.optim.AdamW(groups, lr=train.lr, betas=tuple(train.betas), weight_decay=train.weight_decay)
    else:
        raise ValueError(f"unknown optimizer '{train.optimizer}' (sgd, adam, adamw)")
    sched = train.schedule.lower()
    if sched == "constant":
        scheduler = None
    elif sched == "multistep":
        scheduler = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=train.milestones, gamma=train.lr_decay)
    elif sched == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(epochs, 1), eta_min=train.min_lr)
    elif sched == "coda_cosine":
        # CODA-Prompt's utils/schedulers.py: lr_e = lr * cos(99π e / (200 (K-1))), ends near 0.0157 lr.
        k = max(epochs, 2)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda e: math.cos(99 * math.pi * e / (200 * (k - 1))))
    else:
        raise ValueError(f"unknown schedule '{train.schedule}' (constant, multistep, cosine, coda_cosine)")
    if scheduler is not None and train.schedule_offset:
        scheduler = LaggedSchedule(scheduler, train.schedule_offset)
    return opt, scheduler


# ------------------------------------------------------------------------------ registry

METHODS: dict[str, type[CLMethod]] = {}


def register_method(name: str, *, title: str = "", paper_row: int | None = None,
                    magnitudes: str | None = None) -> Callable[[type[CLMethod]], type[CLMethod]]:
    """Class decorator: ``@register_method("sdlora", title="SD-LoRA", paper_row=6)`` makes the
    method available by name, with its facts for tables and figures: ``title`` as the tables
    write it (default: the name), ``paper_row`` its row in the paper's tables (None: after
    them, by name), ``magnitudes`` the ``task_log`` key of learned magnitudes to plot. They
    travel in every result file (``method_info``), so a report needs no registry."""

    def wrap(cls: type[CLMethod]) -> type[CLMethod]:
        if name in METHODS:
            raise ValueError(f"method '{name}' is registered twice")
        if cls.Config is None:
            raise TypeError(f"{cls.__name__} must define a Config dataclass")
        cls.name = name
        cls.info = MethodInfo(name, title, paper_row, magnitudes)
        METHODS[name] = cls
        return cls

    return wrap
