"""The ``ranking`` table: our order of the paper's methods beside the paper's, with Kendall's tau.

For every benchmark and N with results of at least three of the paper's methods (their recipes'
runs), the methods ranked by our mean final Acc and by the paper's, and Kendall's tau-b between
the two orders (``scipy.stats.kendalltau``, which counts ties) with its two-sided p-value. A
benchmark the paper reports is ranked against its own numbers; one it does not is ranked against
the benchmark it stands in for (its registration's ``stands_in_for``: synth against ImageNet-R at
the same N).
Reference rows (SimpleCIL, joint training) have no paper number and are left out.
"""
from __future__ import annotations

import math

import pandas as pd
from scipy import stats

from clbench.benchmarks import BENCHMARKS
from clbench.report.aggregate import Names, split_joint
from clbench.report.reference import PaperNumbers
from clbench.report.table import Cell, Table

MIN_METHODS = 3


def paper_ranking(paper: PaperNumbers, benchmark: str, num_tasks: int) -> tuple[int, pd.Series] | None:
    """``(table, Acc per method)`` of the paper's main-table rows for (benchmark, N): the lowest
    table number that has them (SD-LoRA sits in Tables 2 and 4 too); None when it has none."""
    a = paper.accuracy
    rows = a[(a["benchmark"] == benchmark) & (a["num_tasks"] == num_tasks) & (a["metric"] == "acc")]
    main_rows = {v.row for v in paper.variants.values() if v.row == v.method and v.method_args == {}}
    rows = rows[rows["row"].isin(main_rows)]
    if rows.empty:
        return None
    table = int(rows["table"].min())
    rows = rows[rows["table"] == table]
    return table, rows.set_index("row")["mean"].astype(float)


def kendall_tau(ours: pd.Series, theirs: pd.Series) -> tuple[float, float]:
    """Kendall's tau-b of two scores of the same items, and its two-sided p-value."""
    result = stats.kendalltau(ours.to_numpy(), theirs.to_numpy())
    return float(result.statistic), float(result.pvalue)


def ranking_table(groups: pd.DataFrame, paper: PaperNumbers, digits: int = 2) -> Table | None:
    """One section per (benchmark, N): each of the paper's methods with our Acc and rank beside
    the paper's; Kendall's tau in the notes. None when no benchmark has enough of them."""
    continual, _ = split_joint(groups)
    if continual.empty:
        return None
    names = Names.of(groups)
    recipes = continual[(continual["tag"] == "") & (continual["eval_on"] != "val")]
    rows: list[list[Cell]] = []
    rules, notes = set(), []
    for (bench, n), g in recipes.groupby(["benchmark", "num_tasks"], sort=False):
        n = int(n)
        against, found = bench, paper_ranking(paper, bench, n)
        stands_in_for = BENCHMARKS[bench].stands_in_for if bench in BENCHMARKS else None
        if found is None and stands_in_for is not None:
            against = stands_in_for
            found = paper_ranking(paper, against, n)
        if found is None:
            continue
        table, theirs = found
        ours = g.set_index("method")["acc"].astype(float)
        common = [m for m in theirs.index if m in ours.index and not math.isnan(ours[m])]
        if len(common) < MIN_METHODS:
            continue
        ours, theirs = ours[common], theirs[common]
        our_rank = ours.rank(ascending=False, method="min").astype(int)
        their_rank = theirs.rank(ascending=False, method="min").astype(int)
        tau, p = kendall_tau(ours, theirs)
        rules.add(len(rows))
        title = names.benchmarks.get(against) or (BENCHMARKS[against].title if against in BENCHMARKS else against)
        where = f"{title} N={n} (Table {table})"
        for m in sorted(common, key=lambda m: (our_rank[m], m)):
            rows.append([Cell(names.benchmark(bench)), Cell(str(n)), Cell(names.label(m, "")),
                         Cell(f"{ours[m]:.{digits}f}"), Cell(str(our_rank[m])),
                         Cell(where), Cell(f"{theirs[m]:.{digits}f}"), Cell(str(their_rank[m]))])
        notes.append(f"{names.benchmark(bench)} N={n} against {where}: Kendall's tau-b = {tau:+.2f} "
                     f"(p = {p:.3f}, {len(common)} methods)")
    if not rows:
        return None
    caption = ("Our order of the paper's methods beside the paper's: final Acc (our mean over seeds; the paper's "
               "mean over its runs) and rank (1 = best; ties share the better rank), and Kendall's tau-b "
               "between the two orders with its two-sided p-value (scipy.stats.kendalltau). A benchmark the "
               "paper does not report is ranked against the one it stands in for (synth: ImageNet-R, same N). "
               "Reference rows (SimpleCIL, joint training) have no paper number and are not ranked.")
    return Table(name="ranking", caption=caption,
                 columns=["Benchmark", "N", "Method", "Acc", "rank", "paper", "paper Acc", "paper rank"],
                 rows=rows, label_columns=3, rules_before=rules, notes=notes)
