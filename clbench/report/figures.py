"""Figures from result files (seaborn; each written as PNG and PDF).

- ``accuracy_curves``: accuracy over all seen classes after each task, one line per method
  with a band of the chosen spread over seeds (the paper's streaming-task figure);
- ``final_accuracy_bars``: final Acc per method with error bars, the paper's mean beside it;
- ``magnitude_curves``: SD-LoRA's learned magnitudes α_k after each task (only for runs whose
  task logs carry them).

Figures are built on ``matplotlib.figure.Figure`` without pyplot, so writing them never opens
a window or changes the caller's backend.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib as mpl
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

from clbench.files import atomic_replace
from clbench.report.aggregate import Names

SEABORN_ERRORBAR = {"std": "sd", "sem": "se"}  # same definitions as aggregate.spread_of (ddof=1)
METRIC_CURVES = {"acc": "acc_curve", "acc_task_avg": "acc_task_avg_curve"}


def _save(fig: Figure, out_dir: Path, stem: str) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{stem}.png", out_dir / f"{stem}.pdf"]
    atomic_replace(paths[0], lambda f: fig.savefig(f, format="png", dpi=150, bbox_inches="tight"))
    atomic_replace(paths[1], lambda f: fig.savefig(f, format="pdf", bbox_inches="tight"))
    return paths


def _labelled(runs: pd.DataFrame) -> tuple[Names, pd.DataFrame, list[str], dict[str, tuple]]:
    """The runs' names, the runs with a ``label`` column, the labels in the paper's order and
    their colours."""
    names = Names.of(runs)
    runs = runs.assign(label=[names.label(m, t) for m, t in zip(runs["method"], runs["tag"])])
    keys = {names.label(m, t): names.sort_key(m, t) for m, t in zip(runs["method"], runs["tag"])}
    return names, runs, sorted(keys, key=keys.get), _palette(runs)


def _palette(runs: pd.DataFrame) -> dict[str, tuple]:
    """A colour per row label that is the same in every figure and report: the paper's methods
    keep their tab10 colour, a tagged variant a darker shade of its method's colour."""
    names = Names.of(runs)
    methods = sorted(set(runs["method"]), key=names.sort_key)
    row = {m: names.methods[m].paper_row if m in names.methods else None for m in methods}
    others = [m for m in methods if row[m] is None or row[m] >= 10]
    base = sns.color_palette("tab10", 10)
    extra = sns.color_palette("husl", max(1, len(others)))
    colour = {m: extra[others.index(m)] if m in others else base[row[m]] for m in methods}
    palette = {}
    for m, t in zip(runs["method"], runs["tag"]):
        c = colour[m]
        palette[names.label(m, t)] = tuple(0.55 * v for v in c) if t else c
    return palette


def _panels(cols: int, rows: int = 1, width: float = 4.2, height: float = 3.4, sharey: bool = True
            ) -> tuple[Figure, np.ndarray]:
    fig = Figure(figsize=(width * cols + 1.8, height * rows), layout="constrained")
    return fig, fig.subplots(rows, cols, squeeze=False, sharey=sharey)


def accuracy_curves(runs: pd.DataFrame, out_dir: Path, spread: str = "sem", metric: str = "acc") -> list[Path]:
    """``acc_curve_<bench>``: one panel per N; x = tasks learned, y = accuracy over seen classes."""
    written = []
    names, runs, order, palette = _labelled(runs)
    for bench, b in runs.groupby("benchmark", sort=True):
        ns = sorted(b["num_tasks"].unique())
        long = pd.DataFrame([{"N": r.num_tasks, "task": t + 1, "accuracy": a, "label": r.label, "seed": r.seed}
                             for r in b.itertuples() for t, a in enumerate(getattr(r, METRIC_CURVES[metric]))])
        labels = [lab for lab in order if lab in set(long["label"])]
        with sns.axes_style("whitegrid"), sns.plotting_context("paper", font_scale=1.1):
            fig, axes = _panels(len(ns))
            axes = list(axes[0])
            for ax, n in zip(axes, ns):
                seen = b[b["num_tasks"] == n]["seen_classes"].iloc[0]
                if seen and all(seen):  # guessing uniformly among the seen classes
                    ax.plot(range(1, len(seen) + 1), [100.0 / c for c in seen], color="0.55", linestyle="--",
                            linewidth=1, label="chance (1 / seen classes)")
                sns.lineplot(data=long[long["N"] == n], x="task", y="accuracy", hue="label", hue_order=labels,
                             palette=palette, errorbar=SEABORN_ERRORBAR[spread], marker="o", markersize=4,
                             ax=ax, legend=ax is axes[-1])
                ax.set_title(f"{names.benchmark(bench)}, N={n}")
                ax.set_xlabel("tasks learned")
                ax.set_xticks(range(1, n + 1, max(1, n // 10)))
                ax.set_ylabel("Acc over seen classes (%)" if metric == "acc" else "task-averaged Acc (%)")
            legend = axes[-1].get_legend()
            if legend is not None:
                legend.set_title(f"mean ± {'SE' if spread == 'sem' else 'SD'} over seeds")
                sns.move_legend(axes[-1], "upper left", bbox_to_anchor=(1.02, 1), frameon=False)
            written += _save(fig, Path(out_dir), f"acc_curve_{bench}")
    return written


def _axis_floor(values: list[float]) -> float:
    """A lower y limit 10 points under the lowest value, on a multiple of 10, at least 0: bars
    that all start at 0 hide the few points that separate continual-learning methods."""
    finite = [v for v in values if v is not None and np.isfinite(v)]
    return max(0.0, 10 * np.floor((min(finite) - 10) / 10)) if finite else 0.0


def final_accuracy_bars(runs: pd.DataFrame, out_dir: Path, spread: str = "sem", metric: str = "acc",
                        paper: pd.DataFrame | None = None) -> list[Path]:
    """``final_acc_<bench>``: one panel per N; a bar per method with error bars over seeds, the
    seeds as dots and, where ``paper`` (``PaperNumbers.accuracy``) has the same method, N and
    metric, the paper's mean as a black bar. The y axis starts near the lowest value, not at 0."""
    written = []
    names, runs, order, palette = _labelled(runs)
    for bench, b in runs.groupby("benchmark", sort=True):
        ns = sorted(b["num_tasks"].unique())
        with sns.axes_style("whitegrid"), sns.plotting_context("paper", font_scale=1.1):
            fig, axes = _panels(len(ns), width=max(3.2, 0.75 * b["label"].nunique() + 1.2))
            axes = list(axes[0])
            floor_values = list(b[metric])
            for ax, n in zip(axes, ns):
                d = b[b["num_tasks"] == n]
                labels = [lab for lab in order if lab in set(d["label"])]
                sns.barplot(data=d, x="label", y=metric, order=labels, hue="label", hue_order=labels,
                            palette=palette, errorbar=SEABORN_ERRORBAR[spread], capsize=0.25,
                            err_kws={"linewidth": 1.2, "color": "0.15"}, legend=False, ax=ax)
                sns.stripplot(data=d, x="label", y=metric, order=labels, color="0.25", size=3.5, jitter=0.12,
                              ax=ax)
                for i, lab in enumerate(labels):
                    first = d[d["label"] == lab].iloc[0]
                    if paper is None or paper.empty or first["tag"]:
                        continue  # the paper's numbers are for the recipe's runs only
                    p = paper[(paper["benchmark"] == bench) & (paper["num_tasks"] == n)
                              & (paper["row"] == first["method"]) & (paper["metric"] == metric)]
                    if not p.empty:
                        ax.hlines(p["mean"].iloc[0], i - 0.42, i + 0.42, colors="black", linewidth=2.2,
                                  zorder=5, label="paper (mean)")
                        floor_values.append(p["mean"].iloc[0])
                ax.set_title(f"{names.benchmark(bench)}, N={n}")
                ax.set_xlabel("")
                ax.set_ylabel(("final Acc (%)" if metric == "acc" else "final task-averaged Acc (%)")
                              + f", mean ± {'SE' if spread == 'sem' else 'SD'}")
                ax.tick_params(axis="x", labelrotation=30)
                for tick in ax.get_xticklabels():
                    tick.set_horizontalalignment("right")
            axes[0].set_ylim(bottom=_axis_floor(floor_values))  # shared by every panel
            handles, names = [], []
            for ax in axes:
                for h, name in zip(*ax.get_legend_handles_labels()):
                    if name not in names:
                        handles.append(h), names.append(name)
            if handles:
                fig.legend(handles, names, loc="outside upper right", frameon=False)
            written += _save(fig, Path(out_dir), f"final_acc_{bench}")
    return written


def magnitude_curves(runs: pd.DataFrame, out_dir: Path, spread: str = "sem", max_lines: int = 8) -> list[Path]:
    """``alpha_<bench>``: a panel per method variant (rows) and N (columns) that logged
    magnitudes; x = the task k whose direction α_k scales, y = α_k, one line per "after task t"
    (light to dark; at most ``max_lines`` evenly spaced t, the last always), band over seeds.
    Writes nothing when no run logged magnitudes."""
    written = []
    if "magnitudes" not in runs:
        return written
    runs = runs[runs["magnitudes"].map(lambda h: isinstance(h, list) and len(h) > 0)]
    if runs.empty:
        return written
    names, runs, order, _ = _labelled(runs)
    cmap = sns.color_palette("crest", as_cmap=True)
    for bench, b in runs.groupby("benchmark", sort=True):
        labels = [lab for lab in order if lab in set(b["label"])]
        ns = sorted(b["num_tasks"].unique())
        long = pd.DataFrame([{"label": r.label, "N": r.num_tasks, "after": t + 1, "k": k + 1, "alpha": a,
                              "seed": r.seed}
                             for r in b.itertuples() for t, alphas in enumerate(r.magnitudes)
                             for k, a in enumerate(alphas)])
        with sns.axes_style("whitegrid"), sns.plotting_context("paper", font_scale=1.1):
            fig, axes = _panels(len(ns), len(labels), sharey=False)
            for row, lab in enumerate(labels):
                for col, n in enumerate(ns):
                    ax = axes[row][col]
                    d = long[(long["label"] == lab) & (long["N"] == n)]
                    if d.empty:
                        ax.set_axis_off()
                        continue
                    steps = int(d["after"].max())
                    shown = sorted({int(round(v)) for v in np.linspace(1, steps, min(steps, max_lines))})
                    norm = mpl.colors.Normalize(vmin=1, vmax=max(2, steps))
                    sns.lineplot(data=d[d["after"].isin(shown[:-1])], x="k", y="alpha", hue="after",
                                 hue_norm=norm, palette=cmap, errorbar=SEABORN_ERRORBAR[spread], marker="o",
                                 markersize=3, legend=False, ax=ax)
                    sns.lineplot(data=d[d["after"] == steps], x="k", y="alpha", color="black",
                                 errorbar=SEABORN_ERRORBAR[spread], linewidth=1.6, marker="o", markersize=4,
                                 ax=ax, label=f"after task {steps} (last)")
                    bar = fig.colorbar(mpl.cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, pad=0.02)
                    bar.set_label("after task t")
                    bar.ax.yaxis.set_major_locator(mpl.ticker.MaxNLocator(integer=True))
                    ax.set_title(f"{lab}: {names.benchmark(bench)}, N={n}")
                    ax.set_xlabel("direction of task k")
                    ax.set_ylabel("learned magnitude α_k")
                    ax.xaxis.set_major_locator(mpl.ticker.MaxNLocator(integer=True, nbins=10))
                    ax.legend(loc="best", frameon=True, fontsize="small")
            written += _save(fig, Path(out_dir), f"alpha_{bench}")
    return written


def write_figures(runs: pd.DataFrame, out_dir: Path, spread: str = "sem", metric: str = "acc",
                  paper: pd.DataFrame | None = None) -> list[Path]:
    """Every figure above for the given runs; returns the files written."""
    if runs.empty:
        return []
    return (accuracy_curves(runs, out_dir, spread, metric)
            + final_accuracy_bars(runs, out_dir, spread, metric, paper)
            + magnitude_curves(runs, out_dir, spread))
