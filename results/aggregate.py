"""Result files -> one pandas row per run -> mean and spread over seeds.

Everything here reads result files only; every number is recomputed from the accuracy counts.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from results import store
from results.metrics import summarize

GROUP_KEYS = ["benchmark", "num_tasks", "method", "tag"]
METRICS = ["acc", "aaa", "acc_task_avg", "aaa_task_avg", "forgetting_max", "forgetting_consecutive"]


def load_runs(root: Path) -> pd.DataFrame:
    """One row per finished run under ``root``: identity, seeds, metrics, cost and time."""
    rows = []
    for path, r in store.iter_results(Path(root)):
        m = summarize(r["accuracy_matrix"]["correct"], r["accuracy_matrix"]["total"])
        cost = r.get("cost", {})
        rows.append({
            "benchmark": r["benchmark"], "num_tasks": r["num_tasks"], "method": r["method"],
            "tag": r.get("tag", ""), "seed": r["seed"], "class_order_seed": r["class_order_seed"],
            **{k: m[k] for k in METRICS},
            "acc_curve": m["acc_curve"],
            "flops_per_image": cost.get("flops_per_image"),
            "backbone_passes": cost.get("backbone_passes"),
            "trainable_params": cost.get("trainable_params"),
            "stored_params": cost.get("stored_params"),
            "stored_features": cost.get("stored_features"),
            "train_time_s": sum(t["train_time_s"] for t in r["tasks"]),
            "wall_time_s": r.get("wall_time_s"),
            "peak_cuda_mb": max((t.get("cuda_peak_allocated_mb") or 0) for t in r["tasks"]) or None,
            "peak_rss_mb": max(t.get("cpu_max_rss_mb", 0) for t in r["tasks"]),
            "path": str(path),
        })
    return pd.DataFrame(rows)


def aggregate(runs: pd.DataFrame, spread: str = "std") -> pd.DataFrame:
    """Mean, spread ('std' = sample standard deviation, 'sem' = standard error) and seed count
    of every metric, per (benchmark, N, method, tag)."""
    if spread not in ("std", "sem"):
        raise ValueError("spread must be 'std' or 'sem'")
    out = []
    for key, g in runs.groupby(GROUP_KEYS, sort=False):
        row = dict(zip(GROUP_KEYS, key))
        row["n_seeds"] = len(g)
        row["seeds"] = sorted(g["seed"].tolist())
        for m in METRICS:
            v = g[m].to_numpy(dtype=float)
            sd = float(np.std(v, ddof=1)) if len(v) > 1 else float("nan")
            row[m] = float(v.mean())
            row[f"{m}_spread"] = sd / np.sqrt(len(v)) if spread == "sem" else sd
        out.append(row)
    return pd.DataFrame(out)


def quick_table(root: Path, only: set[str] | None = None) -> str:
    """The short table printed at the end of a sweep: Acc and AAA, mean ± std over seeds.
    ``only`` restricts it to these result-file paths (the sweep's own runs)."""
    from harness.sweep import PAPER_ORDER

    runs = load_runs(root)
    if only is not None and not runs.empty:
        runs = runs[runs["path"].isin(only)]
    if runs.empty:
        return "(no finished runs)"
    agg = aggregate(runs)
    agg["order"] = agg["method"].map(lambda m: PAPER_ORDER.index(m) if m in PAPER_ORDER else 99)
    agg = agg.sort_values(["benchmark", "num_tasks", "order", "method"])
    lines = ["| benchmark | N | method | Acc | AAA | seeds |", "|---|---|---|---|---|---|"]
    for _, r in agg.iterrows():
        def cell(m: str) -> str:
            s = r[f"{m}_spread"]
            return f"{r[m]:.2f}" + ("" if np.isnan(s) else f" ± {s:.2f}")
        name = r["method"] + (f"+{r['tag']}" if r["tag"] else "")
        lines.append(f"| {r['benchmark']} | {r['num_tasks']} | {name} | {cell('acc')} | {cell('aaa')} | "
                     f"{r['n_seeds']} |")
    return "\n".join(lines)
