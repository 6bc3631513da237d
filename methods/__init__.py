"""Continual-learning methods: ``base.py`` is the contract (``CLMethod``), every other module
registers one method (or holds shared blocks: ``lora.py``, ``prompts.py``, ``gaussian_stats.py``).
Importing this package imports every module in it, which registers its methods."""
import importlib
import pkgutil

from clbench.catalog import unknown_name
from clbench.errors import ConfigError
from clbench.methods.base import METHODS, CLMethod, CostReport, Stage, Task, register_method

for _info in pkgutil.iter_modules(__path__):
    if _info.name != "base":
        importlib.import_module(f"{__name__}.{_info.name}")


def get_method(name: str) -> type[CLMethod]:
    """The registered method class of that name."""
    if name not in METHODS:
        raise ConfigError(unknown_name("method", name, METHODS))
    return METHODS[name]


def ordered_methods(names: list[str]) -> list[str]:
    """Names in the paper's row order; methods outside the paper after them, by name."""
    def rank(name: str) -> tuple[float, str]:
        row = METHODS[name].info.paper_row if name in METHODS else None
        return (row if row is not None else float("inf"), name)

    return sorted(names, key=rank)


__all__ = ["METHODS", "CLMethod", "CostReport", "Stage", "Task", "get_method", "ordered_methods", "register_method"]
