"""Class-incremental scenarios as data: a seeded class order cut into tasks.

Labels are remapped once, so that inside the harness class ``j`` is the ``j``-th class of the
order: task ``t`` owns the contiguous range ``[known, known + size)``. Methods never see the
dataset's own label ids; the result file records the order to map back.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from torch.utils.data import Dataset

from clbench.task import task_classes, task_sizes


def class_order(num_classes: int, seed: int | None) -> list[int]:
    """PILOT's (and SD-LoRA's) order: ``np.random.seed(seed); np.random.permutation(C)``.

    ``seed=None`` keeps the dataset's own order (what the JH-LEE-KR/HiDe/InfLoRA repos run).
    Uses a private ``RandomState`` seeded the same way, so the global numpy RNG is untouched.
    """
    if seed is None:
        return list(range(num_classes))
    return np.random.RandomState(seed).permutation(num_classes).tolist()


class RemappedSubset(Dataset):
    """The samples of ``base`` whose label is in ``keep``, with labels mapped through ``remap``."""

    def __init__(self, base: Dataset, targets: np.ndarray, keep: Sequence[int], remap: np.ndarray,
                 class_sorted: bool = False):
        """``class_sorted``: order the samples by their new label (stable: the dataset's order
        within a class), as PILOT's data manager concatenates its test set class by class."""
        self.base = base
        mask = np.isin(targets, np.asarray(keep))
        self.indices = np.flatnonzero(mask)
        self.targets = remap[targets[self.indices]]
        if class_sorted:
            by_class = np.argsort(self.targets, kind="stable")
            self.indices, self.targets = self.indices[by_class], self.targets[by_class]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        x, _ = self.base[int(self.indices[i])]
        return x, int(self.targets[i])


@dataclass
class Scenario:
    """A class-incremental split of a train and a test set."""

    train: Dataset
    test: Dataset
    train_targets: np.ndarray  # original label of every training sample
    test_targets: np.ndarray
    order: list[int]  # order[j] = original label of harness class j
    sizes: list[int]  # classes per task

    @classmethod
    def build(cls, train: Dataset, test: Dataset, num_classes: int, num_tasks: int,
              order_seed: int | None, initial: int | None = None,
              increment: int | None = None) -> "Scenario":
        return cls(train=train, test=test,
                   train_targets=np.asarray(train.targets), test_targets=np.asarray(test.targets),
                   order=class_order(num_classes, order_seed),
                   sizes=task_sizes(num_classes, num_tasks, initial, increment))

    @property
    def num_tasks(self) -> int:
        return len(self.sizes)

    @property
    def remap(self) -> np.ndarray:
        remap = np.full(max(self.order) + 1, -1, dtype=np.int64)
        remap[np.asarray(self.order)] = np.arange(len(self.order))
        return remap

    def task_range(self, t: int) -> range:
        return task_classes(self.sizes, t)

    def original_classes(self, t: int) -> list[int]:
        return [self.order[j] for j in self.task_range(t)]

    def train_subset(self, t: int) -> RemappedSubset:
        return RemappedSubset(self.train, self.train_targets, self.original_classes(t), self.remap)

    def test_subset(self, t: int, class_sorted: bool = False) -> RemappedSubset:
        """Task ``t``'s test samples, in the dataset's order or (``class_sorted``) class by class."""
        return RemappedSubset(self.test, self.test_targets, self.original_classes(t), self.remap, class_sorted)


def validation_split(targets: Sequence[int], fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, validation) of a stratified split of a training set: per class (in sorted
    order), a ``RandomState(seed)`` permutation of its sample indices, the first
    ``round(fraction * n)`` (at least one when the class has two or more samples, never all) to
    validation. Every task's classes are split alike, so each task's validation data is the same
    fraction of its training data. Independent of the run's training seed and of the class order:
    every method, configuration and seed is validated on the same images."""
    targets = np.asarray(targets)
    rng = np.random.RandomState(seed)
    train, val = [], []
    for y in np.unique(targets):
        members = np.flatnonzero(targets == y)
        n = len(members)
        n_val = min(max(int(np.floor(n * fraction + 0.5)), 1), n - 1) if n > 1 else 0
        chosen = rng.permutation(n)[:n_val]
        val.append(members[np.sort(chosen)])
        train.append(np.setdiff1d(members, members[chosen]))
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


class IndexedSubset(Dataset):
    """The samples ``indices`` of ``base``, with their ``targets`` (a Scenario needs them)."""

    def __init__(self, base: Dataset, indices: np.ndarray):
        self.base = base
        self.indices = np.asarray(indices)
        self.targets = np.asarray(base.targets)[self.indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        return self.base[int(self.indices[i])]
