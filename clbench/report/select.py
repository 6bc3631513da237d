"""``clbench report --select best-val``: each method's configuration chosen on validation.

A grid (``--set train.lr=0.005,0.01``) run with ``--eval-on val`` trains every configuration on the
training images less a validation split and evaluates on that split; those runs never read a
test image. Per benchmark, N and method, the configuration with the best mean final accuracy
over seeds on validation is chosen here, from those numbers alone. Its test numbers come from a
run of its own: the same configuration without ``--eval-on val`` (trained on all the training
images, evaluated on the test set, as a recipe's run is), which the report shows in its tables;
the other configurations' test runs, if any, are left out of them. Where the chosen
configuration has no test run yet, the selection table gives the command that makes it.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from clbench.config import overrides_tag, set_arguments
from clbench.report.aggregate import HIGHER_IS_BETTER, Names
from clbench.report.table import Cell, Table

VAL_KEYS = ("eval_on", "val_fraction", "val_seed")  # data.* keys that make a run a validation run
CHOSEN_MARK = "✓"


def test_overrides(overrides: dict[str, Any]) -> dict[str, Any]:
    """A validation run's overrides as its configuration's test run has them: without ``VAL_KEYS``."""
    out = copy.deepcopy(overrides or {})
    data = out.get("data")
    if isinstance(data, dict):
        for key in VAL_KEYS:
            data.pop(key, None)
        if not data:
            del out["data"]
    return out


@dataclass
class Choice:
    """One (benchmark, N, method): its validated configurations and the one chosen."""

    benchmark: str
    num_tasks: int
    method: str
    candidates: list[pd.Series]  # validation groups, in label order
    chosen: int  # index into candidates
    test_tag: str  # the tag of the chosen configuration's test runs ("" = the recipe's)
    test_found: bool
    command: str  # what makes the chosen configuration's test runs


@dataclass
class Selection:
    metric: str
    choices: list[Choice] = field(default_factory=list)

    def keep(self, frame: pd.DataFrame) -> pd.DataFrame:
        """Runs or groups without validation runs, and, for each method that was chosen for,
        only the chosen configuration's test runs."""
        if frame.empty:
            return frame
        keep = frame["eval_on"] != "val"
        for c in self.choices:
            same = (frame["benchmark"] == c.benchmark) & (frame["num_tasks"] == c.num_tasks) & \
                (frame["method"] == c.method)
            keep &= ~same | (frame["tag"] == c.test_tag)
        return frame[keep]


def select_best_val(groups: pd.DataFrame, metric: str = "acc") -> Selection:
    """Choose per (benchmark, N, method) among its validation groups (``eval_on == 'val'``) the
    best mean ``metric``; a tie goes to the first in label order. Reads validation numbers only."""
    selection = Selection(metric)
    if groups.empty or "eval_on" not in groups:
        return selection
    names = Names.of(groups)
    tests = {(r["benchmark"], int(r["num_tasks"]), r["method"], r["tag"])
             for _, r in groups[groups["eval_on"] != "val"].iterrows()}
    val = groups[groups["eval_on"] == "val"]
    for (bench, n, method), g in val.groupby(["benchmark", "num_tasks", "method"], sort=True):
        candidates = sorted((r for _, r in g.iterrows()), key=lambda r: names.label(r["method"], r["tag"]))
        sign = 1 if HIGHER_IS_BETTER[metric] else -1
        scores = [sign * r[metric] if not math.isnan(r[metric]) else -math.inf for r in candidates]
        chosen = scores.index(max(scores))
        overrides = test_overrides(candidates[chosen].get("config_overrides") or {})
        tag = overrides_tag(overrides)
        seeds = ",".join(str(s) for s in candidates[chosen]["seeds"])
        command = f"clbench --bench {bench} --tasks {int(n)} --methods {method} --seeds {seeds} " + \
            set_arguments(overrides)
        selection.choices.append(Choice(bench, int(n), method, candidates, chosen, tag,
                                        (bench, int(n), method, tag) in tests, command.strip()))
    return selection


def selection_table(selection: Selection, names: Names, digits: int = 2) -> Table:
    """What ``select_best_val`` chose, with every candidate's validation score."""
    rows, rules, notes = [], set(), []
    for c in selection.choices:
        rules.add(len(rows))
        for i, r in enumerate(c.candidates):
            spread = r[f"{selection.metric}_spread"]
            score = f"{r[selection.metric]:.{digits}f}" + ("" if math.isnan(spread) else f" ({spread:.{digits}f})")
            chosen = i == c.chosen
            test = ("yes" if c.test_found else "not yet run") if chosen else ""
            rows.append([Cell(names.benchmark(c.benchmark)), Cell(str(c.num_tasks)),
                         Cell(names.label(r["method"], r["tag"])), Cell(str(r["n_seeds"])),
                         Cell(score, bold=chosen), Cell(CHOSEN_MARK if chosen else ""), Cell(test)])
        if not c.test_found:
            notes.append(f"{names.benchmark(c.benchmark)} N={c.num_tasks}, {names.label(c.method)}: the chosen "
                         f"configuration has no test runs yet; make them with `{c.command}`.")
    splits = sorted({r["val_split"] for c in selection.choices for r in c.candidates if r.get("val_split")})
    caption = ("Configurations chosen on validation: per benchmark, N and method, the runs of --eval-on val were "
               f"trained on the training images less a validation split ({'; '.join(splits) or 'see data.val_fraction'}) "
               f"and evaluated on that split, never reading a test image; the configuration with the best mean final "
               f"validation {'Acc' if selection.metric == 'acc' else selection.metric} over seeds is chosen "
               f"({CHOSEN_MARK}; mean (spread) over seeds). The other tables show the chosen configuration's own test "
               "runs (trained on all the training images, evaluated on the test set); test runs of the configurations "
               "not chosen are left out of them.")
    return Table(name="selection", caption=caption,
                 columns=["Benchmark", "N", "Configuration", "seeds", "val Acc", "chosen", "test runs"], rows=rows,
                 label_columns=3, rules_before=rules, notes=notes)
