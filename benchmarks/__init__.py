"""Class-incremental benchmarks.

Importing this package imports no torch: it holds the registry (``base.py``) and the built-in
registrations (``builtin.py``). The modules that load data (``datasets.py``, ``synth.py``) import
torch; a benchmark's loader imports its module on first use, and ``import_all`` imports every
module of the package, for what they register as they are imported (synth's ViT with timm)."""
import importlib
import pkgutil

from clbench.benchmarks import builtin  # noqa: F401  (registers the built-in benchmarks)
from clbench.benchmarks.base import BENCHMARKS, Benchmark, get_benchmark, register_benchmark


def import_all() -> None:
    """Import every module of the package (they import torch); what needs a registered
    benchmark's backbone before its data is loaded (creating ``vit_synth_patch8_32``) calls it."""
    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")


__all__ = ["BENCHMARKS", "Benchmark", "get_benchmark", "import_all", "register_benchmark"]
