"""Figures from result files (seaborn; each written as PNG and PDF).

- ``accuracy_curves``: accuracy over all seen classes after each task, one line per method
  with a band of the chosen spread over seeds (the paper's streaming-task figure);
- ``final_accuracy_bars``: final Acc per method, bars from zero with error bars, the paper's mean beside it;
- ``magnitude_curves``: SD-LoRA's learned magnitudes α_k after each task (only for runs whose
  task logs carry them).

What a reviewer checks holds in each (``tests/test_workflow.py`` reads it off the figure objects):
bars start at zero; a legend or axis label names its band or error bar ("mean ± SE over seeds")
only where some method has two seeds or more, and says "one seed, no band" otherwise; every row
label has its own colour, marker and line style, the same in every figure; labels name a tagged
run's overrides (``Names.label``); no axis uses matplotlib's offset notation ("+8e-1").

Figures are built on ``matplotlib.figure.Figure`` without pyplot, so writing them never opens
a window or changes the caller's backend. ``build_figures`` returns them unsaved.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib as mpl
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

from clbench.files import atomic_replace
from clbench.report.aggregate import Names, split_joint

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


MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h", "p", "d", "8", "H"]
DASHES = [(1, 0), (4, 1.5), (1.5, 1.2), (5, 1.5, 1.5, 1.5), (2.5, 2.5), (6, 2), (1, 2.5),
          (4, 1.5, 1, 1.5, 1, 1.5)]


def _palette(runs: pd.DataFrame) -> dict[str, tuple]:
    """A colour per row label, the same in every figure and report: the paper's methods keep their
    tab10 colour; every other label (another method, a tagged variant) gets a colour of its own
    from a husl wheel, so that variants never collapse into shades of one colour."""
    names = Names.of(runs)
    labels = sorted({names.label(m, t): names.sort_key(m, t) for m, t in zip(runs["method"], runs["tag"])}.items(),
                    key=lambda kv: kv[1])
    base = sns.color_palette("tab10", 10)
    palette, others = {}, []
    for label, (row, method, tag) in labels:
        if not tag and row != float("inf") and int(row) < 10:
            palette[label] = base[int(row)]
        else:
            others.append(label)
    extra = sns.color_palette("husl", max(1, len(others)))
    palette.update({label: extra[i] for i, label in enumerate(others)})
    return palette


def _styles(order: list[str]) -> tuple[dict[str, str], dict[str, tuple]]:
    """A marker and a dash pattern per label, in the labels' order (the pairs repeat only after
    len(MARKERS) x len(DASHES) labels)."""
    markers = {lab: MARKERS[i % len(MARKERS)] for i, lab in enumerate(order)}
    dashes = {lab: DASHES[(i + i // len(MARKERS)) % len(DASHES)] for i, lab in enumerate(order)}
    return markers, dashes


def band_name(spread: str) -> str:
    return f"mean ± {'SE' if spread == 'sem' else 'SD'} over seeds"


def _plain_numbers(ax) -> None:
    """Tick labels as plain numbers: never matplotlib's offset (``+8e-1``) or scientific notation."""
    for axis in (ax.xaxis, ax.yaxis):
        formatter = axis.get_major_formatter()
        if isinstance(formatter, mpl.ticker.ScalarFormatter):
            formatter.set_useOffset(False)
            formatter.set_scientific(False)


def _panels(cols: int, rows: int = 1, width: float = 4.2, height: float = 3.4, sharey: bool = True
            ) -> tuple[Figure, np.ndarray]:
    fig = Figure(figsize=(width * cols + 1.8, height * rows), layout="constrained")
    return fig, fig.subplots(rows, cols, squeeze=False, sharey=sharey)


def accuracy_curves(runs: pd.DataFrame, out_dir: Path, spread: str = "sem", metric: str = "acc") -> list[Path]:
    """``acc_curve_<bench>``: one panel per N; x = tasks learned, y = accuracy over seen classes."""
    return _save_all(accuracy_curve_figures(runs, spread, metric), out_dir)


def _several_seeds(runs: pd.DataFrame) -> bool:
    """Whether some row label has two seeds or more: only then is there a band to draw."""
    return bool((runs.groupby(["label", "num_tasks"])["seed"].nunique() > 1).any())


def joint_lines(ax, joint: pd.DataFrame, metric: str, palette: dict[str, tuple], names: Names) -> None:
    """A dotted horizontal line per joint-training reference row (``split_joint``) at its mean final
    accuracy over seeds, in its method's colour, labelled as the upper bound."""
    for (m, t), j in joint.groupby(["method", "tag"], sort=False):
        ax.axhline(float(j[metric].mean()), color=palette.get(names.label(m, t), "0.3"), linestyle=":",
                   linewidth=1.6, label=names.joint_label(m, t))


def accuracy_curve_figures(runs: pd.DataFrame, spread: str = "sem", metric: str = "acc") -> list[tuple[str, Figure]]:
    figures = []
    names, runs, order, palette = _labelled(runs)
    runs, joint_runs = split_joint(runs)
    markers, dashes = _styles(order)
    for bench, b in runs.groupby("benchmark", sort=True):
        joint = joint_runs[joint_runs["benchmark"] == bench]
        ns = sorted(b["num_tasks"].unique())
        long = pd.DataFrame([{"N": r.num_tasks, "task": t + 1, "accuracy": a, "label": r.label, "seed": r.seed}
                             for r in b.itertuples() for t, a in enumerate(getattr(r, METRIC_CURVES[metric]))])
        labels = [lab for lab in order if lab in set(long["label"])]
        several = _several_seeds(b)
        with sns.axes_style("whitegrid"), sns.plotting_context("paper", font_scale=1.1):
            fig, axes = _panels(len(ns))
            axes = list(axes[0])
            for ax, n in zip(axes, ns):
                seen = b[b["num_tasks"] == n]["seen_classes"].iloc[0]
                if seen and all(seen):  # guessing uniformly among the seen classes
                    ax.plot(range(1, len(seen) + 1), [100.0 / c for c in seen], color="0.55", linestyle="--",
                            linewidth=1, label="chance (1 / seen classes)")
                joint_lines(ax, joint, metric, palette, names)
                sns.lineplot(data=long[long["N"] == n], x="task", y="accuracy", hue="label", hue_order=labels,
                             style="label", style_order=labels, markers={k: markers[k] for k in labels},
                             dashes={k: dashes[k] for k in labels}, palette=palette, markersize=5,
                             errorbar=SEABORN_ERRORBAR[spread] if several else None, ax=ax, legend=ax is axes[-1])
                _plain_numbers(ax)
                ax.set_title(f"{names.benchmark(bench)}, N={n}")
                ax.set_xlabel("tasks learned")
                ax.set_xticks(range(1, n + 1, max(1, n // 10)))
                ax.set_ylabel("Acc over seen classes (%)" if metric == "acc" else "task-averaged Acc (%)")
            legend = axes[-1].get_legend()
            if legend is not None:
                legend.set_title(f"{band_name(spread)} (band)" if several else "one seed, no band")
                sns.move_legend(axes[-1], "upper left", bbox_to_anchor=(1.02, 1), frameon=False)
            figures.append((f"acc_curve_{bench}", fig))
    return figures


def final_accuracy_bars(runs: pd.DataFrame, out_dir: Path, spread: str = "sem", metric: str = "acc",
                        paper: pd.DataFrame | None = None) -> list[Path]:
    """``final_acc_<bench>``: one panel per N; a bar per method from zero with error bars over
    seeds, the seeds as dots and, where ``paper`` (``PaperNumbers.accuracy``) has the same method,
    N and metric, the paper's mean as a black bar."""
    return _save_all(final_accuracy_figures(runs, spread, metric, paper), out_dir)


def final_accuracy_figures(runs: pd.DataFrame, spread: str = "sem", metric: str = "acc",
                           paper: pd.DataFrame | None = None) -> list[tuple[str, Figure]]:
    figures = []
    names, runs, order, palette = _labelled(runs)
    runs, joint_runs = split_joint(runs)
    markers, _ = _styles(order)
    for bench, b in runs.groupby("benchmark", sort=True):
        joint = joint_runs[joint_runs["benchmark"] == bench]
        ns = sorted(b["num_tasks"].unique())
        several = _several_seeds(b)
        with sns.axes_style("whitegrid"), sns.plotting_context("paper", font_scale=1.1):
            fig, axes = _panels(len(ns), width=max(3.2, 0.75 * b["label"].nunique() + 1.2))
            axes = list(axes[0])
            for ax, n in zip(axes, ns):
                d = b[b["num_tasks"] == n]
                labels = [lab for lab in order if lab in set(d["label"])]
                sns.barplot(data=d, x="label", y=metric, order=labels, hue="label", hue_order=labels,
                            palette=palette, errorbar=SEABORN_ERRORBAR[spread] if several else None, capsize=0.25,
                            err_kws={"linewidth": 1.2, "color": "0.15"}, legend=False, ax=ax)
                for i, lab in enumerate(labels):  # the seeds as dots, in the label's own marker
                    values = d[d["label"] == lab][metric].to_numpy(dtype=float)
                    jitter = np.linspace(-0.12, 0.12, len(values)) if len(values) > 1 else np.zeros(1)
                    ax.scatter(i + jitter[: len(values)], values, marker=markers[lab], s=14, color="0.2", zorder=4,
                               linewidths=0)
                for i, lab in enumerate(labels):
                    first = d[d["label"] == lab].iloc[0]
                    if paper is None or paper.empty or first["tag"]:
                        continue  # the paper's numbers are for the recipe's runs only
                    p = paper[(paper["benchmark"] == bench) & (paper["num_tasks"] == n)
                              & (paper["row"] == first["method"]) & (paper["metric"] == metric)]
                    if not p.empty:
                        ax.hlines(p["mean"].iloc[0], i - 0.42, i + 0.42, colors="black", linewidth=2.2,
                                  zorder=5, label="paper (mean)")
                joint_lines(ax, joint, metric, palette, names)
                ax.set_title(f"{names.benchmark(bench)}, N={n}\n"
                             + (f"error bars: {band_name(spread)}" if several else "one seed, no error bars"),
                             fontsize="medium")
                ax.set_xlabel("")
                ax.set_ylabel("final Acc (%)" if metric == "acc" else "final task-averaged Acc (%)")
                _plain_numbers(ax)
                ax.tick_params(axis="x", labelrotation=30)
                for tick in ax.get_xticklabels():
                    tick.set_horizontalalignment("right")
            axes[0].set_ylim(bottom=0)  # bars start at zero (shared by every panel): a gap reads at its size
            handles, names = [], []
            for ax in axes:
                for h, name in zip(*ax.get_legend_handles_labels()):
                    if name not in names:
                        handles.append(h), names.append(name)
            if handles:
                fig.legend(handles, names, loc="outside upper right", frameon=False)
            figures.append((f"final_acc_{bench}", fig))
    return figures


def magnitude_curves(runs: pd.DataFrame, out_dir: Path, spread: str = "sem", max_lines: int = 8) -> list[Path]:
    """``alpha_<bench>``: a panel per method variant (rows) and N (columns) that logged
    magnitudes; x = the task k whose direction α_k scales, y = α_k, one line per "after task t"
    (light to dark; at most ``max_lines`` evenly spaced t, the last always), band over seeds.
    Writes nothing when no run logged magnitudes."""
    return _save_all(magnitude_figures(runs, spread, max_lines), out_dir)


def magnitude_figures(runs: pd.DataFrame, spread: str = "sem", max_lines: int = 8) -> list[tuple[str, Figure]]:
    figures: list[tuple[str, Figure]] = []
    if "magnitudes" not in runs:
        return figures
    runs = runs[runs["magnitudes"].map(lambda h: isinstance(h, list) and len(h) > 0)]
    if runs.empty:
        return figures
    names, runs, order, _ = _labelled(runs)
    cmap = sns.color_palette("crest", as_cmap=True)
    for bench, b in runs.groupby("benchmark", sort=True):
        labels = [lab for lab in order if lab in set(b["label"])]
        ns = sorted(b["num_tasks"].unique())
        long = pd.DataFrame([{"label": r.label, "N": r.num_tasks, "after": t + 1, "k": k + 1, "alpha": a,
                              "seed": r.seed}
                             for r in b.itertuples() for t, alphas in enumerate(r.magnitudes)
                             for k, a in enumerate(alphas)])
        errorbar = SEABORN_ERRORBAR[spread] if _several_seeds(b) else None
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
                                 hue_norm=norm, palette=cmap, errorbar=errorbar, marker="o",
                                 markersize=3, legend=False, ax=ax)
                    sns.lineplot(data=d[d["after"] == steps], x="k", y="alpha", color="black",
                                 errorbar=errorbar, linewidth=1.6, marker="o", markersize=4,
                                 ax=ax, label=f"after task {steps} (last)"
                                 + (f"; bands: {band_name(spread)}" if errorbar else "; one seed, no band"))
                    bar = fig.colorbar(mpl.cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, pad=0.02)
                    bar.set_label("after task t")
                    bar.ax.yaxis.set_major_locator(mpl.ticker.MaxNLocator(integer=True))
                    ax.set_title(f"{lab}: {names.benchmark(bench)}, N={n}")
                    ax.set_xlabel("direction of task k")
                    ax.set_ylabel("learned magnitude α_k")
                    ax.xaxis.set_major_locator(mpl.ticker.MaxNLocator(integer=True, nbins=10))
                    ax.legend(loc="best", frameon=True, fontsize="small")
                    _plain_numbers(ax)
            figures.append((f"alpha_{bench}", fig))
    return figures


def write_figures(runs: pd.DataFrame, out_dir: Path, spread: str = "sem", metric: str = "acc",
                  paper: pd.DataFrame | None = None) -> list[Path]:
    """Every figure above for the given runs; returns the files written."""
    return _save_all(build_figures(runs, spread, metric, paper), out_dir)


def build_figures(runs: pd.DataFrame, spread: str = "sem", metric: str = "acc",
                  paper: pd.DataFrame | None = None) -> list[tuple[str, Figure]]:
    """Every figure above, unsaved, as (file stem, figure)."""
    if runs.empty:
        return []
    return (accuracy_curve_figures(runs, spread, metric) + final_accuracy_figures(runs, spread, metric, paper)
            + magnitude_figures(runs, spread))


def _save_all(figures: list[tuple[str, Figure]], out_dir: Path) -> list[Path]:
    return [path for stem, fig in figures for path in _save(fig, Path(out_dir), stem)]
