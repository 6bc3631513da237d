"""The SD-LoRA paper's reported numbers (``results/paper/*.yaml``) as pandas tables.

Accuracy tables (2, 3, 4, 6) list, per benchmark and N, one row per method (or per ablation
variant) with ``acc`` and ``aaa`` given as ``[mean, spread]`` or as a bare mean where the paper's
spread was not transcribed. The cost table (5) lists GFLOPs, learnable and stored-feature
millions per method. Every file is validated on load: a typo is an error naming the file.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

import clbench.paper as paper_numbers
from clbench.request import method_names

# The paper's numbers are data: the repository's results/paper/, installed as clbench.paper.
PAPER_DIR = Path(paper_numbers.__file__).resolve().parent
ACCURACY_METRICS = ("acc", "aaa")
COST_FIELDS = ("gflops", "learnable_params_m", "stored_features_m")


class PaperDataError(ValueError):
    """A malformed file under results/paper/; the message names the file and the entry."""


@dataclass
class Variant:
    """How a row of the paper maps onto our runs: a method plus the options that select it.
    ``method_args=None``: no option implements it yet; ``{}``: the recipe's untagged runs."""

    row: str
    label: str
    method: str
    method_args: dict[str, Any] | None

    def matches(self, method: str, tag: str, method_args: dict[str, Any] | None) -> bool:
        if method != self.method or self.method_args is None:
            return False
        if not self.method_args:
            return not tag
        args = method_args or {}
        return all(args.get(k) == v for k, v in self.method_args.items())


@dataclass
class PaperNumbers:
    """``accuracy``: one row per (table, benchmark, num_tasks, row, metric) with ``mean`` and
    ``spread`` (NaN where not given); ``cost``: one row per (benchmark, num_tasks, method);
    ``variants``: every paper row by name (a method's own name for the main tables)."""

    accuracy: pd.DataFrame
    cost: pd.DataFrame
    variants: dict[str, Variant]
    spread_kind: dict[int, str]  # table -> 'sem' | 'std'
    runs: dict[int, int]  # table -> number of runs behind its means

    def lookup(self, benchmark: str, num_tasks: int, method: str, tag: str = "",
               method_args: dict[str, Any] | None = None) -> pd.DataFrame:
        """The paper's entries for one of our groups (all tables and matching variants)."""
        rows = [name for name, v in self.variants.items() if v.matches(method, tag, method_args)]
        a = self.accuracy
        return a[(a["benchmark"] == benchmark) & (a["num_tasks"] == num_tasks) & a["row"].isin(rows)]


def _fail(path: Path, where: str, problem: str) -> PaperDataError:
    return PaperDataError(f"{path.name}: {where}: {problem}")


def _entry(path: Path, where: str, value: Any) -> tuple[float, float]:
    """``[mean, spread]`` or a bare mean -> (mean, spread or NaN)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value), float("nan")
    if (isinstance(value, list) and len(value) == 2
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
        return float(value[0]), float(value[1])
    raise _fail(path, where, f"expected a number or [mean, spread], got {value!r}")


def _known_methods() -> set[str]:
    """The names a paper's row may name: the registered methods (``clbench.request.method_names``)."""
    return set(method_names())


def _check_keys(path: Path, where: str, d: Any, required: set[str], optional: set[str] = frozenset()) -> None:
    if not isinstance(d, dict):
        raise _fail(path, where, f"expected a mapping, got {type(d).__name__}")
    missing, unknown = required - set(d), set(d) - required - set(optional)
    if missing:
        raise _fail(path, where, f"missing key(s) {', '.join(sorted(missing))}")
    if unknown:
        raise _fail(path, where, f"unknown key(s) {', '.join(sorted(unknown))}; "
                                 f"valid: {', '.join(sorted(required | set(optional)))}")


def load_paper(directory: Path = PAPER_DIR) -> PaperNumbers:
    """Read and validate every ``*.yaml`` under ``directory``."""
    methods = _known_methods()
    accuracy, cost = [], []
    variants = {m: Variant(m, m, m, {}) for m in methods}
    spread_kind, runs = {}, {}
    files = sorted(Path(directory).glob("*.yaml"))
    if not files:
        raise PaperDataError(f"no paper tables (*.yaml) under {directory}")
    for path in files:
        doc = yaml.safe_load(path.read_text())
        if not isinstance(doc, dict) or "table" not in doc:
            raise _fail(path, "top level", "expected a mapping with a 'table' number")
        table = int(doc["table"])
        if "results" not in doc:  # the cost table: one benchmark, one N, rows of cost fields
            _check_keys(path, "top level", doc, {"table", "title", "benchmark", "num_tasks", "rows"})
            for method, entry in doc["rows"].items():
                if method not in methods:
                    raise _fail(path, f"row '{method}'", f"unknown method; known: {', '.join(sorted(methods))}")
                _check_keys(path, f"row '{method}'", entry, set(COST_FIELDS))
                cost.append({"table": table, "benchmark": doc["benchmark"], "num_tasks": int(doc["num_tasks"]),
                             "method": method, **{k: float(entry[k]) for k in COST_FIELDS}})
            continue
        _check_keys(path, "top level", doc, {"table", "title", "runs", "spread", "metrics", "results"},
                    {"variants"})
        if doc["spread"] not in ("sem", "std"):
            raise _fail(path, "spread", f"must be 'sem' or 'std', got {doc['spread']!r}")
        spread_kind[table], runs[table] = doc["spread"], int(doc["runs"])
        for name, v in (doc.get("variants") or {}).items():
            _check_keys(path, f"variant '{name}'", v, {"label", "method", "method_args"}, {"description"})
            if v["method"] not in methods:
                raise _fail(path, f"variant '{name}'", f"unknown method '{v['method']}'")
            variants[name] = Variant(name, v["label"], v["method"], v["method_args"])
        for block in doc["results"]:
            _check_keys(path, "results entry", block, {"benchmark", "num_tasks", "rows"})
            for row, entry in block["rows"].items():
                where = f"{block['benchmark']} N={block['num_tasks']} row '{row}'"
                if row not in variants:
                    raise _fail(path, where, "neither a method nor a variant of this file")
                _check_keys(path, where, entry, set(), set(ACCURACY_METRICS))
                for metric, value in entry.items():
                    mean, spread = _entry(path, f"{where} {metric}", value)
                    accuracy.append({"table": table, "benchmark": block["benchmark"],
                                     "num_tasks": int(block["num_tasks"]), "row": row,
                                     "method": variants[row].method, "metric": metric,
                                     "mean": mean, "spread": spread})
    return PaperNumbers(pd.DataFrame(accuracy), pd.DataFrame(cost), variants, spread_kind, runs)
