"""A run's configuration, resolved from the method's recipe, the benchmark and the command line.

A run's configuration is layered, later layers winning:

1. dataclass defaults (``clbench.config``, and the method's own ``Config`` dataclass);
2. ``default:`` section of the method's recipe ``benchmarks/recipes/<method>.yaml``;
3. the benchmark's own defaults (for example ``synth`` brings its small backbone);
4. the recipe's ``<bench>:`` section, then ``<bench>@<N>:`` for an N-specific recipe;
5. ``--backbone``/``--pretrained-path``/``--set key=value`` from the command line.

Every key is validated against the dataclasses (the method's keys against its ``Config``) when
the run is resolved, so a typo fails at planning time, before any job is launched.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any

from clbench.benchmarks import get_benchmark
from clbench.catalog import load_recipe
from clbench.config import (
    SECTIONS,
    RunConfig,
    build_dataclass,
    deep_merge,
    overrides_tag,
    update_dataclass,
    without_execution_settings,
)
from clbench.errors import ConfigError, did_you_mean
from clbench.methods import get_method


def resolve_config(benchmark: str, num_tasks: int, method: str, seed: int,
                   class_order_seed: int | None = None, overrides: dict[str, Any] | None = None,
                   device: str = "auto") -> RunConfig:
    """Resolve one run's full configuration (see the module docstring for the layering)."""
    bench = get_benchmark(benchmark)
    method_cls = get_method(method)
    recipe = load_recipe(method)
    layers = [recipe.get("default", {}), bench.defaults, recipe.get(benchmark, {}),
              recipe.get(f"{benchmark}@{num_tasks}", {}), overrides or {}]
    merged: dict[str, Any] = {}
    for i, layer in enumerate(layers):
        for section in layer:
            if section not in SECTIONS:
                raise ConfigError(
                    f"unknown section '{section}'{did_you_mean(section, SECTIONS)} in the configuration "
                    f"of {method} on {benchmark} "
                    f"(layer {i}); valid sections: {', '.join(SECTIONS)}")
        deep_merge(merged, json.loads(json.dumps(layer)))  # deep copy
    run = RunConfig(benchmark=benchmark, num_tasks=num_tasks, method=method, seed=seed,
                    class_order_seed=seed if class_order_seed is None else class_order_seed,
                    device=device)
    update_dataclass(run.backbone, merged.get("backbone", {}), "backbone")
    update_dataclass(run.train, merged.get("train", {}), "train")
    run.train.validate()
    update_dataclass(run.data, merged.get("data", {}), "data")
    run.method_args = dataclasses.asdict(build_dataclass(method_cls.Config, merged.get("method", {}), "method"))
    run.tag = overrides_tag(overrides)  # command-line overrides that change the numbers: a run of its own
    if run.tag:
        run.overrides = without_execution_settings(overrides or {})  # what the tag stands for: its label
    return run
