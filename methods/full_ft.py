"""Sequential full fine-tuning: every backbone weight plus an expanding linear head.

The lower bound of the paper's tables. No official ImageNet-R recipe exists
(docs/methods/full_ft.md §Sources); the closest official code is CODA-Prompt's ``NormalNN`` (plain
cross-entropy over the seen classes, the default here) and ``FinetunePlus`` ("FT++",
previous tasks' logits masked out of the loss: ``mask_old_logits: true``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from clbench.config import one_of
from clbench.methods.base import (
    HEAD_INITS,
    CLMethod,
    ExpandingLinear,
    Stage,
    Task,
    masked_cross_entropy,
    register_method,
)


@register_method("full_ft", title="Full Fine-Tuning", paper_row=0)
class FullFineTuning(CLMethod):
    @dataclass
    class Config:
        mask_old_logits: bool = False  # CODA-Prompt's FT++: CE over the current task's logits only
        head_init: str = one_of("torch_linear", HEAD_INITS)  # CODA's nn.Linear head (models/zoo.py:374)

    def __init__(self, backbone, config: Config, num_classes: int, num_tasks: int):
        super().__init__(backbone, config, num_classes, num_tasks)
        self.head = ExpandingLinear(self.feature_dim, init=config.head_init)

    def grow(self, task: Task) -> None:
        super().grow(task)
        self.head.grow(task.num_new)

    def training_step(self, x: torch.Tensor, y: torch.Tensor, task: Task, stage: Stage) -> torch.Tensor:
        logits = self.head(self.features(x))
        return masked_cross_entropy(logits, y, task, "current" if self.config.mask_old_logits else "seen")

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))
