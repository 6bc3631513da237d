"""The research workflow around the tables (issue 15): grids and a validation split that never
reads the test set, choosing on validation, seed-paired statistics, a user's own folder of
images, plugins from outside the package, training curves, TensorBoard, kept models, figures."""
from __future__ import annotations

import io
import json
import math
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import TOY_CLASSES, ToyImages
from matplotlib.colors import to_hex
from PIL import Image

from clbench import record
from clbench.benchmarks.base import BENCHMARKS, Benchmark, register_benchmark
from clbench.benchmarks.scenario import validation_split
from clbench.cli import main
from clbench.config import describe_overrides, expand_grid, split_values
from clbench.errors import ConfigError
from clbench.protocol import Run, load_model
from clbench.recipes import resolve_config
from clbench.report.aggregate import load_runs
from clbench.report.command import ReportOptions, build_report
from clbench.report.figures import build_figures
from clbench.report.stats import paired_difference, tied_with_best

TOY = ["--bench", "toy", "--no-progress", "--set", "train.epochs=1"]

# ------------------------------------------------------------------------------------ grids


def test_set_values_split_at_top_level_commas_only():
    assert split_values("0.005,0.01") == ["0.005", "0.01"]
    assert split_values("[10,20]") == ["[10,20]"]
    assert split_values("[10,20],[5]") == ["[10,20]", "[5]"]
    assert split_values("'a,b',c") == ["'a,b'", "c"]


def test_a_grid_is_the_product_last_key_fastest():
    points = expand_grid(["train.lr=0.005,0.01", "method.rank=4,8", "train.epochs=2"])
    assert points == [["train.lr=0.005", "method.rank=4", "train.epochs=2"],
                      ["train.lr=0.005", "method.rank=8", "train.epochs=2"],
                      ["train.lr=0.01", "method.rank=4", "train.epochs=2"],
                      ["train.lr=0.01", "method.rank=8", "train.epochs=2"]]
    with pytest.raises(ConfigError, match="empty value"):
        expand_grid(["train.lr=0.01,"])


def test_labels_name_the_overrides():
    assert describe_overrides({"train": {"lr": 0.005}, "method": {"rank": 8}}) == "lr=0.005 rank=8"
    assert describe_overrides({"train": {"lr": 0.1}, "method": {"lr": 0.2}}) == "train.lr=0.1 method.lr=0.2"
    assert describe_overrides({}) == ""


def test_the_plan_shows_the_grid(results_root, capsys):
    assert main(TOY + ["--methods", "sdlora", "--seeds", "0", "--set", "train.lr=0.005,0.01",
                       "--set", "method.init_magnitude=0.5,1", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "--set grid: 4 configurations (train.lr: 0.005, 0.01 × method.init_magnitude: 0.5, 1)" in out
    assert "4 runs planned" in out
    for label in ("lr=0.005 init_magnitude=0.5", "lr=0.005 init_magnitude=1", "lr=0.01 init_magnitude=1"):
        assert label in out
    assert not results_root.exists()


# ------------------------------------------------------------------------- validation split


def test_validation_split_is_stratified_seeded_and_disjoint():
    targets = np.repeat(np.arange(5), [10, 10, 7, 2, 1])
    train, val = validation_split(targets, 0.2, seed=0)
    assert sorted(np.concatenate([train, val]).tolist()) == list(range(len(targets)))
    per_class = np.bincount(targets[val], minlength=5).tolist()
    assert per_class == [2, 2, 1, 1, 0]  # round(0.2 n), at least one for n >= 2, none for a single image
    again, _ = validation_split(targets, 0.2, seed=0)
    assert (again == train).all()
    other, _ = validation_split(targets, 0.2, seed=1)
    assert not (other == train).all()


class UnreadableTest(ToyImages):
    """Test images that fail the run the moment one is read."""

    def __getitem__(self, i):
        raise AssertionError("a test image was read")


def _load_sealed(data_dir, train_tf, test_tf, splits_dir):
    return ToyImages(10, 0, train_tf), UnreadableTest(4, 1, test_tf)


@pytest.fixture
def sealed_benchmark():
    """The toy benchmark with a test set that cannot be read."""
    toy = BENCHMARKS["toy"]
    register_benchmark(Benchmark(name="sealed", title="Sealed", num_classes=TOY_CLASSES, default_tasks=[3],
                                 load=_load_sealed, folder="toy", image_size=16, train_transform=toy.train_transform,
                                 test_transform=toy.test_transform, defaults=toy.defaults))
    yield
    BENCHMARKS.pop("sealed")


def test_grid_on_validation_then_the_chosen_config_on_test(results_root, sealed_benchmark, capsys):
    # Two learning rates of SD-LoRA, evaluated on validation: the test set is never read.
    grid = ["--bench", "sealed", "--methods", "sdlora", "--seeds", "0,1", "--no-progress", "--set", "train.epochs=1",
            "--set", "train.lr=0.0003,0.01", "--eval-on", "val"]
    assert main(grid) == 0
    runs = load_runs(results_root)
    assert len(runs) == 4 and set(runs["eval_on"]) == {"val"}
    result = record.read_result(Path(runs["path"].iloc[0]))
    assert "evaluated on a validation split, not the test set" in result.data
    assert sum(result.accuracy_matrix["total"][-1]) == 12  # 1 of each class's 10 training images, 12 classes
    capsys.readouterr()

    # Choosing reads the validation numbers only; the chosen configuration has no test runs yet.
    assert main(["report", "--out", str(results_root), "--select", "best-val", "--no-figures"]) == 0
    out = capsys.readouterr().out
    means = runs.groupby("variant")["acc"].mean()
    best = max(sorted(means.index), key=lambda v: means[v])  # a tie goes to the first label
    best_lr = json.loads(Path(runs[runs["variant"] == best]["path"].iloc[0]).read_text())["config"]["train"]["lr"]
    other_lr = 0.01 if best_lr == 0.0003 else 0.0003
    assert best == f"epochs=1 lr={best_lr} eval_on=val"
    assert "not yet run" in out
    command = next(line for line in out.splitlines() if "make them with" in line).split("`")[1]
    assert command == f"clbench --bench sealed --tasks 3 --methods sdlora --seeds 0,1 --set train.epochs=1 " \
                      f"--set train.lr={best_lr}"

    # Its test runs, made with that command on a benchmark whose test set can be read, and the
    # other configuration's test runs (which the report must leave out).
    BENCHMARKS["sealed"].load = lambda d, tr, te, s: (ToyImages(10, 0, tr), ToyImages(4, 1, te))
    assert main(command.split()[1:] + ["--no-progress"]) == 0
    assert main(command.split()[1:] + ["--no-progress", "--set", f"train.lr={other_lr}"]) == 0
    capsys.readouterr()
    report = build_report(results_root, ReportOptions(select="best-val", figures=False))
    selection = next(t for t in report.tables if t.name == "selection")
    chosen = [row for row in selection.rows if row[5].text == "✓"]
    assert len(chosen) == 1 and chosen[0][2].text == f"SD-LoRA {best}" and chosen[0][6].text == "yes"
    latex = selection.to_latex()
    assert r"$\checkmark$" in latex and "✓" not in latex
    table = next(t for t in report.tables if t.name == "acc_sealed")
    assert [row[0].text for row in table.rows] == [f"SD-LoRA epochs=1 lr={best_lr}"]  # the chosen test runs only
    assert set(report.runs["eval_on"]) == {"test"} and len(report.runs) == 2


def test_eval_on_val_is_part_of_a_runs_identity():
    test = resolve_config("toy", 3, "sdlora", 0, overrides={"train": {"lr": 0.01}})
    val = resolve_config("toy", 3, "sdlora", 0, overrides={"train": {"lr": 0.01}, "data": {"eval_on": "val"}})
    assert test.tag != val.tag and val.data.eval_on == "val"
    with pytest.raises(ConfigError, match="data.eval_on"):
        resolve_config("toy", 3, "sdlora", 0, overrides={"data": {"eval_on": "train"}})


# ------------------------------------------------------------------------------- statistics


def test_paired_difference_by_hand():
    # differences 1, 2, 4: mean 7/3, sd sqrt(7/3), t(0.975, 2) = 4.302653
    d = paired_difference({"s0": 11.0, "s1": 12.0, "s2": 14.0, "s9": 99.0}, {"s0": 10.0, "s1": 10.0, "s2": 10.0})
    half = 4.302653 * math.sqrt(7 / 3) / math.sqrt(3)
    assert d.n == 3 and d.mean == pytest.approx(7 / 3)
    assert d.low == pytest.approx(7 / 3 - half, abs=1e-5) and d.high == pytest.approx(7 / 3 + half, abs=1e-5)
    # t = (7/3) / (sqrt(7/3)/sqrt(3)) = sqrt(7) = 2.6458; two-sided p with 2 df = 0.11808
    assert d.p_value == pytest.approx(0.118083, abs=1e-5) and not d.significant
    exact = paired_difference({"a": 3.0, "b": 5.0}, {"a": 1.0, "b": 3.0})  # always +2: no noise
    assert (exact.mean, exact.low, exact.high, exact.p_value) == (2.0, 2.0, 2.0, 0.0) and exact.significant
    one = paired_difference({"a": 3.0}, {"a": 1.0})
    assert one.n == 1 and math.isnan(one.low) and math.isnan(one.p_value)


def test_ties_with_the_best_by_hand():
    best = {"s0": 80.0, "s1": 82.0, "s2": 84.0}
    noisy = {"s0": 81.0, "s1": 79.0, "s2": 83.5}  # differences -1, 3, 0.5: p = 0.52, tied
    clear = {"s0": 70.0, "s1": 72.1, "s2": 73.9}  # differences 10, 9.9, 10.1: p < 0.001, not tied
    assert tied_with_best([best, noisy, clear], True) == [True, True, False]
    assert tied_with_best([best, {"s0": 50.0}], True) is None  # one pair: nothing can be tested
    # two seeds: differences 2 and 3 give t = 5 with 1 df, p = 0.126: not shown to differ
    assert tied_with_best([{"s0": 1.0, "s1": 2.0}, {"s0": 3.0, "s1": 5.0}], False) == [True, True]
    # three: differences 2, 2.1, 1.9 give t = 34.6 with 2 df, p = 0.0008 (lower is better here)
    assert tied_with_best([{"s0": 1.0, "s1": 2.0, "s2": 3.0}, {"s0": 3.0, "s1": 4.1, "s2": 4.9}], False) == [True, False]


def test_tables_mark_ties_and_give_differences_to_a_reference(tmp_path):
    from test_report import write_run

    root = tmp_path / "results"
    for seed, (sd, ft, l2p) in enumerate([(80.0, 81.0, 70.0), (82.0, 79.0, 72.0), (84.0, 83.0, 74.0)]):
        write_run(root, "toy", "sdlora", seed, [100.0, sd])
        write_run(root, "toy", "full_ft", seed, [100.0, ft])
        write_run(root, "toy", "l2p", seed, [100.0, l2p])
    report = build_report(root, ReportOptions(figures=False))
    table = {row[0].text: row[1] for row in next(t for t in report.tables if t.name == "acc_toy").rows}
    assert table["SD-LoRA"].bold and table["Full Fine-Tuning"].bold  # 82 vs 81, differences -1, 3, 1: tied
    assert not table["L2P"].bold  # always 10 below
    diff = next(t for t in report.tables if t.name == "difference")
    rows = {row[2].text: row for row in diff.rows}
    # full_ft - sdlora: 1, -3, -1 -> mean -1, sd 2, half = 4.302653 * 2 / sqrt(3) = 4.968
    assert rows["Full Fine-Tuning"][3].text == "-1.00 [-5.97, +3.97]" and not rows["Full Fine-Tuning"][3].bold
    assert rows["L2P"][3].text == "-10.00 [-10.00, -10.00]" and rows["L2P"][3].bold and rows["L2P"][5].text == "3"
    assert "paired t-test" in diff.caption and "independent and roughly normal" in diff.caption


def test_summary_csv_writes_structured_columns_as_json(tmp_path):
    from test_report import write_run

    root = tmp_path / "results"
    for seed in (0, 1):
        write_run(root, "toy", "sdlora", seed, [100.0, 80.0 + seed])
    from clbench.report.command import write_report

    write_report(root, ReportOptions(figures=False), echo=False)
    frame = pd.read_csv(root / "tables" / "summary.csv")
    assert json.loads(frame["seeds"].iloc[0]) == [0, 1]
    assert json.loads(frame["method_info"].iloc[0])["title"] == "SD-LoRA"
    assert json.loads(frame["acc_by_seed"].iloc[0]) == {"seed0-order0": 80.0, "seed1-order1": 81.0}


# -------------------------------------------------------------------------- your own folder


def _jpeg_tree(root: Path, classes: int, per_class: int, size: int = 16) -> None:
    rng = np.random.RandomState(0)
    for c in range(classes):
        folder = root / f"class_{c}"
        folder.mkdir(parents=True)
        colour = rng.randint(0, 255, 3)
        for i in range(per_class):
            pixels = np.clip(colour + rng.randint(-10, 10, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"img_{i}.jpg")


FOLDER_RUN = ["--methods", "full_ft", "--seeds", "0", "--no-progress", "--backbone", "vit_toy_patch4_16",
              "--set", "backbone.pretrained=false", "--set", "data.image_size=16", "--set", "train.num_workers=0",
              "--set", "train.epochs=1", "--set", "train.batch_size=8"]


def test_your_own_folder_of_class_folders_split_once(results_root, tmp_path):
    data = tmp_path / "my_birds"
    _jpeg_tree(data, classes=4, per_class=5)
    assert main(["--bench", f"folder:{data}"] + FOLDER_RUN) == 0
    (path,) = (results_root / "runs").rglob("*.json")
    r = record.read_result(path)
    assert r.benchmark == f"folder:{data}" and r.num_tasks == 2 and r.task_sizes == [2, 2]  # 4 classes: 2 tasks
    assert path.relative_to(results_root / "runs").parts[0].startswith("folder-my_birds-")
    (split,) = (results_root / "splits").glob("folder_split_*.json")
    doc = json.loads(split.read_text())
    assert len(doc["test"]) == 4 and len(doc["train"]) == 16  # one of each class's five images to test
    assert str(split) in r.data and sum(r.accuracy_matrix["total"][-1]) == 4


def test_your_own_pre_split_folder_with_tasks_given(results_root, tmp_path):
    data = tmp_path / "pets"
    _jpeg_tree(data / "train", classes=6, per_class=3)
    _jpeg_tree(data / "test", classes=6, per_class=2)
    assert main(["--bench", f"folder:{data}", "--tasks", "3"] + FOLDER_RUN) == 0
    (path,) = (results_root / "runs").rglob("*.json")
    r = record.read_result(path)
    assert r.task_sizes == [2, 2, 2] and sum(r.accuracy_matrix["total"][-1]) == 12
    assert "pre-split folders" in r.data and not (results_root / "splits").exists()


def test_a_missing_folder_is_a_plan_error(results_root, tmp_path, capsys):
    assert main(["--bench", f"folder:{tmp_path / 'nowhere'}"] + FOLDER_RUN) == 2
    assert "is not a folder" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ plugins

PLUGIN = '''
"""A method and a benchmark from outside clbench."""
from pathlib import Path
from dataclasses import dataclass

import torch
from timm.models import register_model
from timm.models.vision_transformer import VisionTransformer

from clbench.benchmarks import Benchmark, register_benchmark
from clbench.catalog import add_recipe_dir
from clbench.methods import register_method
from clbench.methods.full_ft import FullFineTuning


@register_model
def vit_plugin_tiny(pretrained=False, **kwargs):
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(key, None)
    return VisionTransformer(img_size=8, patch_size=4, embed_dim=16, depth=2, num_heads=2, **kwargs)


class Blobs(torch.utils.data.Dataset):
    def __init__(self, n, seed, transform=None):
        g = torch.Generator().manual_seed(seed)
        self.targets = [i % 4 for i in range(n)]
        colours = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [1.0, 1.0, 0]])
        self.images = colours[self.targets].view(n, 3, 1, 1).expand(n, 3, 8, 8) + 0.05 * torch.randn(n, 3, 8, 8, generator=g)
        self.transform = transform

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return self.images[i], self.targets[i]


register_benchmark(Benchmark(
    name="blobs", title="Blobs", num_classes=4, default_tasks=[2], folder="blobs", image_size=8,
    load=lambda d, tr, te, s: (Blobs(32, 0), Blobs(16, 1)),
    train_transform=lambda size: None, test_transform=lambda size: None,
    defaults={"backbone": {"name": "vit_plugin_tiny", "pretrained": False},
              "train": {"num_workers": 0, "epochs": 1, "batch_size": 8}}))


@register_method("plugin_ft", title="Plugin FT")
class PluginFT(FullFineTuning):
    @dataclass
    class Config(FullFineTuning.Config):
        pass


add_recipe_dir(Path(__file__).parent / "recipes")
'''


@pytest.fixture
def plugin_file(tmp_path):
    folder = tmp_path / "outside"
    (folder / "recipes").mkdir(parents=True)
    (folder / "recipes" / "plugin_ft.yaml").write_text("default:\n  train:\n    lr: 0.01\n")
    path = folder / "my_plugin.py"
    path.write_text(textwrap.dedent(PLUGIN))
    yield path
    from clbench.catalog import PLUGIN_RECIPE_DIRS
    from clbench.methods import METHODS

    BENCHMARKS.pop("blobs", None)
    METHODS.pop("plugin_ft", None)
    PLUGIN_RECIPE_DIRS.clear()
    sys.modules.pop("clbench_plugin_my_plugin", None)
    from clbench import catalog

    catalog._PLUGIN_FILES.clear()


def test_a_plugin_from_outside_the_package_runs_end_to_end(results_root, plugin_file):
    assert main(["--plugins", str(plugin_file), "--bench", "blobs", "--methods", "plugin_ft", "--seeds", "0",
                 "--no-progress"]) == 0
    (path,) = (results_root / "runs").rglob("*.json")
    r = record.read_result(path)
    assert r.method_info.title == "Plugin FT" and r.benchmark == "blobs"
    assert r.config["plugins"] == [str(plugin_file)]  # what a worker imports before the run


def test_a_worker_process_imports_the_plugins_its_run_names(results_root, plugin_file):
    """A SLURM worker has only the run's configuration: ``run_job`` imports its plugins."""
    from clbench.catalog import import_plugins

    import_plugins([str(plugin_file)])
    cfg = resolve_config("blobs", 2, "plugin_ft", 0, device="cpu")
    cfg.plugins = [str(plugin_file)]
    code = ("import json, sys; from clbench.sweep import run_job; "
            "print(json.dumps(run_job(json.loads(sys.argv[1]), sys.argv[2], progress=False)))")
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(cfg.to_dict()), str(results_root)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "acc" in json.loads(proc.stdout.strip().splitlines()[-1])
    assert record.result_path(results_root, cfg.key).exists()


# ---------------------------------------------------------------- curves, logging, models


def test_result_file_holds_the_training_curve(results_root):
    assert main(TOY + ["--methods", "sdlora", "--seeds", "0", "--set", "train.epochs=2"]) == 0
    (path,) = (results_root / "runs").rglob("*.json")
    raw = json.loads(path.read_text())
    epochs = raw["tasks"][0]["epochs"]
    assert [e["epoch"] for e in epochs] == [0, 1] and all(e["stage"] == "train" for e in epochs)
    assert all(e["loss"] > 0 and math.isfinite(e["loss"]) and e["time_s"] > 0 for e in epochs)
    assert epochs[0]["lr"] == pytest.approx(raw["config"]["train"]["lr"])
    assert raw["schema"] == 3


def test_old_result_files_without_curves_are_read(tmp_path):
    from test_report import write_run

    path = write_run(tmp_path, "toy", "sdlora", 0, [100.0, 80.0])
    raw = json.loads(path.read_text())
    raw["schema"] = 2
    for task in raw["tasks"]:
        del task["epochs"]
    raw["config"].pop("overrides", None)
    raw.pop("checksum", None)  # files of schema 2 carried none
    path.write_text(json.dumps(raw))
    r = record.read_result(path)
    assert r.tasks[0].epochs == [] and r.schema == 2


def test_tensorboard_writes_event_files(results_root):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert main(TOY + ["--methods", "full_ft", "--seeds", "0", "--set", "train.epochs=2", "--log", "tensorboard"]) == 0
    (events,) = (results_root / "logs").rglob("events.out.tfevents.*")
    acc = EventAccumulator(str(events.parent))
    acc.Reload()
    losses = acc.Scalars("train/loss/train")
    assert [e.step for e in losses] == list(range(6))  # 3 tasks x 2 epochs
    (path,) = (results_root / "runs").rglob("*.json")
    r = record.read_result(path)
    assert [e.value for e in losses] == pytest.approx([e["loss"] for t in r.tasks for e in t.epochs], rel=1e-6)
    assert [e.value for e in acc.Scalars("eval/acc")] == pytest.approx([t.accuracy for t in r.tasks], rel=1e-6)


def test_an_unknown_logger_is_a_plan_error(results_root, capsys):
    assert main(TOY + ["--methods", "full_ft", "--seeds", "0", "--log", "mlflow"]) == 2
    assert "--log mlflow: unknown" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["sdlora", "inflora", "l2p", "hide_prompt"])
def test_a_saved_model_round_trips(tmp_path, method):
    cfg = resolve_config("toy", 3, method, 0, overrides={"train": {"epochs": 1}}, device="cpu")
    cfg.save_model = "every-task"
    run = Run(cfg, tmp_path, progress=False)
    result = run.execute()
    paths = [record.model_path(tmp_path, cfg.key, t) for t in range(3)]
    assert all(p.exists() for p in paths)
    loaded, info = load_model(paths[-1])
    assert info["class_order"] == result.class_order and info["completed_tasks"] == 3
    x = torch.stack([run.scenario.test_subset(t)[0][0] for t in range(3)])
    with torch.no_grad():
        assert torch.equal(loaded.predict(x), run.method.predict(x))
    if method in ("sdlora", "inflora"):  # a merging method keeps its merged backbone too, a plain ViT
        assert info["merged_backbone"] is not None and any("qkv.weight" in k for k in info["merged_backbone"])
    first, _ = load_model(paths[0])
    assert first.predict(x).shape[1] == 4  # after task 1: its 4 classes


# -------------------------------------------------------------------------------- figures


def _figure_runs(tmp_path, seeds) -> pd.DataFrame:
    from test_report import write_run

    root = tmp_path / "results"
    for seed in seeds:
        for method, acc in (("sdlora", 80.0), ("sdlora_rr", 81.0), ("sdlora_kd", 79.0)):
            write_run(root, "toy", method, seed, [100.0, acc + seed], magnitudes=method == "sdlora")
        for i, epochs in enumerate((1, 2)):
            write_run(root, "toy", "sdlora", seed, [100.0, 60.0 + i + seed], tag=f"cfg0000000{i}",
                      argv=["clbench", "--set", f"train.epochs={epochs}"])
    return load_runs(root)


def _lines(ax):
    return [line for line in ax.get_lines() if line.get_label() and not line.get_label().startswith("_")
            and line.get_label() != "chance (1 / seen classes)"]


def drawn_dashes(fig) -> dict[str, frozenset[str]]:
    """Stroke colour -> the dash patterns (SVG ``stroke-dasharray``, ``solid`` for none) of the
    strokes drawn in that colour, from the figure rendered as SVG."""
    out = io.StringIO()
    fig.savefig(out, format="svg")
    found: dict[str, set[str]] = {}
    for style in re.findall(r'style="([^"]*)"', out.getvalue()):
        props = dict(kv.split(":", 1) for kv in style.replace(" ", "").split(";") if ":" in kv)
        if props.get("stroke", "none") != "none":
            found.setdefault(props["stroke"], set()).add(props.get("stroke-dasharray", "solid"))
    return {colour: frozenset(patterns) for colour, patterns in found.items()}


@pytest.mark.parametrize("seeds", [[0, 1], [0]], ids=["two seeds", "one seed"])
def test_figures_a_reviewer_accepts(tmp_path, seeds):
    figures = dict(build_figures(_figure_runs(tmp_path, seeds), "sem", "acc"))
    assert sorted(figures) == ["acc_curve_toy", "alpha_toy", "final_acc_toy"]

    bars = figures["final_acc_toy"].axes[0]
    assert bars.get_ylim()[0] == 0  # bars from zero
    assert ("error bars: mean ± SE over seeds" in bars.get_title()) == (len(seeds) > 1)
    assert ("one seed, no error bars" in bars.get_title()) == (len(seeds) == 1)
    assert (len(bars.get_lines()) > 0) == (len(seeds) > 1)  # the error bars themselves
    labels = [t.get_text() for t in bars.get_xticklabels()]
    assert "SD-LoRA epochs=1" in labels and "SD-LoRA epochs=2" in labels  # overrides, not a hash
    assert not any("cfg" in label for label in labels)

    curves = figures["acc_curve_toy"].axes[0]
    legend = curves.get_legend()
    assert legend.get_title().get_text() == ("mean ± SE over seeds (band)" if len(seeds) > 1 else "one seed, no band")
    handles = {text.get_text(): handle for text, handle in zip(legend.get_texts(), legend.legend_handles)}
    methods = {k: v for k, v in handles.items() if k.startswith("SD-LoRA")}
    assert len(methods) == 5
    markers = {h.get_marker() for h in methods.values()}
    colours = {to_hex(h.get_color()) for h in methods.values()}
    assert len(markers) == 5 and len(colours) == 5
    # Line2D has no public getter for its dash pattern: read the patterns the figure draws (its SVG)
    dashes = drawn_dashes(figures["acc_curve_toy"])
    assert len({dashes[c] for c in colours}) == 5  # each variant's lines have a dash pattern of their own
    has_band = len(curves.collections) > 0
    assert has_band == (len(seeds) > 1)

    for fig in figures.values():  # no offset notation on any axis, even on flat data
        fig.canvas.draw()
        for ax in fig.axes:
            for axis in (ax.xaxis, ax.yaxis):
                assert axis.get_offset_text().get_text() == "", (ax.get_title(), axis.get_offset_text().get_text())


def test_wandb_offline_mirrors_the_curves(results_root, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    assert main(TOY + ["--methods", "full_ft", "--seeds", "0", "--log", "wandb"]) == 0
    (run_file,) = (results_root / "logs").rglob("*.wandb")  # wandb's offline run, for `wandb sync`
    assert run_file.stat().st_size > 0


def test_an_unknown_plugin_is_a_one_line_error(results_root, capsys):
    assert main(TOY + ["--methods", "full_ft", "--plugins", "no_such_plugin_module"]) == 2
    assert "--plugins no_such_plugin_module: no module of that name" in capsys.readouterr().err
