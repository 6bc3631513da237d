"""SimpleCIL: the training-free floor of pre-trained-model class-incremental learning.

Zhou et al., "Revisiting Class-Incremental Learning with Pre-Trained Models: Generalizability
and Adaptivity are All You Need" (2023); official code ``zhoudw-zdw/RevisitingCIL`` (also
``LAMDA-CL/RevisitingCIL``), ``models/simplecil.py``. As there:

* the pre-trained backbone stays frozen and nothing is trained (no optimizer is built);
* after each task, each new class's prototype is the mean pooled feature of its training
  images under the *test* transform (the official ``train_dataset_for_protonet``, ``mode="test"``);
  here ``task.batches()``, the task's training data un-augmented;
* a test image's logits are the cosine similarities between its feature and every seen class's
  prototype (the official ``CosineLinear`` with its scale ``sigma`` left at 1; a scale would not
  change the prediction).

Prototypes are computed in float32 from per-class sums (equal to the official per-class
``mean(0)`` up to float rounding). Its cost row: 0 trainable parameters, 0 stored parameters, and
``classes × feature size`` stored floats (the prototypes).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from clbench.errors import DataError
from clbench.methods.base import CLMethod, Stage, Task, register_method


@register_method("simplecil", title="SimpleCIL")
class SimpleCIL(CLMethod):
    @dataclass
    class Config:
        pass  # no hyper-parameters: the backbone's features decide

    def __init__(self, backbone, config: Config, num_classes: int, num_tasks: int):
        super().__init__(backbone, config, num_classes, num_tasks)
        self.freeze_backbone()
        self.register_buffer("prototypes", torch.zeros(num_classes, self.feature_dim))
        self.num_seen = 0

    def grow(self, task: Task) -> None:
        super().grow(task)
        self.num_seen = task.num_seen

    def stages(self, task: Task) -> list[Stage]:
        return []  # nothing to train

    @torch.no_grad()
    def end_task(self, task: Task) -> None:
        sums = torch.zeros(task.num_new, self.feature_dim, device=task.device)
        counts = torch.zeros(task.num_new, device=task.device)
        for x, y in task.batches(batch_size=task.train.eval_batch_size):
            with task.autocast():
                feats = self.features(x)
            index = y - task.known
            sums.index_add_(0, index, feats.float())
            counts.index_add_(0, index, torch.ones_like(index, dtype=counts.dtype))
        if (counts == 0).any():
            empty = [task.known + int(i) for i in torch.nonzero(counts == 0).flatten()]
            raise DataError(f"task {task.index}: classes {empty} have no training images, so no prototype")
        self.prototypes[task.classes.start:task.classes.stop] = sums / counts[:, None]

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        feats = F.normalize(self.features(x).float(), dim=1)
        return feats @ F.normalize(self.prototypes[: self.num_seen], dim=1).T

    def stored_features(self) -> int:
        return self.num_seen * self.feature_dim
