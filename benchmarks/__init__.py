"""Class-incremental benchmarks. Every module in this package registers its benchmarks on import."""
import importlib
import pkgutil

from clbench.benchmarks.base import BENCHMARKS, Benchmark, get_benchmark, register_benchmark

for _info in pkgutil.iter_modules(__path__):
    if _info.name not in ("base", "scenario"):
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["BENCHMARKS", "Benchmark", "get_benchmark", "register_benchmark"]
