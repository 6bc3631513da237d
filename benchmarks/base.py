"""The benchmark registry: one ``Benchmark`` entry per dataset, looked up by short name.

A registration is the one home of a benchmark's facts: its name and title, class count, default
task counts, image size, the folder it lives in and the layouts accepted there, where the data
is published, the configuration layer it brings (synth's own backbone), and the benchmark it
stands in for. This module and the registrations (``clbench.benchmarks.builtin``) import no
torch, so the command line checks a plan against them at once. The loader and the transforms
may be named as ``"module:function"`` strings: the module (which imports torch) is imported
when the benchmark's data is first loaded.
"""
from __future__ import annotations

import functools
import importlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from clbench.catalog import FOLDER_PREFIX, data_dir, folder_layout, unknown_name
from clbench.errors import ConfigError

# load(data_dir, train_transform, test_transform, splits_dir) -> (train, test): two torch
# Datasets that yield (image tensor, original label) and expose ``.targets`` (original labels).
# ``splits_dir`` is where a loader may write a split it had to make (raw ImageNet-R's 80/20).
Loader = Callable[[Path, Callable, Callable, Path], Any]


class Lazy:
    """``"module:attribute"``, imported on the first call and then called: a registration can
    name a loader or a transform without importing torch."""

    def __init__(self, target: str):
        self.target = target

    @functools.cached_property
    def resolved(self) -> Callable:
        module, _, attribute = self.target.partition(":")
        return getattr(importlib.import_module(module), attribute)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.resolved(*args, **kwargs)

    def __repr__(self) -> str:
        return f"Lazy({self.target!r})"


def _callable(value: Callable | str | None) -> Callable | None:
    return Lazy(value) if isinstance(value, str) else value


@dataclass
class Benchmark:
    name: str  # short name used on the command line: imr, ima, dn, c100, cub, synth
    title: str  # as the paper's tables write it
    num_classes: int
    default_tasks: list[int]
    load: Loader | str  # a function, or "module:function" imported on first use
    folder: str = ""  # default sub-folder of the data root
    source: str = ""  # where the data is published; shown when it is missing
    layouts: str = ""  # tree diagram of the accepted layouts, shown when the data is missing or malformed
    # Entries of the benchmark's folder of which at least one is there in every accepted layout
    # (fnmatch patterns; a trailing "/" matches a folder): the torch-free check that the data is
    # there at all (``clbench.catalog.data_presence_problem``). None: nothing on disk to check.
    markers: tuple[str, ...] | None = None
    image_size: int = 224
    # A configuration layer applied before the recipe's benchmark section (e.g. synth's backbone).
    defaults: dict[str, Any] = field(default_factory=dict)
    # None: the common pipeline (benchmarks/transforms.py; docs/methods/README.md §Input pipeline)
    train_transform: Callable[[int], Callable] | str | None = None
    test_transform: Callable[[int], Callable] | str | None = None
    location: str | None = None  # the data's own folder (``folder:PATH``); the data root is then ignored
    # The benchmark whose published numbers this one is compared with (synth stands in for
    # ImageNet-R: the report ranks its methods against the paper's ImageNet-R order).
    stands_in_for: str | None = None
    # Training and test images of the real benchmark (None: unknown until loaded): what a
    # forecast of a run's time scales to when it was measured on other data.
    num_images: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        self.load = _callable(self.load)
        self.train_transform = _callable(self.train_transform)
        self.test_transform = _callable(self.test_transform)

    @property
    def backbone(self) -> str | None:
        """The benchmark's own backbone (its ``defaults``), or None: the recipe's."""
        return (self.defaults.get("backbone") or {}).get("name")

    def data_dir(self, root: str | os.PathLike | None) -> Path:
        """The benchmark's folder: its ``location`` if it has one, else ``root/folder`` when that
        exists, else ``root`` itself."""
        if self.location is not None:
            return Path(self.location)
        return data_dir(self.folder, root)

    def transforms(self, image_size: int | None = None) -> tuple[Callable, Callable]:
        size = image_size or self.image_size
        train = (self.train_transform or Lazy("clbench.benchmarks.transforms:default_train_transform"))(size)
        test = (self.test_transform or Lazy("clbench.benchmarks.transforms:default_test_transform"))(size)
        return train, test


BENCHMARKS: dict[str, Benchmark] = {}
# Benchmarks named ``<kind>:<argument>`` (``folder:/data/birds``), made on first use by the
# factory of their kind, so that a worker that only has the run's configuration makes the same one.
BENCHMARK_FACTORIES: dict[str, Callable[[str], Benchmark]] = {}


def register_benchmark(benchmark: Benchmark) -> Benchmark:
    if benchmark.name in BENCHMARKS:
        raise ValueError(f"benchmark '{benchmark.name}' is registered twice")
    BENCHMARKS[benchmark.name] = benchmark
    return benchmark


def get_benchmark(name: str) -> Benchmark:
    """The registered benchmark of that name, or the one its kind's factory makes
    (``folder:PATH``); ``ConfigError`` for an unknown name."""
    kind, colon, argument = name.partition(":")
    if name not in BENCHMARKS and colon and kind in BENCHMARK_FACTORIES:
        BENCHMARKS[name] = BENCHMARK_FACTORIES[kind](argument)
    if name not in BENCHMARKS:
        raise ConfigError(unknown_name("benchmark", name, BENCHMARKS))
    return BENCHMARKS[name]


def folder_benchmark(path: str) -> Benchmark:
    """``--bench folder:PATH``, a benchmark made from a folder of class folders: one class per
    class folder (``PATH/train/<class>`` with ``PATH/test/<class>``, or ``PATH/<class>`` split
    once); by default as many tasks as the first of 10, 5, 4, 2 that divides the classes (else
    one); images at 224 pixels, the ViTs' size (``--set data.image_size=N`` for another)."""
    where = Path(path).expanduser()
    name = FOLDER_PREFIX + path
    if not where.is_dir():
        raise ConfigError(f"--bench {name}: {where} is not a folder; give a folder with train/<class>/* and "
                          f"test/<class>/*, or one of class folders <class>/*")
    classes_in, classes = folder_layout(where)
    if len(classes) < 2:
        raise ConfigError(f"--bench {name}: found {len(classes)} class folder(s) in {classes_in}; a benchmark needs "
                          f"at least 2 (a folder per class, its images inside)")
    tasks = next((n for n in (10, 5, 4, 2) if len(classes) % n == 0 and n < len(classes)), 1)
    return Benchmark(name, where.name, len(classes), [tasks], folder=where.name, source="your own images",
                     location=path, load=functools.partial(Lazy("clbench.benchmarks.datasets:load_folder"),
                                                           num_classes=len(classes)))


BENCHMARK_FACTORIES["folder"] = folder_benchmark
