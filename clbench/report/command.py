"""``python run_suite.py report``: result files -> the paper's tables, a comparison with the
paper's numbers, a measured cost table and figures.

Reads ``<root>/runs/**.json`` only (never logs), groups runs by everything but the seed, and
writes ``<root>/tables/`` (one ``.md`` and one ``.tex`` per table, ``report.md`` with all of
them and the figures, ``tables.tex`` as a standalone document, ``summary.csv``) and
``<root>/figures/`` (PNG and PDF). The same report is written at the end of every local sweep.

Tables:

- ``acc_<benchmarks>``: the paper's layouts (Table 2: ImageNet-R N=5/10/20; Table 3: ImageNet-A
  N=10 with DomainNet N=5; Table 6: CIFAR-100 with CUB-200), and the same layout for any other
  benchmark with results (synth). Cells are ``mean (spread)`` over seeds, the spread being the
  standard error (default, as the paper) or the standard deviation; the best mean per column is
  bold; cells with fewer seeds than the table's carry a dagger and a note names the missing ones.
- ``comparison``: ours beside the paper's (Tables 2, 3, 4, 6), the difference, and ``!`` where
  it exceeds two of the paper's standard errors.
- ``ranking``: our order of the paper's methods beside the paper's, with Kendall's tau (synth is
  ranked against ImageNet-R at the same N).
- ``cost``: the paper's Table 5 measured: FLOPs per test image (torch's FLOP counter on the
  model after the last task), backbone passes, trainable parameters per task, stored parameters
  and features, training time per run and peak memory.
- ``metrics_<benchmark>``: every metric the harness computes (both accuracy definitions and
  both forgetting definitions), per N and method.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
import subprocess
import tempfile
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from clbench import files, record
from clbench.report.aggregate import HIGHER_IS_BETTER, JOINT_SUFFIX, SPREADS, Names, aggregate, load_runs, split_joint
from clbench.report.figures import write_figures
from clbench.report.ranking import ranking_table
from clbench.report.reference import PaperNumbers, load_paper
from clbench.report.select import select_best_val, selection_table
from clbench.report.stats import TEST_ASSUMPTIONS, TEST_CAPTION, interval_text, paired_difference, tied_with_best
from clbench.report.table import Cell, Table, latex_document

METRIC_SETS = {"sample": ("acc", "aaa"), "task": ("acc_task_avg", "aaa_task_avg")}
METRIC_HEADERS = {"acc": "Acc", "aaa": "AAA", "acc_task_avg": "Acc", "aaa_task_avg": "AAA",
                  "forgetting_max": "F max", "forgetting_consecutive": "F consec."}
DEFINITIONS = {
    "sample": ("Acc: accuracy on the test images of every class seen, after the last task "
               "(sample-weighted, as SD-LoRA's code computes it); AAA: the mean of that accuracy over "
               "the N evaluations, one after each task."),
    "task": ("Acc: the mean over tasks of each task's own test accuracy after the last task "
             "(task-averaged, as L2P, DualPrompt, CODA-Prompt and HiDe-Prompt print it); AAA: the mean "
             "of that over the N evaluations, one after each task."),
}
FORGETTING_DEFINITIONS = ("F max: mean over the old tasks of the drop from their best accuracy to their "
                          "final one; F consec.: CODA-Prompt's mean drop between consecutive evaluations.")
MISSING_MARK = "†"
FLAG_MARK = "!"


@dataclass
class Layout:
    """One accuracy table: which (benchmark, N) column groups it holds, in order."""

    name: str
    title: str
    columns: list[tuple[str, int]]
    paper_table: int | None = None

    @property
    def several_benchmarks(self) -> bool:
        return len({b for b, _ in self.columns}) > 1


# The paper's tables, in its order; benchmarks outside them get a table of their own.
PAPER_LAYOUTS = [
    Layout("acc_imr", "ImageNet-R", [("imr", 5), ("imr", 10), ("imr", 20)], 2),
    Layout("acc_ima_dn", "ImageNet-A and DomainNet", [("ima", 10), ("dn", 5)], 3),
    Layout("acc_c100_cub", "CIFAR-100 and CUB-200", [("c100", 10), ("cub", 10)], 6),
]


@dataclass
class ReportOptions:
    """What the report shows. ``seeds``: the seeds every group should have (default: each
    benchmark's seen seeds); runs with other seeds are left out. ``benchmarks``: only these."""

    spread: str = "sem"  # 'sem' (standard error, as the paper) or 'std'
    metrics: str = "sample"  # 'sample' (SD-LoRA's Acc/AAA) or 'task' (task-averaged variants)
    seeds: list[int] | None = None
    benchmarks: list[str] | None = None
    figures: bool = True
    digits: int = 2
    reference: str | None = "sdlora"  # the difference table's reference (method or method+tag), if it ran
    select: str | None = None  # "best-val": each method's configuration chosen on validation (select.py)

    def __post_init__(self) -> None:
        if self.spread not in SPREADS:
            raise ValueError(f"spread must be one of {', '.join(SPREADS)}, got '{self.spread}'")
        if self.metrics not in METRIC_SETS:
            raise ValueError(f"metrics must be one of {', '.join(METRIC_SETS)}, got '{self.metrics}'")


@dataclass
class Report:
    runs: pd.DataFrame
    groups: pd.DataFrame
    tables: list[Table] = field(default_factory=list)
    figures: list[Path] = field(default_factory=list)
    held_out: int = 0  # validation runs left out of the tables (without --select best-val)


# ---------------------------------------------------------------------------------------- cells


def _number(x: Any, digits: int) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def mean_spread(mean: float, spread: float, digits: int = 2) -> str:
    """``mean (spread)``; the mean alone where the spread is undefined (one seed)."""
    if mean is None or math.isnan(mean):
        return "–"
    return f"{mean:.{digits}f}" if spread is None or math.isnan(spread) else f"{mean:.{digits}f} ({spread:.{digits}f})"


def _seeds_text(seeds: list[int]) -> str:
    return ", ".join(str(s) for s in seeds)


def _spread_caption(opts: ReportOptions, seeds: list[int]) -> str:
    if len(seeds) == 1:
        return f"one run (seed {seeds[0]}), so no spread"
    return f"mean ({SPREADS[opts.spread]}) over seeds {_seeds_text(seeds)}"


def bold_best(values: list[float | None], higher_is_better: bool, digits: int) -> list[bool]:
    """Which entries are the best of the column, compared as shown (rounded to ``digits``),
    so ties in the table are bold together; nothing is bold with fewer than two entries."""
    shown = [None if v is None or math.isnan(v) else round(v, digits) for v in values]
    present = [v for v in shown if v is not None]
    if len(present) < 2:
        return [False] * len(values)
    best = max(present) if higher_is_better else min(present)
    return [v is not None and v == best for v in shown]


def mark_best(rows: list[pd.Series | None], metric: str, digits: int) -> tuple[list[bool], bool]:
    """Which cells of a column are bold, and whether a test decided it: every entry statistically
    tied with the best mean (``stats.tied_with_best``) where seed pairs allow a test, else the best
    mean as shown (``bold_best``; one seed per entry)."""
    by_seed = [None if r is None else r.get(f"{metric}_by_seed") for r in rows]
    tied = tied_with_best(by_seed, HIGHER_IS_BETTER[metric]) if any(by_seed) else None
    if tied is not None:
        return tied, True
    return bold_best([None if r is None else r[metric] for r in rows], HIGHER_IS_BETTER[metric], digits), False


def _bold_caption(tested: bool, scope: str = "column") -> str:
    if tested:
        return (f"bold: the best mean per {scope} and every method that {TEST_CAPTION} does not show to differ "
                f"from it ({TEST_ASSUMPTIONS}; a method with fewer than two seeds in common with the best is not "
                f"tested)")
    return f"the best mean per {scope} in bold (one seed: no test of the difference)"


def _group_index(groups: pd.DataFrame) -> dict[tuple, pd.Series]:
    return {(r["benchmark"], int(r["num_tasks"]), r["method"], r["tag"]): r for _, r in groups.iterrows()}


def _missing_note(r: pd.Series, where: str, names: Names) -> str:
    return (f"{MISSING_MARK} {names.label(r['method'], r['tag'])}, {where}: {r['n_seeds']} seed(s) "
            f"({_seeds_text(r['seeds'])}); missing {_seeds_text(r['missing_seeds'])}.")


def _tag_notes(groups: pd.DataFrame) -> list[str]:
    notes = []
    for _, r in groups[groups["tag"] != ""].drop_duplicates("tag").iterrows():
        how = r.get("overrides") or "command-line overrides"
        what = r.get("variant") or f"[{r['tag']}]"
        notes.append(f"{what}: runs with {how}, not the recipe's (tag {r['tag']} in their file names).")
    return notes


def _expected(groups: pd.DataFrame) -> list[int]:
    return sorted({s for _, r in groups.iterrows() for s in [*r["seeds"], *r["missing_seeds"]]})


# --------------------------------------------------------------------------------------- tables


def layouts_for(groups: pd.DataFrame) -> list[Layout]:
    """The paper's layouts that have results (their empty column groups dropped, extra Ns of
    their benchmarks appended), then one layout per other benchmark, each with all its Ns."""
    names = Names.of(groups)
    continual, _ = split_joint(groups)  # joint-training groups are reference rows, not columns
    have = {(b, int(n)) for b, n in zip(continual["benchmark"], continual["num_tasks"])}
    layouts, covered = [], set()
    for layout in PAPER_LAYOUTS:
        benches = list(dict.fromkeys(b for b, _ in layout.columns))
        covered.update(benches)
        cols = [c for c in layout.columns if c in have]
        cols += sorted(c for c in have if c[0] in benches and c not in layout.columns)
        if cols:
            layouts.append(Layout(layout.name, layout.title, cols, layout.paper_table))
            if layout.several_benchmarks and not layouts[-1].several_benchmarks:
                layouts[-1].title = names.benchmark(cols[0][0])  # "ImageNet-A", not "... and DomainNet"
    for bench in sorted({b for b, _ in have} - covered):
        layouts.append(Layout(f"acc_{bench}", names.benchmark(bench), sorted(c for c in have if c[0] == bench)))
    return layouts


def results_table(groups: pd.DataFrame, layout: Layout, opts: ReportOptions) -> Table:
    """Rows = methods in the paper's order, columns = (benchmark, N) × (Acc, AAA)."""
    names = Names.of(groups)
    metrics = METRIC_SETS[opts.metrics]
    index = _group_index(groups)
    shown = groups[[(b, int(n)) in layout.columns for b, n in zip(groups["benchmark"], groups["num_tasks"])]]
    row_keys = sorted({(m, t) for m, t in zip(shown["method"], shown["tag"])}, key=lambda k: names.sort_key(*k))
    def where(bench: str, n: int) -> str:
        return f"{names.benchmark(bench)} N={n}" if layout.several_benchmarks else f"N={n}"

    cells = [[Cell(names.label(m, t))] for m, t in row_keys]
    notes = []
    tested = False
    for bench, n in layout.columns:
        for metric in metrics:
            rows, texts, marks = [], [], []
            for m, t in row_keys:
                r = index.get((bench, n, m, t))
                rows.append(r)
                if r is None:
                    texts.append("–"), marks.append("")
                    continue
                texts.append(mean_spread(r[metric], r[f"{metric}_spread"], opts.digits))
                marks.append(MISSING_MARK if r["missing_seeds"] else "")
            bold, by_test = mark_best(rows, metric, opts.digits)
            tested = tested or by_test
            for row, text, mark, b in zip(cells, texts, marks, bold):
                row.append(Cell(text, b, mark))
        for m, t in row_keys:
            r = index.get((bench, n, m, t))
            if r is not None and r["missing_seeds"]:
                notes.append(_missing_note(r, where(bench, n), names))
    joint_rows = joint_reference_rows(groups, layout, metrics, opts.digits)
    cells += joint_rows
    joint_caption = (f" Rows marked{JOINT_SUFFIX}: the method trained on every class at once (one task, its "
                     f"recipe's epochs per image), the reference a continual learner aims at; its final Acc is "
                     f"repeated under every N, not compared for ties." if joint_rows else "")
    paper_ref = f" (the layout of the paper's Table {layout.paper_table})" if layout.paper_table else ""
    caption = (f"{layout.title}{paper_ref}: {_spread_caption(opts, _expected(shown))}; {_bold_caption(tested)}. "
               f"{DEFINITIONS[opts.metrics]}{joint_caption}")
    return Table(name=layout.name, caption=caption, columns=["Method"] + [METRIC_HEADERS[m] for m in metrics]
                 * len(layout.columns), rows=cells, groups=[(where(b, n), len(metrics)) for b, n in layout.columns],
                 notes=notes + _tag_notes(shown))


def joint_reference_rows(groups: pd.DataFrame, layout: Layout, metrics: tuple[str, ...], digits: int) -> list[list[Cell]]:
    """The reference rows of a layout: each joint-training group of its benchmarks (``split_joint``),
    its final accuracy (the first metric) under every N of that benchmark, "–" elsewhere."""
    _, joint = split_joint(groups)
    joint = joint[joint["benchmark"].isin({b for b, _ in layout.columns})]
    if joint.empty:
        return []
    names = Names.of(groups)
    index = _group_index(joint)
    keys = sorted({(m, t) for m, t in zip(joint["method"], joint["tag"])}, key=lambda k: names.sort_key(*k))
    rows = []
    for m, t in keys:
        row = [Cell(names.joint_label(m, t))]
        for bench, _ in layout.columns:
            r = index.get((bench, 1, m, t))
            for i, metric in enumerate(metrics):
                if r is None or i:
                    row.append(Cell("–"))
                else:
                    row.append(Cell(mean_spread(r[metric], r[f"{metric}_spread"], digits)))
        rows.append(row)
    return rows


def _benchmark_rank(bench: str) -> tuple[int, str]:
    order = [b for layout in PAPER_LAYOUTS for b, _ in layout.columns]
    return (order.index(bench) if bench in order else len(order), bench)


def _ordered(groups: pd.DataFrame) -> list[pd.Series]:
    names = Names.of(groups)
    rows = [r for _, r in groups.iterrows()]
    return sorted(rows, key=lambda r: (_benchmark_rank(r["benchmark"]), int(r["num_tasks"]),
                                       names.sort_key(r["method"], r["tag"])))


def comparison_table(groups: pd.DataFrame, paper: PaperNumbers, opts: ReportOptions) -> Table | None:
    """Ours beside the paper's, per group the paper reports; None when no group matches."""
    names = Names.of(groups)
    metrics = METRIC_SETS[opts.metrics]
    rows, rules, last_section, notes = [], set(), None, []
    tables_used = set()
    for r in _ordered(groups):
        entries = paper.lookup(r["benchmark"], int(r["num_tasks"]), r["method"], r["tag"], r.get("method_args"))
        if entries.empty:
            continue
        # The same paper row can sit in two tables (SD-LoRA in Tables 2 and 4): keep the one with
        # a spread, then the lower table number.
        entries = (entries.assign(no_spread=entries["spread"].isna())
                   .sort_values(["no_spread", "table"]).drop_duplicates("metric"))
        section = (r["benchmark"], int(r["num_tasks"]))
        if section != last_section:
            rules.add(len(rows))
            last_section = section
        label = names.label(r["method"], r["tag"])
        variant_rows = set(entries["row"])
        if variant_rows - {r["method"]}:
            label += " (" + ", ".join(paper.variants[v].label for v in sorted(variant_rows - {r["method"]})) + ")"
        row = [Cell(names.benchmark(r["benchmark"])), Cell(str(int(r["num_tasks"]))), Cell(label),
               Cell(", ".join(str(t) for t in sorted(set(entries["table"]))))]
        tables_used.update(entries["table"])
        for ours, theirs in zip(metrics, ("acc", "aaa")):
            p = entries[entries["metric"] == theirs]
            row.append(Cell(mean_spread(r[ours], r[f"{ours}_spread"], opts.digits),
                            mark=MISSING_MARK if r["missing_seeds"] else ""))
            if p.empty:
                row += [Cell("–"), Cell("–"), Cell("")]
                continue
            p_mean, p_spread = float(p["mean"].iloc[0]), float(p["spread"].iloc[0])
            diff = r[ours] - p_mean
            flagged = not math.isnan(p_spread) and abs(diff) > 2 * p_spread
            row += [Cell(mean_spread(p_mean, p_spread, opts.digits)), Cell(f"{diff:+.{opts.digits}f}"),
                    Cell(FLAG_MARK if flagged else "")]
        rows.append(row)
        if r["missing_seeds"]:
            notes.append(_missing_note(r, f"{names.benchmark(r['benchmark'])} N={int(r['num_tasks'])}", names))
    if not rows:
        return None
    caveat = ("" if opts.metrics == "sample" else
              " Ours are task-averaged but the paper's are sample-weighted, so the difference mixes two "
              "definitions.")
    no_spread = sorted(t for t in tables_used if paper.accuracy[paper.accuracy["table"] == t]["spread"].isna().all())
    # what the paper's tables say of their own spread (results/paper/*.yaml), not an assumption
    kinds = {t: (SPREADS[paper.spread_kind[t]], paper.runs[t]) for t in sorted(tables_used)}
    if len(set(kinds.values())) == 1:
        (kind, n), = set(kinds.values())
        paper_spread, flag_unit = f"mean ({kind}) over {n} runs", f"the paper's {kind}"
    else:
        paper_spread = "; ".join(f"Table {t}: mean ({k}) over {n} runs" for t, (k, n) in kinds.items())
        flag_unit = "the paper's spread"
    caption = (f"Ours: {_spread_caption(opts, _expected(groups))}. Paper: {paper_spread}. "
               f"Δ = ours − paper; {FLAG_MARK} marks |Δ| > 2 × {flag_unit}"
               + (f" (Table {', '.join(map(str, no_spread))} gives no spread, so those rows are never marked)"
                  if no_spread else "") + f". {DEFINITIONS[opts.metrics]}{caveat}")
    columns = ["Benchmark", "N", "Method", "Table"] + ["ours", "paper", "Δ", ">2 SE"] * len(metrics)
    return Table(name="comparison", caption=caption, columns=columns, rows=rows, label_columns=4,
                 groups=[(METRIC_HEADERS[m], 4) for m in metrics], notes=notes + _tag_notes(groups),
                 rules_before=rules)


def difference_table(groups: pd.DataFrame, reference: str, opts: ReportOptions) -> Table | None:
    """Every group's seed-paired difference to the ``reference`` method (its recipe's runs, or
    ``method+tag``) of the same benchmark and N: mean difference, its 95% t-interval and p."""
    names = Names.of(groups)
    method, _, tag = reference.partition("+")
    metrics = METRIC_SETS[opts.metrics]
    index = _group_index(groups)
    rows, rules, last = [], set(), None
    for r in _ordered(groups):
        ref = index.get((r["benchmark"], int(r["num_tasks"]), method, tag))
        if ref is None or (r["method"], r["tag"]) == (method, tag):
            continue
        section = (r["benchmark"], int(r["num_tasks"]))
        if section != last:
            rules.add(len(rows))
            last = section
        row = [Cell(names.benchmark(r["benchmark"])), Cell(str(int(r["num_tasks"]))),
               Cell(names.label(r["method"], r["tag"]))]
        for metric in metrics:
            d = paired_difference(r[f"{metric}_by_seed"], ref[f"{metric}_by_seed"])
            row += [Cell(interval_text(d, opts.digits), bold=d.significant),
                    Cell("–" if math.isnan(d.p_value) else f"{d.p_value:.3f}"), Cell(str(d.n))]
        rows.append(row)
    if not rows:
        return None
    ref_label = names.label(method, tag)
    caption = (f"Difference to {ref_label} (Δ = method − {ref_label}, in points), paired by seed: the mean "
               f"difference over the seeds both have, its 95% confidence interval (Student t, n − 1 degrees of "
               f"freedom) and the p-value of a two-sided paired t-test (scipy.stats.ttest_rel); bold where p < 0.05. "
               f"Pairs share the training seed and the class order. Assumes the per-seed differences are "
               f"independent and roughly normal; no correction for multiple comparisons; with one pair there is "
               f"no interval. {DEFINITIONS[opts.metrics]}")
    return Table(name="difference", caption=caption,
                 columns=["Benchmark", "N", "Method"] + ["Δ [95% CI]", "p", "seeds"] * len(metrics), rows=rows,
                 label_columns=3, groups=[(METRIC_HEADERS[m], 3) for m in metrics], rules_before=rules,
                 notes=_tag_notes(groups))


def _millions(x: Any) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x / 1e6:.3g}"


def _count(x: Any) -> str:
    """A count, mean over seeds: ``3``, ``2.33``; ``–`` where the runs have none."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:.3g}"


def duration(mean: float, spread: float) -> str:
    """Seconds as ``mean (spread) unit``, in s, min or h by size."""
    if mean is None or math.isnan(mean):
        return "–"
    unit, scale = ("s", 1) if mean < 120 else ("min", 60) if mean < 7200 else ("h", 3600)
    return mean_spread(mean / scale, spread / scale, 1 if unit != "h" else 2) + f" {unit}"


def _memory(r: pd.Series) -> str:
    gpu, tensors, rss = r.get("peak_cuda_mb"), r.get("peak_cpu_tensor_mb"), r.get("peak_rss_mb")
    if gpu is not None and not math.isnan(gpu):
        return f"{gpu / 1024:.2f} GB GPU"
    if tensors is not None and not math.isnan(tensors):  # MB below a GB: synth's models are a few MB
        return (f"{tensors / 1024:.2f} GB" if tensors >= 1024 else f"{tensors:.1f} MB") + " CPU tensors"
    if rss is not None and not math.isnan(rss):  # a file from before the CPU tensor figure
        return f"{rss / 1024:.2f} GB RSS"
    process = r.get("process_rss_mb")  # a result file from before per-run CPU peaks
    if process is not None and not math.isnan(process):
        return f"{process / 1024:.2f} GB RSS (process)"
    return "–"


def cost_table(groups: pd.DataFrame, opts: ReportOptions) -> Table | None:
    """The paper's Table 5, measured, for every group."""
    names = Names.of(groups)
    if groups.empty:
        return None
    rows, rules, last = [], set(), None
    for r in _ordered(groups):
        section = (r["benchmark"], int(r["num_tasks"]))
        if section != last:
            rules.add(len(rows))
            last = section
        rows.append([Cell(names.benchmark(r["benchmark"])), Cell(str(int(r["num_tasks"]))),
                     Cell(names.label(r["method"], r["tag"])), Cell(_gflops(r.get("flops_per_image"))),
                     Cell(_number(r.get("backbone_passes"), 0)), Cell(_millions(r.get("trainable_params_per_task"))),
                     Cell(_millions(r.get("stored_params"))), Cell(_millions(r.get("stored_features"))),
                     Cell(_count(r.get("dropped_tasks"))), Cell(duration(r.get("train_time_s"), r.get("train_time_s_spread"))), Cell(_memory(r))])
    caption = ("Cost, measured from the result files (the paper's Table 5 quotes some of these for ImageNet-R "
               "N=20). GFLOPs/img: forward FLOPs of one test image through the model after the last task, counted "
               "by torch's FlopCounterMode (2 FLOPs per multiply-add, as the paper's 35.12 for ViT-B/16); passes: "
               "full backbone forwards per test image; trainable/task: parameters the optimizers updated, mean over "
               "tasks; stored params: parameters kept beyond the frozen pretrained backbone after the last task; "
               "stored feat.: floats of data statistics kept; dropped tasks: tasks whose new direction "
               "SD-LoRA-KD folded into the old ones and discarded, mean over seeds (– for methods that never "
               "discard); train time/run: training time summed over tasks, "
               f"{_spread_caption(opts, _expected(groups))}; peak memory: the largest peak over tasks, mean over "
               "seeds, of GPU memory allocated by torch (reset per task) where the run had a GPU; 'CPU tensors' "
               "on a CPU: the most bytes of tensors alive at once (parameters, gradients, optimizer state, "
               "activations), traced over the second training step of every stage (its steady state) and one "
               "batch of a method's own passes over the data (evaluation not traced), the CPU's counterpart of "
               "the GPU figure; 'RSS' in files from before that figure: the resident memory the run added (the "
               "high-water mark of each task, reset at its start, above the RSS at the run's start), which reads "
               "low, down to 0, when an earlier run in the same process left memory to reuse; 'RSS (process)': "
               "an older file's high-water mark of the whole process.")
    return Table(name="cost", caption=caption,
                 columns=["Benchmark", "N", "Method", "GFLOPs/img", "passes", "trainable/task (M)",
                          "stored params (M)", "stored feat. (M)", "dropped tasks", "train time/run", "peak memory"],
                 rows=rows, label_columns=3, rules_before=rules, notes=_tag_notes(groups))


def cost_comparison_table(groups: pd.DataFrame, paper: PaperNumbers) -> Table | None:
    """Our measured cost beside the paper's Table 5, for the groups it reports (ImageNet-R N=20)."""
    names = Names.of(groups)
    pc = paper.cost
    if pc.empty or groups.empty:
        return None
    rows = []
    for r in _ordered(groups):
        hit = pc[(pc["benchmark"] == r["benchmark"]) & (pc["num_tasks"] == int(r["num_tasks"]))
                 & (pc["method"] == r["method"])]
        if hit.empty or r["tag"]:
            continue
        p = hit.iloc[0]
        rows.append([Cell(names.label(r["method"], r["tag"])),
                     Cell(_gflops(r.get("flops_per_image"))), Cell(f"{p['gflops']:.2f}"),
                     Cell(_millions(r.get("trainable_params_per_task"))), Cell(f"{p['learnable_params_m']:.2f}"),
                     Cell(_millions(r.get("stored_features"))), Cell(f"{p['stored_features_m']:.2f}")])
    if not rows:
        return None
    b, n = pc.iloc[0]["benchmark"], int(pc.iloc[0]["num_tasks"])
    caption = (f"Cost on {names.benchmark(b)} N={n}: ours (measured; see the cost table) beside the paper's Table 5. "
               "The paper's 35.12 GFLOPs for the LoRA methods assume the LoRAs merged into W0; its learnable "
               "parameters count one task's LoRA and magnitudes (0.37M = 368,640 + 21), not the head, which ours "
               "include.")
    return Table(name="cost_paper", caption=caption,
                 columns=["Method", "ours", "paper", "ours", "paper", "ours", "paper"], rows=rows,
                 groups=[("GFLOPs/img", 2), ("learnable/task (M)", 2), ("stored feat. (M)", 2)])


def _gflops(flops: Any) -> str:
    return "–" if flops is None or (isinstance(flops, float) and math.isnan(flops)) else f"{flops / 1e9:.4g}"


def metrics_table(groups: pd.DataFrame, benchmark: str, opts: ReportOptions) -> Table:
    """Every metric per (N, method) of one benchmark; bold per column within each N."""
    names = Names.of(groups)
    metrics = [*METRIC_SETS["sample"], *METRIC_SETS["task"], "forgetting_max", "forgetting_consecutive"]
    g = groups[groups["benchmark"] == benchmark]
    rows, rules, tested = [], set(), False
    for n in sorted(g["num_tasks"].unique()):
        section = sorted((r for _, r in g[g["num_tasks"] == n].iterrows()),
                         key=lambda r: names.sort_key(r["method"], r["tag"]))
        rules.add(len(rows))
        block = [[Cell(str(int(n))), Cell(names.label(r["method"], r["tag"]))] for r in section]
        for metric in metrics:
            bold, by_test = mark_best(section, metric, opts.digits)
            tested = tested or by_test
            for row, r, b in zip(block, section, bold):
                row.append(Cell(mean_spread(r[metric], r[f"{metric}_spread"], opts.digits), b,
                                MISSING_MARK if r["missing_seeds"] else ""))
        rows += block
    notes = [_missing_note(r, f"N={int(r['num_tasks'])}", names) for r in _ordered(g) if r["missing_seeds"]]
    caption = (f"{names.benchmark(benchmark)}, every metric: {_spread_caption(opts, _expected(g))}; "
               f"{_bold_caption(tested, 'column and N')} (lowest for forgetting). Sample-weighted: {DEFINITIONS['sample']} "
               f"Task-averaged: {DEFINITIONS['task']} {FORGETTING_DEFINITIONS}")
    return Table(name=f"metrics_{benchmark}", caption=caption,
                 columns=["N", "Method"] + [METRIC_HEADERS[m] for m in metrics], rows=rows, label_columns=2,
                 groups=[("sample-weighted", 2), ("task-averaged", 2), ("forgetting", 2)],
                 notes=notes + _tag_notes(g), rules_before=rules)


# ---------------------------------------------------------------------------------------- report


def build_report(root: Path, opts: ReportOptions | None = None, paper: PaperNumbers | None = None) -> Report:
    """Every table (no files written) for the result files under ``root``."""
    opts = opts or ReportOptions()
    paper = paper or load_paper()
    runs = load_runs(root)
    if not runs.empty and opts.benchmarks:
        runs = runs[runs["benchmark"].isin(opts.benchmarks)]
    if not runs.empty and opts.seeds is not None:
        runs = runs[runs["seed"].isin(opts.seeds)]
    groups = aggregate(runs, opts.spread, opts.seeds)
    selection, all_names = None, Names.of(groups)
    if opts.select == "best-val" and not runs.empty:
        selection = select_best_val(groups, METRIC_SETS[opts.metrics][0])
        runs, groups = selection.keep(runs), selection.keep(groups)
    held_out = 0
    if selection is None and not runs.empty:  # validation runs are for choosing, not for the tables
        held_out = int((runs["eval_on"] == "val").sum())
        runs, groups = runs[runs["eval_on"] != "val"], groups[groups["eval_on"] != "val"]
    report = Report(runs=runs, groups=groups, held_out=held_out)
    if selection is not None:
        report.tables.append(selection_table(selection, all_names, opts.digits))
    if runs.empty:
        return report
    report.tables += [results_table(groups, layout, opts) for layout in layouts_for(groups)]
    difference = difference_table(groups, opts.reference, opts) if opts.reference else None
    report.tables += [t for t in (difference, comparison_table(groups, paper, opts),
                                  ranking_table(groups, paper, opts.digits), cost_table(groups, opts),
                                  cost_comparison_table(groups, paper)) if t]
    report.tables += [metrics_table(groups, b, opts) for b in sorted(groups["benchmark"].unique(), key=_benchmark_rank)]
    return report


def write_report(out_root: Path, opts: ReportOptions | None = None, echo: bool = True) -> list[Path]:
    """Write every table and figure for the results under ``out_root``; returns the files.
    Called by the sweep after its runs; a failure here is reported, not raised, so that a
    finished sweep never ends in a traceback (``run_suite.py report`` shows it in full)."""
    try:
        return _write_report(Path(out_root), opts or ReportOptions(), echo)
    except Exception:  # noqa: BLE001 - see docstring
        print(f"\nthe report failed; the result files are intact. Rerun it with "
              f"`python run_suite.py report --out {out_root}`:\n{traceback.format_exc()}")
        return []


def _write_report(root: Path, opts: ReportOptions, echo: bool) -> list[Path]:
    paper = load_paper()
    report = build_report(root, opts, paper)
    if not report.tables:
        if echo:
            val = report.held_out
            print(f"no finished runs under {root / 'runs'}: nothing to report" if not val else
                  f"{val} run(s) under {root / 'runs'} evaluated on validation only: choose among them with "
                  f"`clbench report --select best-val`")
        return []
    tables_dir, figures_dir = root / "tables", root / "figures"
    written = []
    for t in report.tables:
        for suffix, text in ((".md", t.to_markdown()), (".tex", t.to_latex())):
            path = tables_dir / f"{t.name}{suffix}"
            files.atomic_write_text(path, text)
            written.append(path)
    if opts.figures:
        report.figures = write_figures(report.runs, figures_dir, opts.spread, METRIC_SETS[opts.metrics][0],
                                       paper.accuracy)
        written += report.figures
    document = tables_dir / "tables.tex"
    files.atomic_write_text(document, latex_document(report.tables))
    summary = tables_dir / "summary.csv"
    files.atomic_write_text(summary, csv_frame(report.groups.drop(columns=["method_args"], errors="ignore"))
                            .to_csv(index=False))
    index = tables_dir / "report.md"
    files.atomic_write_text(index, report_markdown(report, tables_dir))
    written += [document, summary, index]
    if echo:  # the per-benchmark metric details stay in their files
        print("\n" + "\n".join(t.to_markdown() for t in report.tables if not t.name.startswith("metrics_")))
        print(f"tables: {tables_dir.resolve()} ({len(report.tables)} tables, Markdown and LaTeX; all in report.md)")
        if opts.figures:
            print(f"figures: {figures_dir.resolve()} ({len(report.figures) // 2} figures, PNG and PDF)")
    return written


def csv_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """A copy whose structured cells (lists, dicts, dataclasses such as ``MethodInfo``) are JSON
    text, so that a CSV reader gets ``json.loads``-able values rather than Python reprs."""
    def cell(value: Any) -> Any:
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            value = dataclasses.asdict(value)
        if isinstance(value, (list, tuple, dict)):
            return json.dumps(value, sort_keys=True, default=str)
        return value

    return frame.apply(lambda column: column.map(cell)) if not frame.empty else frame


def report_markdown(report: Report, tables_dir: Path) -> str:
    """Every table, then every PNG figure, as one Markdown page (links relative to tables/)."""
    parts = ["# Results", "", f"{len(report.runs)} runs in {len(report.groups)} groups "
             f"(benchmark × N × method × tag).", ""]
    parts += [t.to_markdown() for t in report.tables]
    pngs = [p for p in report.figures if p.suffix == ".png"]
    if pngs:
        parts += ["## Figures", ""]
        parts += [f"![{p.stem}]({Path('..') / p.parent.name / p.name})\n" for p in pngs]
    return "\n".join(parts)


def compile_latex(tex: Path, out_dir: Path | None = None) -> Path | None:
    """Compile a standalone ``.tex`` with pdflatex; the PDF path, or None without pdflatex.
    Raises ``RuntimeError`` with the log's error lines when LaTeX fails."""
    if shutil.which("pdflatex") is None:
        return None
    out_dir = Path(out_dir or tempfile.mkdtemp(prefix="clbench-tex-"))
    proc = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error",
                           f"-output-directory={out_dir}", str(tex)], capture_output=True, text=True, timeout=120)
    pdf = out_dir / (Path(tex).stem + ".pdf")
    if proc.returncode != 0 or not pdf.exists():
        errors = [line for line in proc.stdout.splitlines() if line.startswith("!")]
        raise RuntimeError(f"pdflatex failed on {tex}: {' | '.join(errors) or proc.stdout[-800:]}")
    return pdf


# ------------------------------------------------------------------------------------------ CLI


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = "Tables (Markdown, LaTeX), a comparison with the paper, a cost table and figures."
    p.add_argument("--out", type=Path, default=None, help="results root (default $CLBENCH_RESULTS or ./results)")
    p.add_argument("--spread", choices=sorted(SPREADS), default="sem",
                   help="sem: standard error, as the paper (default); std: standard deviation")
    p.add_argument("--metrics", choices=sorted(METRIC_SETS), default="sample",
                   help="sample: SD-LoRA's sample-weighted Acc/AAA (default); task: the task-averaged variants")
    p.add_argument("--seeds", type=lambda s: [int(v) for v in s.split(",") if v.strip()], default=None,
                   help="the seeds every row should have, e.g. 0,1,2,3,4 (default: those found)")
    p.add_argument("--bench", type=lambda s: [v.strip() for v in s.split(",") if v.strip()], default=None,
                   help="only these benchmarks")
    p.add_argument("--no-figures", action="store_true", help="tables only")
    p.add_argument("--reference", default="sdlora", metavar="METHOD[+TAG]",
                   help="the difference table's reference: each method's seed-paired difference to it, with a 95%% "
                        "interval (default sdlora; 'none' for no such table)")
    p.add_argument("--select", choices=["best-val"], default=None,
                   help="best-val: per benchmark, N and method, the configuration with the best final Acc on the "
                        "validation split (runs of --eval-on val); the tables show its test runs, a table says "
                        "what was chosen")
    p.add_argument("--pdf", action="store_true", help="also compile tables/tables.tex with pdflatex")


def main(args: argparse.Namespace) -> int:
    root = args.out or record.default_root()
    if not (root / "runs").is_dir():
        print(f"error: no result files under {root / 'runs'}; run a sweep first, or pass --out <results root>")
        return 1
    opts = ReportOptions(spread=args.spread, metrics=args.metrics, seeds=args.seeds, benchmarks=args.bench,
                         figures=not args.no_figures, select=args.select,
                         reference=None if args.reference == "none" else args.reference)
    written = _write_report(root, opts, echo=True)
    if not written:
        return 1
    if args.pdf:
        pdf = compile_latex(root / "tables" / "tables.tex", root / "tables")
        print(f"pdf: {pdf}" if pdf else "pdf: pdflatex is not installed; tables.tex left uncompiled")
    return 0


COMMANDS = {"report": (add_arguments, main)}
