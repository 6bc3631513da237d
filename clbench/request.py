"""A sweep's request, checked without torch: the names of its benchmarks and methods, its task
counts, seeds and ``--set`` grid, how each benchmark splits into tasks under each method's
recipe, and whether its data and weight files are there at all. It answers in a fraction of a
second, before the ~5 s of importing torch, from the registrations themselves: the benchmarks'
(``clbench.benchmarks``, importable without torch) and the methods' (their
``@register_method("name")`` decorators, read from the source of ``methods/`` without importing
it; a plugin's methods are registered when the plugin is imported). What needs torch (the
backbone against the image size, cached weights, the data's layout, the output folder) is
checked next, once every run's configuration is resolved (``clbench.plan``,
``clbench.preflight``).
"""
from __future__ import annotations

import argparse
import ast
import functools
import importlib.util
import sys
from pathlib import Path
from typing import Any, Mapping

from clbench.benchmarks import Benchmark, get_benchmark
from clbench.catalog import (
    SEED_MAX,
    absolute_benchmark,
    data_presence_problem,
    has_recipe,
    import_plugins,
    merged_layers,
    unknown_name,
)
from clbench.config import LOGGERS, expand_grid, parse_set
from clbench.errors import ConfigError, PlanError
from clbench.task import task_sizes

METHODS_DIR = Path(importlib.util.find_spec("clbench.methods").submodule_search_locations[0])


@functools.cache
def builtin_method_names() -> tuple[str, ...]:
    """The names the files of ``methods/`` register (``@register_method("name", ...)`` on a
    class), read from their source: the registrations themselves, without importing torch."""
    names = []
    for path in sorted(METHODS_DIR.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            for decorator in getattr(node, "decorator_list", []) if isinstance(node, ast.ClassDef) else []:
                call = decorator if isinstance(decorator, ast.Call) else None
                if (call is not None and getattr(call.func, "id", getattr(call.func, "attr", None)) == "register_method"
                        and call.args and isinstance(call.args[0], ast.Constant)):
                    names.append(call.args[0].value)
    return tuple(names)


def method_names() -> list[str]:
    """Every registered method: the built-in ones, and those registered at run time (a plugin's,
    whose import has imported the method registry)."""
    registry = sys.modules.get("clbench.methods.base")
    return sorted({*builtin_method_names(), *(getattr(registry, "METHODS", None) or {})})


def _sections(method: str | None, bench: Benchmark, num_tasks: int, overrides: Mapping[str, Any]) -> dict[str, Any]:
    """A run's merged configuration layers (``catalog.merged_layers``); ``method=None``: the
    benchmark's defaults and the overrides alone."""
    if method is None or not has_recipe(method):
        return merged_layers_without_recipe(bench, overrides)
    return merged_layers(method, bench, num_tasks, overrides)


def merged_layers_without_recipe(bench: Benchmark, overrides: Mapping[str, Any]) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for layer in (bench.defaults, overrides):
        for section, values in (layer or {}).items():
            merged.setdefault(section, {}).update(values or {})
    return merged


def check_request(benches: list[str], tasks: list[int] | None, methods: list[str] | None, seeds: list[int],
                  overrides: Mapping[str, Any] | None) -> list[str]:
    """Every problem of a sweep's request that the registrations show, one message each:
    unknown names, task counts and seeds out of range, a method without a recipe, a recipe
    layer with an unknown section, and task sizes that do not split a benchmark's classes."""
    problems: list[str] = []
    known_methods = method_names()
    method_list = list(methods) if methods else known_methods
    problems += [unknown_name("method", m, known_methods) for m in method_list if m not in known_methods]
    method_list = [m for m in method_list if m in known_methods]
    problems += [f"method '{m}' has no recipe: write benchmarks/recipes/{m}.yaml (a plugin: its own folder of "
                 f"recipes, clbench.catalog.add_recipe_dir), with at least the epochs and batch size it trains "
                 f"with" for m in method_list if not has_recipe(m)]
    method_list = [m for m in method_list if has_recipe(m)]
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
    for name in benches:
        try:
            bench = get_benchmark(name)  # ConfigError: an unknown name, a bad folder:PATH
        except ConfigError as err:
            problems.append(str(err))
            continue
        for n in [n for n in tasks or bench.default_tasks if n > 0]:
            splits: dict[tuple[Any, Any], list[str | None]] = {}
            for m in method_list or [None]:
                try:
                    data = _sections(m, bench, n, overrides or {}).get("data") or {}
                except ConfigError as err:
                    if str(err) not in problems:
                        problems.append(str(err))
                    continue
                splits.setdefault((data.get("initial_classes"), data.get("increment")), []).append(m)
            for (initial, increment), who in splits.items():
                try:
                    task_sizes(bench.num_classes, n, initial, increment)
                except ConfigError as err:
                    whose = "" if len(who) >= len(method_list) else f" ({', '.join(map(str, who))})"
                    problems.append(f"{name} with {n} tasks{whose}: {err}")
    return problems


def check_files(benches: list[str], tasks: list[int] | None, methods: list[str] | None,
                overrides: Mapping[str, Any] | None, data_root: str | None) -> list[str]:
    """What can be seen of a request's files without torch, each distinct setting once: a
    ``backbone.pretrained_path`` that does not exist, and a registered benchmark's folder that
    holds no data in any accepted layout (``catalog.data_presence_problem``). The layout's
    details, the backbone and cached weights are checked with torch (``clbench.preflight``)."""
    paths: dict[str, None] = {}
    data: dict[str, Benchmark] = {}
    for name in benches:
        try:
            bench = get_benchmark(name)  # ConfigError: an unknown name, a bad folder:PATH
        except ConfigError:
            continue  # check_request says so
        data.setdefault(name, bench)
        for n in tasks or bench.default_tasks:
            for m in [m for m in methods or method_names() if has_recipe(m)]:
                try:
                    backbone = _sections(m, bench, n, overrides or {}).get("backbone") or {}
                except ConfigError:
                    continue  # check_request says so
                if backbone.get("pretrained", True) and backbone.get("pretrained_path"):
                    paths[backbone["pretrained_path"]] = None
    problems = [f"backbone.pretrained_path '{Path(p).expanduser()}' does not exist" for p in paths
                if not Path(p).expanduser().exists()]
    for name, bench in data.items():
        problem = None if bench.location is not None else data_presence_problem(bench, data_root)
        if problem:
            problems.append(problem)
    return problems


def requested_methods(args: argparse.Namespace) -> list[str] | None:
    """``--methods`` as a list, or None for ``all``."""
    if args.methods == "all":
        return None
    return [m.strip() for m in args.methods.split(",") if m.strip()]


def joint_methods(args: argparse.Namespace, planned: list[str]) -> list[str]:
    """The methods whose joint-training run (every class at once, one task) ``--joint`` asks
    for: ``auto`` joint full fine-tuning, the usual upper bound, when the whole comparison is
    planned (``--methods all``) and none otherwise; ``all`` every planned method; ``none``; or a
    comma-separated list."""
    spec = getattr(args, "joint", "none").strip()
    if spec == "none":
        return []
    if spec == "auto":
        return ["full_ft"] if getattr(args, "methods", "all") == "all" and "full_ft" in planned else []
    if spec == "all":
        return list(planned)
    return [m.strip() for m in spec.split(",") if m.strip()]


def request_layers(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The override layers the sweep options describe: one per point of the ``--set`` grid
    (``key=v1,v2`` lists multiply), each with ``--backbone``, ``--pretrained-path`` and
    ``--eval-on`` applied."""
    layers = []
    for point in expand_grid(args.overrides):
        overrides = parse_set(point)
        if args.backbone:
            overrides.setdefault("backbone", {})["name"] = args.backbone
        if args.pretrained_path:
            overrides.setdefault("backbone", {})["pretrained_path"] = args.pretrained_path
        if getattr(args, "eval_on", None) and args.eval_on != "test":
            overrides.setdefault("data", {})["eval_on"] = args.eval_on
        layers.append(overrides)
    return layers


def check_args(args: argparse.Namespace) -> list[str]:
    """``check_request`` for the sweep options (``clbench.options.add_sweep_arguments``), every
    point of a ``--set`` grid."""
    known = method_names()
    problems = [f"--{name} {getattr(args, name)}: must be at least 1" for name in ("jobs", "threads")
                if isinstance(getattr(args, name, None), int) and getattr(args, name) < 1]
    problems += [f"--joint: {unknown_name('method', m, known)}" for m in joint_methods(args, []) if m not in known]
    problems += [f"--log {name}: unknown; use {', '.join(LOGGERS)}" for name in getattr(args, "log", None) or []
                 if name not in LOGGERS]
    try:
        points = expand_grid(args.overrides)
    except ConfigError as err:
        return problems + [str(err)]
    for point in points:  # every point of a --set grid is a plan of its own
        try:
            overrides = parse_set(point)
        except ConfigError as err:
            problems.append(str(err))
            continue
        for problem in check_request(args.bench, args.tasks, requested_methods(args), args.seeds, overrides):
            if problem not in problems:
                problems.append(problem)
    return problems


def checked(args: argparse.Namespace) -> None:
    """The request's torch-free checks, run once per parsed command line (marked on ``args``):
    import its plugins (their methods and benchmarks are checked like the built-in ones), make
    ``folder:PATH`` benchmarks absolute (a worker elsewhere reads the same folder), then
    ``check_args``; its problems are one ``PlanError``."""
    if getattr(args, "request_checked", False):
        return
    import_plugins(getattr(args, "plugins", None) or [])
    args.bench = [absolute_benchmark(b) for b in args.bench]
    problems = check_args(args)
    if problems:
        raise PlanError(problems)
    args.request_checked = True


def check_args_files(args: argparse.Namespace) -> list[str]:
    """``check_files`` for the sweep options, every point of a ``--set`` grid."""
    problems: list[str] = []
    for layer in request_layers(args):
        problems += [p for p in check_files(args.bench, args.tasks, requested_methods(args), layer, args.data_root)
                     if p not in problems]
    return problems
