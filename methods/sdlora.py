"""SD-LoRA (Wu et al., ICLR 2025): scalable decoupled LoRA, magnitudes over frozen directions.

At task t every adapted projection (Q and V of every block) applies

    W = W0 + sum_{k<t} alpha_k * B_k A_k / n_k  +  alpha_t * B_t A_t / n_t

with one magnitude ``alpha_k`` per task shared by all projections of all blocks. Trainable at
task t: the new pair (A_t, B_t), every magnitude alpha_0..alpha_t and the new head rows; W0 and
older pairs are frozen. Loss: cross-entropy over the current task's logits. One expanding
linear head. ``docs/methods/sdlora.md`` cites the official code this follows, file and line,
and lists every departure from it.

Two variants (``method.variant``), the official code's being the default:

=====================  ==================================  =====================================
                       ``official`` (released code)        ``paper`` (Eq. 3-4, Algorithm 1)
=====================  ==================================  =====================================
normaliser n_k         ``||B_k||_F * ||A_k||_F``           ``||B_k A_k||_F``
current term           not normalised while it trains      normalised
magnitudes             all re-created at 0.8 every task    new one at 1.0, earlier ones carried
optimiser              the recipe's (SGD, momentum 0.9)    Adam, ``paper_lr`` (0.008), constant
=====================  ==================================  =====================================

With ``paper``, B_t starts at zero, where B_t A_t / ||B_t A_t|| is undefined: a zero update
is divided by 1 (``lora.safe_norm``), so the first step is the unnormalised LoRA gradient and
every later step sees the normalised direction. ``variant: paper`` replaces the recipe's
optimiser, because the recipes hold the official code's SGD values; the task log records the
optimiser a task actually used.

Costs stay flat across tasks: the frozen pairs are stacked, so each projection's update is one
matmul for all earlier tasks plus one for the current pair, formed once per step in weight
space, whatever t (``methods/lora.py``). Inference uses a merged copy of the backbone, one
plain ViT forward per image.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from clbench.config import TrainConfig, one_of
from clbench.errors import ConfigError
from clbench.methods.base import HEAD_INITS, Stage, Task, masked_cross_entropy, register_method
from clbench.methods.lora import LoRAMethod, LoRAQKV, factor_sq_norms, product_sq_norms, safe_norm


@dataclass(frozen=True)
class VariantRules:
    normaliser: str  # "factors": ||B|| ||A||; "product": ||B A||
    normalise_current: bool
    init_magnitude: float
    carry_magnitudes: bool  # False: every magnitude is re-created at init_magnitude each task


VARIANTS = {
    # models/sdlora.py + backbone/lora.py of WuYichen-97/SD-Lora-CL (docs/methods/sdlora.md
    # §Magnitudes and directions, §Optimiser and schedule)
    "official": VariantRules("factors", normalise_current=False, init_magnitude=0.8, carry_magnitudes=False),
    # the paper's Eq. 3-4, Algorithm 1 and Sec. 4.1
    "paper": VariantRules("product", normalise_current=True, init_magnitude=1.0, carry_magnitudes=True),
}


def validate_rank_schedule(schedule: list[list[int]]) -> list[tuple[int, int]]:
    """``[[from_task, rank], ...]`` (0-indexed tasks, increasing, the first from task 0)."""
    fix = "write it as [[0, 10], [4, 8], [8, 6]]: [first task (0-indexed), rank] pairs"
    if not schedule or any(len(entry) != 2 for entry in schedule):
        raise ConfigError(f"method.rank_schedule {schedule!r} is malformed; {fix}")
    pairs = [(int(s), int(r)) for s, r in schedule]
    starts = [s for s, _ in pairs]
    if starts[0] != 0 or starts != sorted(set(starts)) or any(r < 1 for _, r in pairs):
        raise ConfigError(f"method.rank_schedule {schedule!r} must start at task 0, increase, and "
                          f"have ranks >= 1; {fix}")
    return pairs


@register_method("sdlora", title="SD-LoRA", paper_row=6, magnitudes="magnitudes")
class SDLoRA(LoRAMethod):
    @dataclass
    class Config:
        variant: str = one_of("official", tuple(VARIANTS))  # official | paper (see the module docstring)
        rank_schedule: list[list[int]] = field(default_factory=lambda: [[0, 10]])  # [from task, rank]
        projections: list[str] = field(default_factory=lambda: ["q", "v"])  # slices of timm's fused qkv
        init_magnitude: float | None = None  # None: the variant's (0.8 official, 1.0 paper)
        paper_lr: float = 0.008  # Adam's lr under variant: paper (Sec. 4.1)
        head_init: str = one_of("kaiming_linear", HEAD_INITS)  # PILOT's SimpleLinear (backbone/linears.py)

    def __init__(self, backbone: nn.Module, config: Config, num_classes: int, num_tasks: int):
        super().__init__(backbone, config, num_classes, num_tasks, config.projections)
        self.rules = VARIANTS[config.variant]
        self.rank_schedule = validate_rank_schedule(config.rank_schedule)
        self.init_magnitude = (config.init_magnitude if config.init_magnitude is not None
                               else self.rules.init_magnitude)
        for layer in self.layers:
            layer.coefficients = self.direction_coefficients
        # alpha_0..alpha_t as one vector, re-made one longer at each task: one leaf for autograd
        # and the optimizer whatever t (a list of scalars costs a gradient accumulation per task)
        self.magnitudes = nn.Parameter(torch.zeros(0))

    # -- the formula -----------------------------------------------------------------------------

    def rank_for_task(self, t: int) -> int:
        return [rank for start, rank in self.rank_schedule if start <= t][-1]

    def magnitude_vector(self) -> torch.Tensor:
        """The magnitude every task's direction is multiplied by, ``[tasks]``."""
        return self.magnitudes

    def direction_scales(self, layer: LoRAQKV, p: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``1 / n_k`` for every frozen rank row (of its task) and for the current pair (1 when
        the current term is not normalised): what turns ``B_k A_k`` into the direction that
        its magnitude multiplies. Frozen and current parts are computed apart, so the frozen
        rows cost no gradient bookkeeping."""
        a_old, b_old, old_task = layer.frozen_A(p), layer.frozen_B(p), layer.frozen_task
        a_cur, b_cur = layer.current_A[p], layer.current_B[p]
        factors = self.rules.normaliser == "factors"
        if factors:
            a_sq, b_sq = factor_sq_norms(a_old, b_old, old_task, layer.num_tasks)
            old_sq = a_sq * b_sq
        else:
            old_sq = product_sq_norms(a_old, b_old, old_task, layer.num_tasks)
        old_scale = safe_norm(old_sq).reciprocal()[old_task]
        if not self.rules.normalise_current:
            return old_scale, a_cur.new_ones(())
        cur_sq = (a_cur.pow(2).sum() * b_cur.pow(2).sum() if factors
                  else ((b_cur.t() @ b_cur) * (a_cur @ a_cur.t())).sum())
        return old_scale, safe_norm(cur_sq).reciprocal()

    def layer_magnitudes(self, layer: LoRAQKV, p: str) -> torch.Tensor:
        """The magnitudes ``[tasks]`` that projection ``p`` of ``layer`` applies: the shared
        ``magnitude_vector`` (SD-LoRA-KD's per-projection folds add to it)."""
        return self.magnitude_vector()

    def direction_coefficients(self, layer: LoRAQKV, p: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``alpha_k / n_k`` for every frozen rank row and for the current pair: what
        ``LoRAQKV`` multiplies the columns of ``B`` by."""
        magnitudes = self.layer_magnitudes(layer, p)
        old_scale, cur_scale = self.direction_scales(layer, p)
        return magnitudes[layer.frozen_task] * old_scale, magnitudes[layer.num_tasks - 1] * cur_scale

    # -- lifecycle -------------------------------------------------------------------------------

    def keep_previous_direction(self) -> bool:
        """Whether the previous task's pair joins the frozen directions (SD-LoRA-KD may drop it)."""
        return True

    def grow(self, task: Task) -> None:
        super().grow(task)
        keep = self.keep_previous_direction()
        for layer in self.layers:
            layer.add_task(self.rank_for_task(task.index), keep_previous=keep)
        new = torch.full((1,), self.init_magnitude, dtype=self.layers[0].weight.dtype,
                         device=self.layers[0].weight.device)
        self.magnitudes = nn.Parameter(torch.cat([self.magnitudes.detach().to(new), new]))

    def begin_task(self, task: Task) -> None:
        super().begin_task(task)
        if not self.rules.carry_magnitudes:  # the official code rebuilds every alpha at 0.8 each task
            with torch.no_grad():
                self.magnitudes.fill_(self.init_magnitude)

    def param_groups(self, task: Task, stage: Stage) -> list[dict[str, Any]]:
        # One group, one learning rate for LoRA, magnitudes and head (models/sdlora.py:95-118).
        return [{"params": self.trainable_lora() + [self.magnitudes] + self.head.task_parameters(task.index)}]

    def recipe(self, task: Task, stage: Stage) -> TrainConfig:
        if self.config.variant != "paper":
            return task.train
        return dataclasses.replace(task.train, optimizer="adam", lr=self.config.paper_lr,
                                   schedule="constant", weight_decay=0.0)

    def training_step(self, x: torch.Tensor, y: torch.Tensor, task: Task, stage: Stage) -> torch.Tensor:
        logits = self.head(self.backbone(x))
        return masked_cross_entropy(logits, y, task, "current")  # task 0: all logits are current

    # -- reporting -------------------------------------------------------------------------------

    def task_log(self, task: Task) -> dict[str, Any]:
        log = {"magnitudes": [float(m) for m in self.magnitude_vector().detach().cpu()],
               "rank": self.rank_for_task(task.index)}
        if self.config.variant == "paper":
            log["optimizer"] = f"adam lr={self.config.paper_lr:g} constant (variant: paper)"
        return log
