"""Continual-learning methods. Every module in this package registers its method on import."""
import importlib
import pkgutil

from methods.base import METHODS, CLMethod, CostReport, Stage, Task, get_method, register_method

for _info in pkgutil.iter_modules(__path__):
    if _info.name != "base":
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["METHODS", "CLMethod", "CostReport", "Stage", "Task", "get_method", "register_method"]
