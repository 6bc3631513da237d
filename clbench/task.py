"""What the protocol and a method share about a task: ``Task`` (what a method may know of the
current task), ``Stage`` (one training phase of it) and ``CostReport`` (what a method costs, in
the paper's Table 5 terms). Plain data, no torch at import: the contract itself is in
``clbench.methods.base``."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator

from clbench import stopping
from clbench.config import TrainConfig
from clbench.errors import ConfigError

if TYPE_CHECKING:
    import torch
    from torch.utils.data import DataLoader


@dataclass
class Stage:
    """One training phase of a task. ``epochs=None`` takes the recipe's epochs for this task."""

    name: str = "train"
    epochs: int | None = None


@dataclass
class CostReport:
    """What a method costs, in the paper's Table 5 terms (see ``CLMethod.cost_report``)."""

    trainable_params: int  # parameters updated while learning this task
    stored_params: int  # parameters kept beyond the frozen pretrained backbone, in total
    stored_features: int = 0  # floats of data statistics kept (HiDe-Prompt's class centroids)
    backbone_passes: int = 1  # full ViT forwards per test image
    flops_per_image: int | None = None  # measured by the protocol with torch's FLOP counter
    dropped_tasks: int | None = None  # tasks whose new parameters were discarded (SD-LoRA-KD); None: never

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class Task:
    """What a method may know about the current task. Only this task's training data is reachable."""

    index: int
    num_tasks: int
    classes: range  # harness labels of this task
    train: TrainConfig  # the recipe with task-0 overrides applied
    device: torch.device
    make_loader: Callable[..., DataLoader] = field(repr=False)
    autocast: Callable[[], contextlib.AbstractContextManager] = field(
        default=contextlib.nullcontext, repr=False)

    @property
    def known(self) -> int:
        """Classes learned before this task."""
        return self.classes.start

    @property
    def num_seen(self) -> int:
        """Classes seen so far, this task's included."""
        return self.classes.stop

    @property
    def num_new(self) -> int:
        return len(self.classes)

    def loader(self, augment: bool = True, shuffle: bool = True, batch_size: int | None = None,
               drop_last: bool | None = None) -> DataLoader:
        """A DataLoader over this task's training data (CPU tensors, harness labels)."""
        return self.make_loader(augment=augment, shuffle=shuffle, batch_size=batch_size,
                                drop_last=drop_last)

    def batches(self, augment: bool = False, shuffle: bool = False,
                batch_size: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This task's training data on the device, by default un-augmented and in order:
        what a pass for statistics (InfLoRA's input moments, HiDe's class centroids) wants."""
        for x, y in self.loader(augment=augment, shuffle=shuffle, batch_size=batch_size,
                                drop_last=False):
            stopping.check()  # a method's own pass is a training loop too: a safe point per batch
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)


def task_classes(sizes: list[int], t: int) -> range:
    """The harness labels of task ``t`` in a scenario whose tasks have these ``sizes``."""
    start = sum(sizes[:t])
    return range(start, start + sizes[t])


def task_sizes(num_classes: int, num_tasks: int, initial: int | None = None,
               increment: int | None = None) -> list[int]:
    """Class counts per task: N equal tasks, or ``initial`` then ``increment`` per task.
    ``ConfigError`` (a ``ValueError``) says why a split is impossible and how to fix it."""
    if num_tasks <= 0:
        raise ConfigError(f"the number of tasks must be positive, got {num_tasks}")
    if initial is None and increment is None:
        if num_classes % num_tasks:
            raise ConfigError(f"{num_classes} classes do not split into {num_tasks} equal tasks; "
                              f"set data.initial_classes and data.increment")
        return [num_classes // num_tasks] * num_tasks
    initial = initial if initial is not None else increment
    increment = increment if increment is not None else initial
    if initial <= 0 or increment <= 0:
        raise ConfigError(f"data.initial_classes ({initial}) and data.increment ({increment}) must be positive")
    sizes = [initial] + [increment] * (num_tasks - 1)
    if sum(sizes) > num_classes:
        raise ConfigError(f"initial={initial} + {num_tasks - 1}×{increment} classes exceeds the "
                          f"benchmark's {num_classes} classes")
    return sizes
