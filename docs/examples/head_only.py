"""Head only: a frozen pre-trained backbone and a linear head that grows with every task."""
from dataclasses import dataclass

import torch

from clbench.methods.base import CLMethod, ExpandingLinear, Stage, Task, masked_cross_entropy, register_method


@register_method("head_only", title="Head Only")  # its name on the command line, its title in tables
class HeadOnly(CLMethod):
    @dataclass
    class Config:  # the recipe's `method:` section fills it; an unknown key is an error
        freeze_old_rows: bool = True

    def __init__(self, backbone, config: Config, num_classes: int, num_tasks: int):
        super().__init__(backbone, config, num_classes, num_tasks)
        self.freeze_backbone()
        self.head = ExpandingLinear(self.feature_dim)

    def grow(self, task: Task) -> None:  # this task's parameters, no data: a resumed run replays it
        super().grow(task)
        self.head.grow(task.num_new, freeze_old=self.config.freeze_old_rows)

    def training_step(self, x: torch.Tensor, y: torch.Tensor, task: Task, stage: Stage) -> torch.Tensor:
        return masked_cross_entropy(self.head(self.features(x)), y, task, "current")  # this task's classes

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:  # logits over every class seen so far
        return self.head(self.features(x))
