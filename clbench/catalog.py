"""What the command line can know without importing torch: the built-in benchmarks' facts, the
method names (every method has a recipe file), and the checks a sweep's request can pass or fail
on those facts alone.

``benchmarks/datasets.py`` and ``benchmarks/synth.py`` register their benchmarks from
``BUILTIN_BENCHMARKS``, so the class counts and default task counts have one source. The checks
here run before the registries are imported (about 5 s of torch, torchvision, timm and sklearn),
so a bad plan fails at once; names not found here (a benchmark registered at run time, like the
tests' ``toy``) are left to the same checks run again on the full registry.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Collection, Mapping, Protocol, Sequence

import yaml

from clbench.config import LOGGERS, deep_merge, expand_grid, parse_set
from clbench.errors import ConfigError, did_you_mean
from clbench.task import task_sizes

SEED_MAX = 2**32 - 1  # numpy's and torch's seeds are unsigned 32-bit integers


@dataclass(frozen=True)
class BenchmarkFacts:
    """A benchmark's torch-free facts: what a plan is checked against."""

    name: str  # short name used on the command line
    title: str  # as the paper's tables write it
    num_classes: int
    default_tasks: list[int]
    image_size: int = 224

    def fields(self) -> dict[str, Any]:
        """These facts as ``Benchmark`` keyword arguments."""
        return {"name": self.name, "title": self.title, "num_classes": self.num_classes,
                "default_tasks": list(self.default_tasks), "image_size": self.image_size}


BUILTIN_BENCHMARKS: dict[str, BenchmarkFacts] = {b.name: b for b in (
    BenchmarkFacts("imr", "ImageNet-R", 200, [5, 10, 20]),
    BenchmarkFacts("ima", "ImageNet-A", 200, [10]),
    BenchmarkFacts("dn", "DomainNet", 345, [5]),
    BenchmarkFacts("c100", "CIFAR-100", 100, [10]),
    BenchmarkFacts("cub", "CUB-200", 200, [10]),
    BenchmarkFacts("synth", "Synthetic", 60, [5, 10], image_size=32),  # 60 classes: 5, 10 or 20 tasks
)}


class HasBenchmarkFacts(Protocol):
    """``BenchmarkFacts`` or a registered ``Benchmark``: what the checks read."""

    num_classes: int
    default_tasks: list[int]


# The recipes are data of the benchmarks package; found without importing it (that imports torch).
RECIPE_DIR = Path(importlib.util.find_spec("clbench.benchmarks").submodule_search_locations[0]) / "recipes"
# Further folders of recipes, added by plugins (``add_recipe_dir``); searched after RECIPE_DIR.
PLUGIN_RECIPE_DIRS: list[Path] = []


def _recipe_dirs() -> list[Path]:
    return [RECIPE_DIR, *PLUGIN_RECIPE_DIRS]


def add_recipe_dir(folder: str | Path) -> None:
    """Make the ``<method>.yaml`` recipes in ``folder`` known: what a plugin that registers a
    method calls (``clbench --plugins``), so its method plans like a built-in one."""
    folder = Path(folder).resolve()
    if folder not in PLUGIN_RECIPE_DIRS:
        PLUGIN_RECIPE_DIRS.append(folder)


def _recipe_path(method: str) -> Path | None:
    return next((d / f"{method}.yaml" for d in _recipe_dirs() if (d / f"{method}.yaml").exists()), None)


def method_names() -> list[str]:
    """Every method's name: each has a recipe ``<method>.yaml`` (``benchmarks/recipes/``, or a
    plugin's folder)."""
    return sorted({p.stem for d in _recipe_dirs() for p in d.glob("*.yaml")})


def load_recipe(method: str, _chain: tuple[str, ...] = ()) -> dict[str, Any]:
    """A method's recipe. ``extends: <method>`` starts from that method's recipe and merges this
    file's sections over it (a variant states only what differs from its base)."""
    path = _recipe_path(method)
    if path is None:
        raise ConfigError(f"no recipe for method '{method}': expected {RECIPE_DIR / f'{method}.yaml'}"
                          + (" or one in a plugin's recipe folder" if PLUGIN_RECIPE_DIRS else ""))
    with open(path) as f:
        recipe = yaml.safe_load(f) or {}
    if not isinstance(recipe, dict):
        raise ConfigError(f"{path}: a recipe is a mapping of sections (default, <bench>, <bench>@<N>)")
    base = recipe.pop("extends", None)
    if base is None:
        return recipe
    if base in (method, *_chain):
        raise ConfigError(f"{path}: 'extends: {base}' makes a cycle ({' -> '.join((*_chain, method, base))})")
    return deep_merge(load_recipe(base, (*_chain, method)), recipe)


def unknown_name(kind: str, name: str, choices: Collection[str]) -> str:
    """The message for an unknown method or benchmark: the closest name and every valid one."""
    return f"unknown {kind} '{name}'{did_you_mean(name, choices)}; known: {', '.join(sorted(choices))}"


def unique_seeds(seeds: list[int]) -> tuple[list[int], list[int]]:
    """The seeds in their order without repeats, and the repeated ones."""
    kept: list[int] = []
    repeated: list[int] = []
    for s in seeds:
        (repeated if s in kept else kept).append(s)
    return kept, repeated


def _data_section(methods: list[str], bench: str, num_tasks: int,
                  overrides: Mapping[str, Any]) -> dict[str | None, tuple[Any, Any]]:
    """``data.initial_classes``/``data.increment`` as the recipes and ``--set`` give them, per method
    (``None`` where nothing sets them): the layers of ``clbench.recipes.resolve_config``. With no
    method, ``--set`` alone (under the key None)."""
    data: dict[str | None, tuple[Any, Any]] = {}
    for m in methods or [None]:
        recipe = load_recipe(m) if m and _recipe_path(m) else {}  # none: resolving says so
        merged: dict[str, Any] = {}
        for layer in (recipe.get("default", {}), recipe.get(bench, {}), recipe.get(f"{bench}@{num_tasks}", {}),
                      overrides):
            merged.update((layer or {}).get("data", {}) or {})
        data[m] = (merged.get("initial_classes"), merged.get("increment"))
    return data


def check_request(benches: list[str], tasks: list[int] | None, methods: list[str] | None, seeds: list[int],
                  overrides: Mapping[str, Any] | None, benchmarks: Mapping[str, HasBenchmarkFacts],
                  known_methods: Collection[str], complete: bool) -> list[str]:
    """Every problem of a sweep's request that these facts show, one message each.

    ``benchmarks``/``known_methods``: the names to check against; with ``complete=False`` a
    benchmark not among them is not a problem here (it may be registered at run time; the full
    registry is checked later)."""
    problems: list[str] = []
    method_list = list(methods) if methods else sorted(known_methods)
    unknown_methods = [m for m in method_list if m not in known_methods]
    problems += [unknown_name("method", m, known_methods) for m in unknown_methods]
    method_list = [m for m in method_list if m in known_methods]
    if not benches:
        problems.append("--bench names no benchmark")
    if tasks is not None and not tasks:
        problems.append("--tasks names no number of tasks")
    if methods is not None and not methods:
        problems.append("--methods names no method (or 'all')")
    if not seeds:
        problems.append("--seeds names no seed")
    bad_seeds = [s for s in seeds if not 0 <= s <= SEED_MAX]
    if bad_seeds:
        problems.append(f"seed(s) {', '.join(map(str, bad_seeds))} out of range: a seed is an integer "
                        f"from 0 to 2**32 - 1")
    for n in [n for n in tasks or [] if n <= 0]:
        problems.append(f"--tasks {n}: the number of tasks must be positive")
    for bench in benches:
        if bench.startswith(FOLDER_PREFIX) and bench not in benchmarks:
            try:
                facts = folder_facts(bench)
            except ConfigError as err:
                problems.append(str(err))
                continue
        elif bench not in benchmarks:
            if complete:
                problems.append(unknown_name("benchmark", bench, benchmarks))
            continue
        else:
            facts = benchmarks[bench]
        for n in [n for n in tasks or facts.default_tasks if n > 0]:
            splits: dict[tuple[Any, Any], list[str | None]] = {}
            for m, sizes in _data_section(method_list, bench, n, overrides or {}).items():
                splits.setdefault(sizes, []).append(m)
            for (initial, increment), who in splits.items():
                try:
                    task_sizes(facts.num_classes, n, initial, increment)
                except ConfigError as err:
                    whose = "" if len(who) >= len(method_list) else f" ({', '.join(map(str, who))})"
                    problems.append(f"{bench} with {n} tasks{whose}: {err}")
    return problems


def requested_methods(args: argparse.Namespace) -> list[str] | None:
    """``--methods`` as a list, or None for ``all``."""
    if args.methods == "all":
        return None
    return [m.strip() for m in args.methods.split(",") if m.strip()]


def check_args(args: argparse.Namespace, benchmarks: Mapping[str, HasBenchmarkFacts],
               known_methods: Collection[str], complete: bool) -> list[str]:
    """``check_request`` for the sweep options (``clbench.options.add_sweep_arguments``)."""
    problems = [f"--{name} {getattr(args, name)}: must be at least 1" for name in ("jobs", "threads")
                if getattr(args, name, None) is not None and getattr(args, name) < 1]
    problems += [f"--log {name}: unknown; use {', '.join(LOGGERS)}" for name in getattr(args, "log", None) or []
                 if name not in LOGGERS]
    try:
        points = expand_grid(args.overrides)
    except ConfigError as err:
        return problems + [str(err)]
    for point in points:  # every point of a --set grid is a plan of its own
        for problem in check_request(args.bench, args.tasks, requested_methods(args), args.seeds, parse_set(point),
                                     benchmarks, known_methods, complete):
            if problem not in problems:
                problems.append(problem)
    return problems


# ----------------------------------------------------------------------------- your own data

FOLDER_PREFIX = "folder:"  # --bench folder:PATH, a benchmark made from a folder of class folders


def folder_layout(path: Path) -> tuple[Path, list[str]]:
    """A folder benchmark's class folders: those of ``path/train`` when ``path`` has ``train/``
    and ``test/``, else ``path``'s own sub-folders (split once; ``benchmarks.datasets.load_folder``)."""
    where = path / "train" if (path / "train").is_dir() and (path / "test").is_dir() else path
    try:
        classes = sorted(e.name for e in os.scandir(where) if e.is_dir() and not e.name.startswith("."))
    except OSError:
        classes = []
    return where, classes


def folder_facts(name: str) -> BenchmarkFacts:
    """The facts of ``folder:PATH`` from the folder itself: one class per class folder; by
    default as many tasks as the first of 10, 5, 4, 2 that divides the classes (else one);
    images at 224 pixels, the ViTs' size (``--set data.image_size=N`` for another)."""
    path = Path(name[len(FOLDER_PREFIX):]).expanduser()
    if not path.is_dir():
        raise ConfigError(f"--bench {name}: {path} is not a folder; give a folder with train/<class>/* and "
                          f"test/<class>/*, or one of class folders <class>/*")
    where, classes = folder_layout(path)
    if len(classes) < 2:
        raise ConfigError(f"--bench {name}: found {len(classes)} class folder(s) in {where}; a benchmark needs at "
                          f"least 2 (a folder per class, its images inside)")
    tasks = next((n for n in (10, 5, 4, 2) if len(classes) % n == 0 and n < len(classes)), 1)
    return BenchmarkFacts(name, path.name, len(classes), [tasks])


def absolute_benchmark(name: str) -> str:
    """``folder:PATH`` with PATH absolute (a worker elsewhere reads the same folder); other names as given."""
    if not name.startswith(FOLDER_PREFIX):
        return name
    return FOLDER_PREFIX + str(Path(name[len(FOLDER_PREFIX):]).expanduser().resolve())


# ----------------------------------------------------------------------------- plugins

_PLUGIN_FILES: dict[str, Any] = {}  # a .py plugin imported from its path, by resolved path


def import_plugins(names: Sequence[str]) -> None:
    """Import each plugin: a module name on ``sys.path`` or a ``.py`` file. A plugin registers
    methods (``@register_method`` and ``add_recipe_dir``) or benchmarks (``register_benchmark``)
    when imported; importing one twice does nothing."""
    for name in names:
        if name.endswith(".py"):
            path = str(Path(name).expanduser().resolve())
            if path in _PLUGIN_FILES:
                continue
            if not Path(path).is_file():
                raise ConfigError(f"--plugins {name}: no such file")
            spec = importlib.util.spec_from_file_location(f"clbench_plugin_{Path(path).stem}", path)
            module = importlib.util.module_from_spec(spec)
            _PLUGIN_FILES[path] = module
            sys.modules[spec.name] = module
            spec.loader.exec_module(module)
        else:
            try:
                importlib.import_module(name)
            except ModuleNotFoundError as err:
                if err.name != name.split(".")[0] and err.name != name:
                    raise
                raise ConfigError(f"--plugins {name}: no module of that name on the path (install it, add its "
                                  f"folder to PYTHONPATH, or give its .py file)") from err
