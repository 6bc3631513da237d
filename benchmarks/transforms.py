"""The image pipelines every built-in benchmark shares (a benchmark may name its own), and
``with_transform``."""
from __future__ import annotations

import copy
from typing import Callable

from torch.utils.data import Dataset
from torchvision import transforms as T


def default_train_transform(size: int) -> Callable:
    """PILOT's ``build_transform`` (SD-LoRA's), also the L2P/DualPrompt ports' and HiDe-Prompt's:
    RandomResizedCrop(scale 0.05–1) + flip, inputs in [0, 1]. CODA-Prompt and InfLoRA crop with
    torchvision's default scale (docs/methods/README.md §Input pipeline)."""
    return T.Compose([T.RandomResizedCrop(size, scale=(0.05, 1.0), ratio=(3 / 4, 4 / 3)),
                      T.RandomHorizontalFlip(), T.ToTensor()])


def default_test_transform(size: int) -> Callable:
    """Resize 256 (bicubic) then centre crop 224, scaled for other sizes."""
    return T.Compose([T.Resize(int(round(size * 256 / 224)), interpolation=T.InterpolationMode.BICUBIC),
                      T.CenterCrop(size), T.ToTensor()])


def with_transform(dataset: Dataset, transform: Callable, otherwise: Callable[[], Dataset]) -> Dataset:
    """The same samples under another transform: a shallow copy with its ``transform`` swapped,
    or ``otherwise()`` for a dataset that has no ``transform`` attribute."""
    if not hasattr(dataset, "transform"):
        return otherwise()
    other = copy.copy(dataset)
    other.transform = transform
    return other
