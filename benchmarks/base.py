"""The benchmark registry: one ``Benchmark`` entry per dataset, looked up by short name."""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from torch.utils.data import Dataset
from torchvision import transforms as T

from clbench.catalog import data_dir

# load(data_dir, train_transform, test_transform, splits_dir) -> (train, test).
# Both datasets yield (image tensor, original label) and expose ``.targets`` (original labels).
# ``splits_dir`` is where a loader may write a split it had to make (raw ImageNet-R's 80/20).
Loader = Callable[[Path, Callable, Callable, Path], "tuple[Dataset, Dataset]"]


@dataclass
class Benchmark:
    name: str  # short name used on the command line: imr, ima, dn, c100, cub, synth
    title: str  # as the paper's tables write it
    num_classes: int
    default_tasks: list[int]
    load: Loader
    folder: str  # default sub-folder of the data root
    source: str = ""  # where the data is published; shown when it is missing
    image_size: int = 224
    # A configuration layer applied before the recipe's benchmark section (e.g. synth's backbone).
    defaults: dict[str, Any] = field(default_factory=dict)
    # None: the common pipeline below (docs/methods/README.md §Input pipeline)
    train_transform: Callable[[int], Callable] | None = None
    test_transform: Callable[[int], Callable] | None = None
    location: str | None = None  # the data's own folder (``folder:PATH``); the data root is then ignored

    def data_dir(self, root: str | os.PathLike | None) -> Path:
        """The benchmark's folder: its ``location`` if it has one, else ``root/folder`` when that
        exists, else ``root`` itself."""
        if self.location is not None:
            return Path(self.location)
        return data_dir(self.folder, root)

    def transforms(self, image_size: int | None = None) -> tuple[Callable, Callable]:
        size = image_size or self.image_size
        train = (self.train_transform or default_train_transform)(size)
        test = (self.test_transform or default_test_transform)(size)
        return train, test


def default_train_transform(size: int) -> Callable:
    """All official repositories: RandomResizedCrop(scale 0.05–1) + flip, inputs in [0, 1]."""
    return T.Compose([T.RandomResizedCrop(size, scale=(0.05, 1.0), ratio=(3 / 4, 4 / 3)),
                      T.RandomHorizontalFlip(), T.ToTensor()])


def default_test_transform(size: int) -> Callable:
    """Resize 256 (bicubic) then centre crop 224, scaled for other sizes."""
    return T.Compose([T.Resize(int(round(size * 256 / 224)), interpolation=T.InterpolationMode.BICUBIC),
                      T.CenterCrop(size), T.ToTensor()])


BENCHMARKS: dict[str, Benchmark] = {}
# Benchmarks named ``<kind>:<argument>`` (``folder:/data/birds``), made on first use by the
# factory of their kind, so that a worker that only has the run's configuration makes the same one.
BENCHMARK_FACTORIES: dict[str, Callable[[str], Benchmark]] = {}


def with_transform(dataset: Dataset, transform: Callable, otherwise: Callable[[], Dataset]) -> Dataset:
    """The same samples under another transform: a shallow copy with its ``transform`` swapped,
    or ``otherwise()`` for a dataset that has no ``transform`` attribute."""
    if not hasattr(dataset, "transform"):
        return otherwise()
    other = copy.copy(dataset)
    other.transform = transform
    return other


def register_benchmark(benchmark: Benchmark) -> Benchmark:
    if benchmark.name in BENCHMARKS:
        raise ValueError(f"benchmark '{benchmark.name}' is registered twice")
    BENCHMARKS[benchmark.name] = benchmark
    return benchmark


def get_benchmark(name: str) -> Benchmark:
    kind, colon, argument = name.partition(":")
    if name not in BENCHMARKS and colon and kind in BENCHMARK_FACTORIES:
        BENCHMARKS[name] = BENCHMARK_FACTORIES[kind](argument)
    if name not in BENCHMARKS:
        raise KeyError(f"unknown benchmark '{name}'; registered: {', '.join(sorted(BENCHMARKS))}")
    return BENCHMARKS[name]
