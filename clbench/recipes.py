"""A run's configuration, resolved from the method's recipe, the benchmark and the command line.

A run's configuration is layered, later layers winning (``clbench.catalog.merged_layers``, the
one resolver of the layers, which the torch-free plan checks read too):

1. dataclass defaults (``clbench.config``, and the method's own ``Config`` dataclass);
2. ``default:`` section of the method's recipe ``benchmarks/recipes/<method>.yaml``;
3. the benchmark's own defaults (for example ``synth`` brings its small backbone);
4. the recipe's ``<bench>:`` section, then ``<bench>@<N>:`` for an N-specific recipe;
5. ``--backbone``/``--pretrained-path``/``--set key=value`` from the command line.

Every key is validated against the dataclasses (the method's keys against its ``Config``), and
then every section validates itself (``clbench.config.validate``: its values and their
relations), when the run is resolved, so a bad configuration fails at planning time, before
any job is launched.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from clbench.benchmarks import get_benchmark
from clbench.catalog import merged_layers
from clbench.config import (
    RunConfig,
    build_dataclass,
    overrides_tag,
    update_dataclass,
    validate,
    without_execution_settings,
)
from clbench.methods import get_method


def resolve_config(benchmark: str, num_tasks: int, method: str, seed: int,
                   class_order_seed: int | None = None, overrides: dict[str, Any] | None = None,
                   device: str = "auto") -> RunConfig:
    """Resolve one run's full configuration (see the module docstring for the layering)."""
    bench = get_benchmark(benchmark)
    method_cls = get_method(method)
    merged = merged_layers(method, bench, num_tasks, overrides)
    run = RunConfig(benchmark=benchmark, num_tasks=num_tasks, method=method, seed=seed,
                    class_order_seed=seed if class_order_seed is None else class_order_seed,
                    device=device)
    for section in ("backbone", "train", "data"):
        update_dataclass(getattr(run, section), merged.get(section, {}), section)
        validate(getattr(run, section), section, num_tasks)
    method_config = build_dataclass(method_cls.Config, merged.get("method", {}), "method")
    validate(method_config, "method", num_tasks)
    run.method_args = dataclasses.asdict(method_config)
    run.tag = overrides_tag(overrides)  # command-line overrides that change the numbers: a run of its own
    if run.tag:
        run.overrides = without_execution_settings(overrides or {})  # what the tag stands for: its label
    return run
