"""Result files -> one pandas row per run -> mean and spread over seeds.

Everything here reads result files only; every accuracy number is recomputed from the counts
of the accuracy matrix, never taken from a log or from the ``metrics`` the run wrote.

A *group* is everything that identifies a run but its seeds: (benchmark, N, method, tag).
``class_order_seed`` is a seed too, so runs that differ only in it fall into the same group.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd

from clbench import record
from clbench.config import describe_overrides, parse_set, set_arguments
from clbench.metrics import summarize
from clbench.record import MethodInfo, RunResult, TaskRecord

GROUP_KEYS = ["benchmark", "num_tasks", "method", "tag"]
METRICS = ["acc", "aaa", "acc_task_avg", "aaa_task_avg", "forgetting_max", "forgetting_consecutive"]
HIGHER_IS_BETTER = {"acc": True, "aaa": True, "acc_task_avg": True, "aaa_task_avg": True,
                    "forgetting_max": False, "forgetting_consecutive": False}
# Per-run cost columns; the deterministic ones (FLOPs, parameters) are the same for every seed.
COSTS = ["flops_per_image", "backbone_passes", "trainable_params_per_task", "trainable_params_last",
         "stored_params", "stored_features", "dropped_tasks", "train_time_s", "wall_time_s", "peak_cuda_mb",
         "peak_cpu_tensor_mb", "peak_rss_mb", "process_rss_mb"]
SPREADS = {"std": "standard deviation", "sem": "standard error"}


@dataclass(frozen=True)
class Names:
    """How the methods and benchmarks of a set of runs are titled and ordered: from their result
    files (``method_info``, ``benchmark_title``), so a report needs no registry, and a method
    shows with its own title wherever it was registered."""

    methods: dict[str, MethodInfo]
    benchmarks: dict[str, str]
    variants: dict[str, str] = field(default_factory=dict)  # tag -> the overrides it stands for

    @classmethod
    def of(cls, frame: pd.DataFrame) -> "Names":
        """From a frame of runs or groups (``load_runs`` / ``aggregate``)."""
        if frame.empty or "method_info" not in frame:
            return cls({}, {})
        variants = {t: v for t, v in zip(frame["tag"], frame["variant"]) if t and v} if "variant" in frame else {}
        return cls(dict(zip(frame["method"], frame["method_info"])),
                   dict(zip(frame["benchmark"], frame["benchmark_title"])), variants)

    def label(self, method: str, tag: str = "") -> str:
        """A group's row label: the method's title, and for runs with command-line overrides what
        they set (``SD-LoRA lr=0.005 rank=8``); the tag (the hash in file names) only where a
        result file does not say (written before schema 3, not by a sweep)."""
        title = self.methods[method].title if method in self.methods else method
        if not tag:
            return title
        return f"{title} {self.variants[tag]}" if self.variants.get(tag) else f"{title} [{tag}]"

    def joint_label(self, method: str, tag: str = "") -> str:
        """A joint-training reference row's label: ``Full Fine-Tuning (joint, upper bound)``."""
        return self.label(method, tag) + JOINT_SUFFIX

    def sort_key(self, method: str, tag: str = "") -> tuple[float, str, str]:
        """The paper's row order; other methods after, by name; tagged runs after the recipe's."""
        row = self.methods[method].paper_row if method in self.methods else None
        return (row if row is not None else float("inf"), method, tag)

    def benchmark(self, name: str) -> str:
        """The benchmark's title as the paper writes it (as its run recorded it), else its name."""
        return self.benchmarks.get(name, name)


JOINT_SUFFIX = " (joint, upper bound)"


def split_joint(frame: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(continual, joint)``: a benchmark's one-task runs or groups (every class at once, ``--joint``
    or ``--tasks 1``) are joint training, shown as reference rows (the upper bound) wherever the
    benchmark also has results with more tasks; elsewhere they are results like any other."""
    if frame.empty:
        return frame, frame
    several = set(frame.loc[frame["num_tasks"] > 1, "benchmark"])
    joint = (frame["num_tasks"] == 1) & frame["benchmark"].isin(several)
    return frame[~joint], frame[joint]


def magnitude_history(tasks: list[TaskRecord], key: str | None) -> list[list[float]] | None:
    """The learned magnitudes after each task, ``[[a_0], [a_0, a_1], ...]``, from the tasks'
    ``method_log[key]`` (the key the method registered, ``MethodInfo.magnitudes``); None when
    it logs none (or logs something that is not a flat list of numbers, which the report then
    leaves out rather than guess at)."""
    if key is None:
        return None
    history = []
    for task in tasks:
        values = (task.method_log or {}).get(key)
        if not isinstance(values, (list, tuple)) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            return None
        history.append([float(v) for v in values])
    return history or None


def _variant(r: RunResult) -> str:
    """What a tagged run's overrides set, as a label (``lr=0.005 rank=8``): from its config's
    ``overrides`` (schema 3), else from the ``--set`` arguments of its command line; empty if neither says."""
    overrides = (r.config or {}).get("overrides")
    if overrides:
        return describe_overrides(overrides)
    argv = list(r.argv or [])
    sets = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--set"] + \
        [a.split("=", 1)[1] for a in argv if a.startswith("--set=")]
    if any("," in s.split("=", 1)[-1] for s in sets):  # a grid: which point this run was is unknown
        return ""
    return describe_overrides(parse_set(sets)) if sets else ""


def _val_split(data: dict[str, Any]) -> str:
    """How a run of ``--eval-on val`` held out its validation images, in words; empty for a test run."""
    if data.get("eval_on", "test") != "val":
        return ""
    return f"{data.get('val_fraction', 0.1):.0%} of each class's training images, seed {data.get('val_seed', 0)}"


def order_key(seed: int, class_order_seed: int) -> str:
    """What pairs runs across methods: the training seed and the class-order seed (the same seeds
    give the same class order and the same training randomness for every method)."""
    return f"seed{seed}-order{class_order_seed}"


def _overrides_from_argv(argv: list[str] | None) -> str:
    """The ``--set``/``--backbone`` arguments of the command that made a tagged run."""
    argv = list(argv or [])
    picked = []
    for i, arg in enumerate(argv):
        if arg in ("--set", "--backbone", "--pretrained-path") and i + 1 < len(argv):
            picked.append(f"{arg} {argv[i + 1]}")
        elif arg.startswith(("--set=", "--backbone=", "--pretrained-path=")):
            picked.append(arg.replace("=", " ", 1))
    return " ".join(picked)


def run_row(path: Path, r: RunResult) -> dict[str, Any]:
    """One result record as one flat row (identity, titles, seeds, metrics, curves, cost, time)."""
    m = summarize(r.accuracy_matrix["correct"], r.accuracy_matrix["total"])
    tasks = r.tasks
    cost = r.cost or (tasks[-1].cost if tasks else {})
    per_task_trainable = [t.cost["trainable_params"] for t in tasks if t.cost.get("trainable_params") is not None]
    cuda_peaks = [t.cuda_peak_allocated_mb for t in tasks if t.cuda_peak_allocated_mb is not None]
    tensor_peaks = [t.cpu_peak_live_tensor_mb for t in tasks if t.cpu_peak_live_tensor_mb is not None]
    rss_peaks = [t.cpu_peak_rss_mb for t in tasks if t.cpu_peak_rss_mb is not None]
    return {
        "benchmark": r.benchmark, "num_tasks": int(r.num_tasks), "method": r.method,
        "tag": r.tag or "", "seed": int(r.seed), "class_order_seed": int(r.class_order_seed),
        "pair": order_key(int(r.seed), int(r.class_order_seed)),
        "eval_on": ((r.config or {}).get("data") or {}).get("eval_on", "test"),
        "variant": _variant(r) if r.tag else "",
        "val_split": _val_split((r.config or {}).get("data") or {}),
        "config_overrides": (r.config or {}).get("overrides") or {},
        "method_info": r.method_info, "benchmark_title": r.benchmark_title,
        **{k: m[k] for k in METRICS},
        "acc_curve": m["acc_curve"],
        "seen_classes": list(np.cumsum([len(t.classes) for t in tasks]).tolist()),
        "acc_task_avg_curve": m["acc_task_avg_curve"],
        "magnitudes": magnitude_history(tasks, r.method_info.magnitudes),
        "flops_per_image": cost.get("flops_per_image"),
        "backbone_passes": cost.get("backbone_passes"),
        "trainable_params_per_task": float(np.mean(per_task_trainable)) if per_task_trainable else None,
        "trainable_params_last": per_task_trainable[-1] if per_task_trainable else None,
        "stored_params": cost.get("stored_params"),
        "stored_features": cost.get("stored_features"),
        "dropped_tasks": cost.get("dropped_tasks"),
        "train_time_s": sum(t.train_time_s for t in tasks),
        "wall_time_s": r.wall_time_s,
        "peak_cuda_mb": max(cuda_peaks) if cuda_peaks else None,
        # CPU runs: live tensor bytes, traced (protocol.TaskMemory); files before it have only the RSS figures
        "peak_cpu_tensor_mb": max(tensor_peaks) if tensor_peaks else None,
        # per task, above the run's start (protocol.TaskMemory); older files have only the second
        "peak_rss_mb": max(rss_peaks) if rss_peaks else None,
        "process_rss_mb": max((t.cpu_max_rss_mb or 0.0) for t in tasks) if tasks else None,
        "device": (r.environment or {}).get("device", ""),
        "pretrained": r.pretrained,
        "overrides": (set_arguments((r.config or {}).get("overrides") or {}) or _overrides_from_argv(r.argv))
        if r.tag else "",
        "method_args": (r.config or {}).get("method_args") or {},
        "path": str(path),
    }


def load_runs(root: Path) -> pd.DataFrame:
    """One row per finished run under ``root`` (see ``run_row``); empty, with the columns,
    when there is none."""
    rows = [run_row(path, r) for path, r in record.iter_results(Path(root))]
    if not rows:
        return pd.DataFrame(columns=[*GROUP_KEYS, "seed", "class_order_seed", *METRICS, *COSTS, "path"])
    return pd.DataFrame(rows)


def spread_of(values: Iterable[float], spread: str) -> float:
    """Sample standard deviation (``std``, ddof=1) or standard error of the mean (``sem`` =
    std/sqrt(n)); NaN for fewer than two values, where neither is defined."""
    if spread not in SPREADS:
        raise ValueError(f"spread must be one of {', '.join(SPREADS)}, got '{spread}'")
    v = np.asarray([x for x in values if x is not None and not np.isnan(x)], dtype=float)
    if len(v) < 2:
        return float("nan")
    sd = float(np.std(v, ddof=1))
    return sd / float(np.sqrt(len(v))) if spread == "sem" else sd


def expected_seeds(runs: pd.DataFrame) -> dict[str, list[int]]:
    """Per benchmark, every seed that any run of it used: what each group is checked against."""
    return {b: sorted(set(g["seed"].tolist())) for b, g in runs.groupby("benchmark")}


def aggregate(runs: pd.DataFrame, spread: str = "std",
              seeds: list[int] | dict[str, list[int]] | None = None) -> pd.DataFrame:
    """Mean and spread of every metric and cost, per (benchmark, N, method, tag).

    ``spread``: 'std' (sample standard deviation) or 'sem' (standard error). ``seeds``: the
    seeds each group should have (a list for all benchmarks, or one per benchmark); by default
    every seed seen on the benchmark. Adds ``n_seeds``, ``seeds`` and ``missing_seeds``.
    """
    spread_of([], spread)  # validates the name even when there is nothing to aggregate
    if runs.empty:
        return pd.DataFrame(columns=[*GROUP_KEYS, "n_seeds", "seeds", "missing_seeds", *METRICS])
    expected = expected_seeds(runs) if seeds is None else seeds
    out = []
    for key, g in runs.groupby(GROUP_KEYS, sort=False):
        row: dict[str, Any] = dict(zip(GROUP_KEYS, key))
        have = sorted(g["seed"].tolist())
        want = expected if isinstance(expected, list) else expected.get(row["benchmark"], have)
        row.update(n_seeds=len(have), seeds=have, missing_seeds=sorted(set(want) - set(have)))
        for col in [*METRICS, *COSTS]:
            if col not in g:
                continue
            v = pd.to_numeric(g[col], errors="coerce").to_numpy(dtype=float)
            present = v[~np.isnan(v)]
            row[col] = float(present.mean()) if len(present) else float("nan")
            row[f"{col}_spread"] = spread_of(present, spread)
        row["overrides"] = next((o for o in g.get("overrides", []) if o), "")
        for col in ("eval_on", "variant", "config_overrides", "val_split"):
            if col in g:
                row[col] = g[col].iloc[0]
        for metric in METRICS:  # per seed pair, for the paired tests (clbench.report.stats)
            row[f"{metric}_by_seed"] = dict(zip(g["pair"], g[metric].astype(float))) if "pair" in g else {}
        row["method_info"] = g["method_info"].iloc[0]
        row["benchmark_title"] = g["benchmark_title"].iloc[0]
        row["method_args"] = g["method_args"].iloc[0] if "method_args" in g else {}
        out.append(row)
    return pd.DataFrame(out)


def quick_table(root: Path, only: set[str] | None = None) -> str:
    """The short table printed at the end of a sweep: Acc and AAA, mean ± std over seeds.
    ``only`` restricts it to these result-file paths (the sweep's own runs)."""
    runs = load_runs(root)
    if only is not None and not runs.empty:
        runs = runs[runs["path"].isin(only)]
    if runs.empty:
        return "(no finished runs)"
    agg = aggregate(runs)
    names = Names.of(agg)
    agg["order"] = [names.sort_key(m, t) for m, t in zip(agg["method"], agg["tag"])]
    agg = agg.sort_values(["benchmark", "num_tasks", "order"])
    lines = ["| benchmark | N | method | Acc (mean ± std) | AAA (mean ± std) | seeds |", "|---|---|---|---|---|---|"]
    for _, r in agg.iterrows():
        def cell(m: str) -> str:
            s = r[f"{m}_spread"]
            return f"{r[m]:.2f}" + ("" if np.isnan(s) else f" ± {s:.2f}")
        variant = r.get("variant") or ""
        name = r["method"] + (f" {variant}" if variant else f"+{r['tag']}" if r["tag"] else "")
        lines.append(f"| {r['benchmark']} | {r['num_tasks']} | {name} | {cell('acc')} | {cell('aaa')} | "
                     f"{r['n_seeds']} |")
    return "\n".join(lines)
