"""SD-LoRA (Wu et al., ICLR 2025): scalable decoupled LoRA, magnitudes over frozen directions.

At task t every adapted projection (Q and V of every block) applies

    W = W0 + sum_{k<t} alpha_k * B_k A_k / n_k  +  alpha_t * B_t A_t / n_t

with one magnitude ``alpha_k`` per task shared by all projections of all blocks. Trainable at
task t: the new pair (A_t, B_t), every magnitude alpha_0..alpha_t and the new head rows; W0 and
older pairs are frozen. Loss: cross-entropy over the current task's logits. One expanding
linear head. See ``specs/sdlora.md`` for the official code this follows, line by line.

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

Costs stay flat across tasks: the frozen pairs are stacked and the update is one matmul per
projection per step (``methods/lora.py``). Inference uses a merged copy of the backbone, one
plain ViT forward per image.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from harness.config import ConfigError
from methods.base import Stage, Task, build_optimizer, masked_cross_entropy, register_method
from methods.lora import LoRAMethod, factor_sq_norms, product_sq_norms, safe_norm


@dataclass(frozen=True)
class VariantRules:
    normaliser: str  # "factors": ||B|| ||A||; "product": ||B A||
    normalise_current: bool
    init_magnitude: float
    carry_magnitudes: bool  # False: every magnitude is re-created at init_magnitude each task


VARIANTS = {
    # models/sdlora.py + backbone/lora.py of WuYichen-97/SD-Lora-CL (specs/sdlora.md §2, §6)
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


@register_method("sdlora")
class SDLoRA(LoRAMethod):
    @dataclass
    class Config:
        variant: str = "official"  # official | paper (see the module docstring)
        rank_schedule: list[list[int]] = field(default_factory=lambda: [[0, 10]])  # [from task, rank]
        projections: list[str] = field(default_factory=lambda: ["q", "v"])  # slices of timm's fused qkv
        init_magnitude: float | None = None  # None: the variant's (0.8 official, 1.0 paper)
        paper_lr: float = 0.008  # Adam's lr under variant: paper (Sec. 4.1)

    def __init__(self, backbone: nn.Module, config: Config, num_classes: int, num_tasks: int):
        if config.variant not in VARIANTS:
            raise ConfigError(f"method.variant '{config.variant}' is unknown; use one of {sorted(VARIANTS)}")
        super().__init__(backbone, config, num_classes, num_tasks, config.projections)
        self.rules = VARIANTS[config.variant]
        self.rank_schedule = validate_rank_schedule(config.rank_schedule)
        self.init_magnitude = (config.init_magnitude if config.init_magnitude is not None
                               else self.rules.init_magnitude)
        for layer in self.layers:
            layer.coefficients = self.direction_coefficients
        self.magnitudes = nn.ParameterList()  # alpha_k, one 0-dim parameter per task

    # -- the formula -----------------------------------------------------------------------------

    def rank_for_task(self, t: int) -> int:
        return [rank for start, rank in self.rank_schedule if start <= t][-1]

    def magnitude_vector(self) -> torch.Tensor:
        """The magnitude every task's direction is multiplied by, ``[tasks]``."""
        return torch.stack(list(self.magnitudes))

    def direction_scales(self, a: torch.Tensor, b: torch.Tensor, row_task: torch.Tensor,
                         num_tasks: int) -> torch.Tensor:
        """Per rank row, ``1 / n_k`` of its task (1 for the current task when it is not
        normalised): what turns ``B_k A_k`` into the direction its magnitude multiplies."""
        if self.rules.normaliser == "factors":
            a_sq, b_sq = factor_sq_norms(a, b, row_task, num_tasks)
            norms = safe_norm(a_sq * b_sq)
        else:
            norms = safe_norm(product_sq_norms(a, b, row_task, num_tasks))
        if not self.rules.normalise_current:
            norms = torch.cat([norms[:-1], norms.new_ones(1)])
        return norms.reciprocal()[row_task]

    def direction_coefficients(self, a: torch.Tensor, b: torch.Tensor, row_task: torch.Tensor,
                               num_tasks: int) -> torch.Tensor:
        """Per rank row, ``alpha_k / n_k``: what ``LoRAQKV`` multiplies ``B``'s columns by."""
        return self.magnitude_vector()[row_task] * self.direction_scales(a, b, row_task, num_tasks)

    # -- lifecycle -------------------------------------------------------------------------------

    def keep_previous_direction(self) -> bool:
        """Whether the previous task's pair joins the frozen directions (SD-LoRA-KD may drop it)."""
        return True

    def grow(self, task: Task) -> None:
        super().grow(task)
        keep = self.keep_previous_direction()
        for layer in self.layers:
            layer.add_task(self.rank_for_task(task.index), keep_previous=keep)
        ref = self.layers[0].weight
        self.magnitudes.append(nn.Parameter(torch.tensor(self.init_magnitude, dtype=ref.dtype, device=ref.device)))

    def begin_task(self, task: Task) -> None:
        super().begin_task(task)
        if not self.rules.carry_magnitudes:  # the official code rebuilds every alpha at 0.8 each task
            with torch.no_grad():
                for alpha in self.magnitudes:
                    alpha.fill_(self.init_magnitude)

    def param_groups(self, task: Task, stage: Stage) -> list[dict[str, Any]]:
        # One group, one learning rate for LoRA, magnitudes and head (models/sdlora.py:95-118).
        return [{"params": self.trainable_lora() + list(self.magnitudes) + self.head.task_parameters(task.index)}]

    def configure_optimizers(self, task: Task, stage: Stage):
        if self.config.variant != "paper":
            return super().configure_optimizers(task, stage)
        paper = dataclasses.replace(task.train, optimizer="adam", lr=self.config.paper_lr,
                                    schedule="constant", weight_decay=0.0)
        return build_optimizer(self.param_groups(task, stage), paper, paper.epochs)

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
