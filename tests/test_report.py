"""The report on hand-made result files: aggregation over seeds, the paper's layouts, bold and
footnote placement, the comparison flag, Markdown/LaTeX golden files, figures and the CLI.

Result files are written by ``helpers.write_run`` (a small factory of what clbench/protocol.py writes);
accuracy counts are chosen so every expected number can be worked out by hand.

Golden files live in tests/golden/; after an intended change of the output, regenerate them
with ``UPDATE_GOLDEN=1 python -m pytest -q tests/test_report.py`` and review the diff.
"""
from __future__ import annotations

import math
import os
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest
from helpers import counts_for_curve, write_run

from clbench import record
from clbench.record import TaskRecord
from clbench.report.aggregate import aggregate, load_runs, magnitude_history, spread_of
from clbench.report.command import ReportOptions, bold_best, build_report, compile_latex, write_report
from clbench.report.reference import PaperDataError, load_paper
from clbench.report.table import Cell, Table, latex_document

GOLDEN = Path(__file__).parent / "golden"


# ------------------------------------------------------------------------------------ golden files


def check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("UPDATE_GOLDEN"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert path.exists(), f"missing golden file {path}; create it with UPDATE_GOLDEN=1"
    assert text == path.read_text(), f"{name} differs from its golden file (UPDATE_GOLDEN=1 to accept)"


@pytest.fixture
def toy_root(tmp_path) -> Path:
    """toy N=2: full_ft with final Acc 70/80/90 (seeds 0-2), sdlora with 85/95 (seed 2 missing),
    and a tagged full_ft run. After task 0 every run is at 100%, so AAA = (100 + Acc) / 2."""
    root = tmp_path / "results"
    for seed, acc in zip([0, 1, 2], [70.0, 80.0, 90.0]):
        write_run(root, "toy", "full_ft", seed, [100.0, acc])
    for seed, acc in zip([0, 1], [85.0, 95.0]):
        write_run(root, "toy", "sdlora", seed, [100.0, acc], magnitudes=True)
    write_run(root, "toy", "full_ft", 0, [100.0, 50.0], tag="cfg0000beef",
              argv=["run_suite.py", "--bench", "toy", "--set", "train.epochs=1"])
    return root


# ---------------------------------------------------------------------------------- aggregation


def test_counts_factory_gives_the_curve():
    from clbench.metrics import accuracy_curve

    c, n = counts_for_curve([100.0, 81.5, 77.3])
    assert accuracy_curve(c, n).tolist() == pytest.approx([100.0, 81.5, 77.3])


def test_mean_std_sem_and_missing_seeds(toy_root):
    runs = load_runs(toy_root)
    assert len(runs) == 6
    std = aggregate(runs, "std").set_index(["method", "tag"])
    sem = aggregate(runs, "sem").set_index(["method", "tag"])
    ft = std.loc[("full_ft", "")]
    assert ft["acc"] == pytest.approx(80.0) and ft["aaa"] == pytest.approx(90.0)
    assert ft["acc_spread"] == pytest.approx(10.0)  # sample std of 70, 80, 90 (ddof=1)
    assert sem.loc[("full_ft", ""), "acc_spread"] == pytest.approx(10.0 / math.sqrt(3))
    assert ft["n_seeds"] == 3 and ft["missing_seeds"] == []
    sd = std.loc[("sdlora", "")]
    assert sd["acc"] == pytest.approx(90.0) and sd["seeds"] == [0, 1] and sd["missing_seeds"] == [2]
    tagged = std.loc[("full_ft", "cfg0000beef")]
    assert tagged["n_seeds"] == 1 and math.isnan(tagged["acc_spread"]) and tagged["missing_seeds"] == [1, 2]
    assert tagged["overrides"] == "--set train.epochs=1"


def test_expected_seeds_can_be_given(toy_root):
    agg = aggregate(load_runs(toy_root), "std", seeds=[0, 1, 2, 3, 4]).set_index(["method", "tag"])
    assert agg.loc[("full_ft", ""), "missing_seeds"] == [3, 4]


def test_spread_of_rejects_unknown_names_and_needs_two_values():
    assert spread_of([1.0, 3.0], "std") == pytest.approx(math.sqrt(2))
    assert spread_of([1.0, 3.0], "sem") == pytest.approx(1.0)
    assert math.isnan(spread_of([5.0], "sem"))
    with pytest.raises(ValueError, match="spread must be one of"):
        spread_of([1.0, 2.0], "var")


def test_magnitude_history_is_robust_to_what_methods_log():
    def tasks(*logs):
        return [TaskRecord(task=i, classes=[], train_time_s=0.0, eval_time_s=0.0, accuracy=0.0, cost={},
                           method_log=log) for i, log in enumerate(logs)]

    assert magnitude_history(tasks({}), "alpha") is None
    assert magnitude_history(tasks({"alpha": [0.8]}), None) is None  # the method registered no key
    assert magnitude_history(tasks({"alpha": [[0.1, 0.2]]}), "alpha") is None  # not flat: left out
    assert magnitude_history(tasks({"alpha": [0.8]}, {"alpha": [0.9, 1.1]}), "alpha") == [[0.8], [0.9, 1.1]]


# ---------------------------------------------------------------------------------------- tables


def test_bold_best_compares_what_is_shown():
    assert bold_best([77.731, 77.728, 70.0], True, 2) == [True, True, False]  # both show 77.73
    assert bold_best([3.0, 1.0, None], False, 2) == [False, True, False]  # forgetting: lower wins
    assert bold_best([50.0, None], True, 2) == [False, False]  # a single entry is not "best"


def test_results_table_bold_missing_mark_and_notes(toy_root):
    report = build_report(toy_root, ReportOptions(spread="std", figures=False))
    table = next(t for t in report.tables if t.name == "acc_toy")
    frame = {row[0].text: row for row in table.rows}
    # the tagged run is labelled by what its --set changed; the tag stays in its file name
    assert list(frame) == ["Full Fine-Tuning", "Full Fine-Tuning epochs=1", "SD-LoRA"]
    acc_ft, acc_sd = frame["Full Fine-Tuning"][1], frame["SD-LoRA"][1]
    # SD-LoRA beats full_ft by exactly 15 points on both shared seeds: a real difference, not a tie
    assert acc_ft.text == "80.00 (10.00)" and not acc_ft.bold and acc_ft.mark == ""
    assert acc_sd.text == "90.00 (7.07)" and acc_sd.bold and acc_sd.mark == "†"
    assert frame["Full Fine-Tuning epochs=1"][1].text == "50.00"  # one seed: no spread
    assert any("SD-LoRA, N=2: 2 seed(s) (0, 1); missing 2." in n for n in table.notes)
    assert any(n.startswith("epochs=1: runs with --set train.epochs=1, not the recipe's (tag cfg0000beef")
               for n in table.notes)
    assert "seed-paired two-sided t-test" in table.caption
    assert "standard deviation" in table.caption and "sample-weighted" in table.caption


def test_task_averaged_metrics_on_request(tmp_path):
    # Unbalanced tasks: 10 and 30 test images; after task 1: task 0 at 50%, task 1 at 90%.
    counts = ([[10, 0], [5, 27]], [[10, 0], [10, 30]])
    write_run(tmp_path, "toy", "full_ft", 0, counts=counts)
    write_run(tmp_path, "toy", "full_ft", 1, counts=counts)
    sample = build_report(tmp_path, ReportOptions(figures=False)).tables[0]
    task = build_report(tmp_path, ReportOptions(metrics="task", figures=False)).tables[0]
    assert sample.rows[0][1].text == "80.00 (0.00)"  # 32 / 40
    assert task.rows[0][1].text == "70.00 (0.00)"  # (50 + 90) / 2
    assert "task-averaged" in task.caption and "L2P" in task.caption


def test_paper_layouts_group_benchmarks(tmp_path):
    for n in (5, 10):
        write_run(tmp_path, "imr", "sdlora", 0, [100.0] * (n - 1) + [80.0])
    write_run(tmp_path, "ima", "sdlora", 0, [100.0] * 9 + [60.0])
    write_run(tmp_path, "dn", "sdlora", 0, [100.0] * 4 + [70.0])
    names = [t.name for t in build_report(tmp_path, ReportOptions(figures=False)).tables]
    assert names[:2] == ["acc_imr", "acc_ima_dn"]
    imr = build_report(tmp_path, ReportOptions(figures=False)).tables[0]
    assert imr.groups == [("N=5", 2), ("N=10", 2)]  # N=20 has no runs: no empty columns
    ima_dn = build_report(tmp_path, ReportOptions(figures=False)).tables[1]
    assert ima_dn.groups == [("ImageNet-A N=10", 2), ("DomainNet N=5", 2)]


def test_comparison_flags_differences_beyond_two_paper_standard_errors(tmp_path):
    # The paper: N=10 Acc 77.34 (0.35) -> 2 SE = 0.70; N=20 Acc 75.26 (0.37) -> 0.74.
    # Ours: N=10 final 78.00 (+0.66, inside), N=20 final 76.10 (+0.84, outside).
    for seed in (0, 1):
        write_run(tmp_path, "imr", "sdlora", seed, [90.0] * 9 + [78.0])
        write_run(tmp_path, "imr", "sdlora", seed, [90.0] * 19 + [76.1])
        write_run(tmp_path, "c100", "sdlora", seed, [90.0] * 9 + [10.0])  # Table 6: no spread, never flagged
    table = next(t for t in build_report(tmp_path, ReportOptions(figures=False)).tables if t.name == "comparison")
    rows = {(r[0].text, r[1].text): r for r in table.rows}
    n10, n20, c100 = rows[("ImageNet-R", "10")], rows[("ImageNet-R", "20")], rows[("CIFAR-100", "10")]
    # columns: Benchmark, N, Method, Table, then (ours, paper, Δ, >2 SE) for Acc and for AAA
    assert [c.text for c in n10[4:8]] == ["78.00 (0.00)", "77.34 (0.35)", "+0.66", ""]
    assert [c.text for c in n20[4:8]] == ["76.10 (0.00)", "75.26 (0.37)", "+0.84", "!"]
    assert [c.text for c in c100[4:8]] == ["10.00 (0.00)", "88.01", "-78.01", ""]
    # AAA N=10: (9 * 90 + 78) / 10 = 88.80 vs 82.04 (0.24) -> flagged
    assert [c.text for c in n10[8:12]] == ["88.80 (0.00)", "82.04 (0.24)", "+6.76", "!"]
    assert n10[3].text == "2"  # also in Table 4, without a spread: Table 2's entry is the one shown
    assert "Table 6 gives no spread" in table.caption


def test_cost_table_from_result_files(toy_root):
    table = next(t for t in build_report(toy_root, ReportOptions(figures=False)).tables if t.name == "cost")
    ft = next(r for r in table.rows if r[2].text == "Full Fine-Tuning")
    by_column = dict(zip(table.columns, (c.text for c in ft)))
    assert by_column["GFLOPs/img"] == "0.004"
    assert by_column["passes"] == "1"
    assert by_column["trainable/task (M)"] == "0.0015"  # tasks updated 1000 and 2000 parameters
    assert by_column["stored params (M)"] == "0.005"
    assert by_column["train time/run"] == "10.0 (0.0) s"
    assert by_column["peak memory"] == "0.50 GB RSS (process)"  # a file with only the process-wide mark
    assert by_column["dropped tasks"] == "–"  # a method that never discards a task


def test_cost_table_says_which_memory_figure_it_shows(tmp_path):
    """GPU runs: torch's allocated peak; CPU runs: live tensor bytes (MB below a GB); files from
    before that figure: the RSS the run added, labelled as such."""
    root = tmp_path / "results"
    write_run(root, "toy", "full_ft", 0, [100.0, 80.0], memory={"cuda_peak_allocated_mb": 2048.0})
    write_run(root, "toy", "sdlora", 0, [100.0, 80.0], memory={"cpu_peak_live_tensor_mb": 14.4,
                                                               "cpu_peak_rss_mb": 0.0})
    write_run(root, "toy", "sdlora", 1, [100.0, 80.0], memory={"cpu_peak_live_tensor_mb": 14.6,
                                                               "cpu_peak_rss_mb": 0.0})
    write_run(root, "toy", "inflora", 0, [100.0, 80.0], memory={"cpu_peak_live_tensor_mb": 3000.0})
    write_run(root, "toy", "l2p", 0, [100.0, 80.0], memory={"cpu_peak_rss_mb": 100.0})  # an older file
    table = next(t for t in build_report(root, ReportOptions(figures=False)).tables if t.name == "cost")
    memory = {r[2].text: r[table.columns.index("peak memory")].text for r in table.rows}
    assert memory == {"Full Fine-Tuning": "2.00 GB GPU", "SD-LoRA": "14.5 MB CPU tensors",
                      "InfLoRA": "2.93 GB CPU tensors", "L2P": "0.10 GB RSS"}, memory
    assert "'CPU tensors' on a CPU: the most bytes of tensors alive at once" in table.caption


def test_cost_table_counts_the_tasks_sd_lora_kd_dropped(tmp_path):
    """Mean over seeds of the last task's ``dropped_tasks`` (SD-LoRA-KD's cost report)."""
    for seed, dropped in ((0, 2), (1, 3)):
        path = write_run(tmp_path, "toy", "sdlora_kd", seed, [50.0, 25.0])
        result = record.read_result(path)
        result.cost["dropped_tasks"] = dropped
        record.write_result(path, result)
    table = next(t for t in build_report(tmp_path, ReportOptions(figures=False)).tables if t.name == "cost")
    assert dict(zip(table.columns, (c.text for c in table.rows[0])))["dropped tasks"] == "2.5"


def test_cost_comparison_with_the_papers_table_5(tmp_path):
    write_run(tmp_path, "imr", "sdlora", 0, [90.0] * 19 + [76.0], flops=35_120_000_000)
    table = next(t for t in build_report(tmp_path, ReportOptions(figures=False)).tables if t.name == "cost_paper")
    assert [c.text for c in table.rows[0]] == ["SD-LoRA", "35.12", "35.12", "0.0105", "0.37", "0", "0.00"]


# ---------------------------------------------------------------------------- golden renderings


@pytest.fixture
def golden_root(tmp_path) -> Path:
    root = tmp_path / "results"
    for seed, acc in zip([0, 1, 2], [70.0, 80.0, 90.0]):
        write_run(root, "toy", "full_ft", seed, [100.0, acc])
    for seed, acc in zip([0, 1], [85.0, 95.0]):
        write_run(root, "toy", "sdlora", seed, [100.0, acc])
    for seed, acc in zip([0, 1, 2], [76.0, 77.5, 78.0]):
        write_run(root, "imr", "sdlora", seed, [90.0] * 9 + [acc])
        write_run(root, "imr", "full_ft", seed, [80.0] * 9 + [acc - 18])
    return root


def test_markdown_and_latex_match_golden_files(golden_root):
    report = build_report(golden_root, ReportOptions(figures=False))
    tables = {t.name: t for t in report.tables}
    for name in ("acc_imr", "acc_toy", "comparison"):
        check_golden(f"{name}.md", tables[name].to_markdown())
        check_golden(f"{name}.tex", tables[name].to_latex())


def latex_problems(source: str) -> list[str]:
    """Structural checks that hold for any table we write (used where pdflatex is absent)."""
    problems = []
    for env in ("document", "table", "tabular"):
        if source.count(rf"\begin{{{env}}}") != source.count(rf"\end{{{env}}}"):
            problems.append(f"unbalanced {env}")
    if source.replace(r"\{", "").count("{") != source.replace(r"\}", "").count("}"):
        problems.append("unbalanced braces")
    for tabular in re.findall(r"\\begin\{tabular\}\{(\w+)\}(.*?)\\end\{tabular\}", source, re.S):
        ncol, body = len(tabular[0]), tabular[1]
        for line in body.splitlines():
            if line.endswith(r"\\") and r"\multicolumn" not in line:
                cells = line.replace(r"\&", "").count("&") + 1
                if cells != ncol:
                    problems.append(f"{cells} cells for {ncol} columns: {line[:60]}")
        for rule in ("\\toprule", "\\midrule", "\\bottomrule"):
            if rule not in body:
                problems.append(f"no {rule}")
    if re.search(r"[^\x00-\x7f]", source):
        problems.append("non-ASCII characters (pdflatex needs them escaped)")
    return problems


def test_latex_document_is_well_formed_and_compiles(golden_root, tmp_path):
    report = build_report(golden_root, ReportOptions(figures=False))
    source = latex_document(report.tables)
    assert latex_problems(source) == []
    assert source.count(r"\textbf{") >= 3 and r"\cmidrule(lr){2-3}" in source
    if shutil.which("pdflatex") is None:
        pytest.skip("pdflatex is not installed: structure checked, not compiled")
    tex = tmp_path / "tables.tex"
    tex.write_text(source)
    pdf = compile_latex(tex, tmp_path)
    assert pdf is not None and pdf.stat().st_size > 1000


def test_table_rejects_ragged_rows():
    with pytest.raises(ValueError, match="row 0 has 1 cells for 2 columns"):
        Table(name="t", caption="", columns=["a", "b"], rows=[[Cell("x")]])


def test_latex_escapes_what_labels_contain():
    t = Table(name="t", caption="α & 50% of |Δ| -- a_b", columns=["Method", "Acc"],
              rows=[[Cell("W0 + α·dir(A1B1)"), Cell("1.00", bold=True, mark="†")]])
    tex = t.to_latex()
    assert r"$\alpha$ \& 50\% of \textbar{}$\Delta$\textbar{} -{}- a\_b" in tex
    assert r"\textbf{1.00}\textsuperscript{\dag}" in tex and latex_problems(tex) == []


# ------------------------------------------------------------------------------ paper numbers


def test_paper_numbers_as_data():
    paper = load_paper()
    acc = paper.accuracy
    row = acc[(acc["table"] == 2) & (acc["benchmark"] == "imr") & (acc["num_tasks"] == 10)
              & (acc["row"] == "sdlora") & (acc["metric"] == "acc")].iloc[0]
    assert (row["mean"], row["spread"]) == (77.34, 0.35)
    assert len(acc[acc["table"] == 2]) == 9 * 3 * 2 and len(acc[acc["table"] == 3]) == 9 * 2 * 2
    assert len(acc[acc["table"] == 6]) == 8 * 2 * 2 and acc[acc["table"] == 6]["spread"].isna().all()
    assert len(acc[acc["table"] == 4]) == 4 * 2 * 2
    assert paper.cost.set_index("method").loc["hide_prompt", "stored_features_m"] == 0.15
    assert paper.spread_kind == {2: "sem", 3: "sem", 4: "sem", 6: "sem"}


def test_paper_file_errors_name_the_file(tmp_path):
    (tmp_path / "bad.yaml").write_text(
        "table: 9\ntitle: x\nruns: 5\nspread: sem\nmetrics: sample-weighted\n"
        "results:\n  - {benchmark: imr, num_tasks: 5, rows: {sdlora: {acc: [1, 2, 3]}}}\n")
    with pytest.raises(PaperDataError, match=r"bad.yaml: imr N=5 row 'sdlora' acc: expected a number or"):
        load_paper(tmp_path)
    (tmp_path / "bad.yaml").write_text(
        "table: 9\ntitle: x\nruns: 5\nspread: sem\nmetrics: sample-weighted\n"
        "results:\n  - {benchmark: imr, num_tasks: 5, rows: {sd_lora: {acc: 1}}}\n")
    with pytest.raises(PaperDataError, match="neither a method nor a variant"):
        load_paper(tmp_path)


# ---------------------------------------------------------------------------- figures and CLI


def test_figures_written_and_non_empty(toy_root):
    from clbench.report.figures import write_figures

    runs = load_runs(toy_root)
    out = toy_root / "figures"
    written = write_figures(runs, out, "sem", "acc", load_paper().accuracy)
    names = sorted(p.name for p in written)
    assert names == ["acc_curve_toy.pdf", "acc_curve_toy.png", "alpha_toy.pdf", "alpha_toy.png",
                     "final_acc_toy.pdf", "final_acc_toy.png"]
    for p in written:
        data = p.read_bytes()
        assert len(data) > 5000, p
        assert data[:4] == (b"\x89PNG" if p.suffix == ".png" else b"%PDF")


def test_no_magnitude_figure_without_magnitudes(tmp_path):
    from clbench.report.figures import magnitude_curves

    write_run(tmp_path, "toy", "full_ft", 0, [100.0, 70.0])
    assert magnitude_curves(load_runs(tmp_path), tmp_path / "figures") == []


def test_cli_report_writes_tables(toy_root, capsys):
    from clbench.cli import main

    assert main(["report", "--out", str(toy_root), "--no-figures", "--spread", "std"]) == 0
    tables = toy_root / "tables"
    for name in ("acc_toy.md", "acc_toy.tex", "cost.md", "metrics_toy.tex", "tables.tex", "summary.csv",
                 "report.md"):
        assert (tables / name).stat().st_size > 0, name
    printed = capsys.readouterr().out
    assert "| SD-LoRA | **90.00 (7.07)**† |" in printed
    summary = pd.read_csv(tables / "summary.csv")
    assert set(summary["method"]) == {"full_ft", "sdlora"}


def test_cli_report_without_results_says_so(tmp_path, capsys):
    from clbench.cli import main

    assert main(["report", "--out", str(tmp_path / "nothing")]) == 1
    assert "no result files under" in capsys.readouterr().out


def test_write_report_never_raises(tmp_path, capsys, monkeypatch):
    write_run(tmp_path, "toy", "full_ft", 0, [100.0, 70.0])
    monkeypatch.setattr("clbench.report.command.build_report", lambda *a, **k: 1 / 0)
    assert write_report(tmp_path) == []
    assert "the report failed; the result files are intact" in capsys.readouterr().out


def test_joint_training_runs_are_reference_rows_and_lines(tmp_path):
    """One-task runs of a benchmark that also has continual runs are its joint-training upper
    bound: a labelled row under the methods (final Acc under every N, never bold), no N=1
    column, and a dotted line at their mean in every accuracy-curve panel."""
    from clbench.report.figures import accuracy_curve_figures

    root = tmp_path / "results"
    for seed, acc in zip([0, 1], [40.0, 50.0]):
        write_run(root, "toy", "full_ft", seed, [100.0, acc])
        write_run(root, "toy", "full_ft", seed, [100.0, acc + 10, acc + 5])
        write_run(root, "toy", "full_ft", seed, [99.0 - seed])  # joint: 99 and 98
    report = build_report(root, ReportOptions(figures=False))
    table = next(t for t in report.tables if t.name == "acc_toy")
    assert [g for g, _ in table.groups] == ["N=2", "N=3"]
    joint = next(row for row in table.rows if row[0].text == "Full Fine-Tuning (joint, upper bound)")
    assert [c.text for c in joint[1:]] == ["98.50 (0.50)", "–", "98.50 (0.50)", "–"]
    assert not any(c.bold for c in joint) and table.rows[-1] is joint
    assert "(joint, upper bound): the method trained on every class at once" in table.caption

    (name, fig), = [f for f in accuracy_curve_figures(report.runs) if f[0] == "acc_curve_toy"]
    axes = fig.axes[:2]
    assert [ax.get_title() for ax in axes] == ["Toy, N=2", "Toy, N=3"]
    for ax in axes:
        lines = [ln for ln in ax.get_lines() if ln.get_label() == "Full Fine-Tuning (joint, upper bound)"]
        assert len(lines) == 1 and lines[0].get_linestyle() == ":"
        assert list(lines[0].get_ydata()) == [98.5, 98.5]
    # alone (no continual runs of the benchmark), one-task runs are a result like any other
    only_joint = tmp_path / "only"
    write_run(only_joint, "toy", "full_ft", 0, [97.0])
    table = next(t for t in build_report(only_joint, ReportOptions(figures=False)).tables if t.name == "acc_toy")
    assert [g for g, _ in table.groups] == ["N=1"] and table.rows[0][0].text == "Full Fine-Tuning"


def test_ranking_against_the_paper_with_kendalls_tau(tmp_path):
    """synth is ranked against ImageNet-R at the same N (Table 2); reference rows are not ranked."""
    ours = {"sdlora": 14.0, "l2p": 13.0, "inflora": 12.0, "full_ft": 4.0, "simplecil": 9.0}
    for seed in (0, 1):
        for method, acc in ours.items():
            write_run(tmp_path, "synth", method, seed, [50.0] * 9 + [acc])
        write_run(tmp_path, "synth", "full_ft", seed, [30.0])  # joint training: a reference row
        for method, acc in (("sdlora", 77.0), ("inflora", 75.0), ("full_ft", 60.0)):
            write_run(tmp_path, "imr", method, seed, [90.0] * 9 + [acc])  # only 3: still ranked
    table = next(t for t in build_report(tmp_path, ReportOptions(figures=False)).tables if t.name == "ranking")
    rows = [[c.text for c in r] for r in table.rows]
    synth = [r for r in rows if r[0] == "Synthetic"]
    # Table 2, N=10: SD-LoRA 77.34 > InfLoRA 74.75 > L2P 71.26 > Full FT 60.57
    assert [(r[2], r[3], r[4], r[6], r[7]) for r in synth] == [
        ("SD-LoRA", "14.00", "1", "77.34", "1"), ("L2P", "13.00", "2", "71.26", "3"),
        ("InfLoRA", "12.00", "3", "74.75", "2"), ("Full Fine-Tuning", "4.00", "4", "60.57", "4")]
    assert {r[5] for r in synth} == {"ImageNet-R N=10 (Table 2)"}
    # one discordant pair (L2P, InfLoRA) of six: tau = (5 - 1) / 6
    assert "Synthetic N=10 against ImageNet-R N=10 (Table 2): Kendall's tau-b = +0.67" in " ".join(table.notes)
    assert "ImageNet-R N=10 against ImageNet-R N=10 (Table 2): Kendall's tau-b = +1.00" in " ".join(table.notes)
    assert not any("SimpleCIL" in r[2] or "joint" in r[2] for r in rows)
