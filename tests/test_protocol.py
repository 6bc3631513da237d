"""The protocol and the CLI end to end on the test-only ``toy`` benchmark."""
import json
import os
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from clbench import catalog, files, record
from clbench.benchmarks.base import BENCHMARKS, Benchmark, register_benchmark
from clbench.cli import main
from clbench.errors import DataError
from clbench.methods import METHODS, CLMethod, register_method
from clbench.metrics import summarize
from clbench.plan import plan
from clbench.sweep import print_plan

RUN = ["--bench", "toy", "--methods", "full_ft", "--no-progress"]


def result_files(root):
    return sorted((root / "runs").rglob("*.json"))


def test_sweep_writes_one_complete_result_per_run(results_root, capsys):
    assert main(RUN + ["--seeds", "0,1"]) == 0
    files = result_files(results_root)
    assert [f.name for f in files] == ["seed0.json", "seed1.json"]
    raw = json.loads(files[0].read_text())
    for key in ("schema", "benchmark", "num_tasks", "method", "method_info", "seed", "class_order_seed",
                "class_order", "config", "environment", "pretrained", "tasks", "accuracy_matrix", "metrics", "cost"):
        assert key in raw, key
    r = record.read_result(files[0])
    assert r.schema == record.SCHEMA_VERSION and r.method_info.title == "Full Fine-Tuning"
    assert r.environment["versions"]["clbench"] and r.benchmark_title == "Toy"
    assert r.config["train"]["epochs"] == 5 and r.environment["versions"]["torch"]
    correct, total = r.accuracy_matrix["correct"], r.accuracy_matrix["total"]
    assert [sum(row) for row in total] == [16, 32, 48]  # 4 test images × 4 classes per task, cumulative
    assert r.metrics == summarize(correct, total)
    assert r.cost["flops_per_image"] > 0 and r.cost["backbone_passes"] == 1
    assert len(r.tasks) == 3 and all(t.train_time_s > 0 for t in r.tasks)
    out = capsys.readouterr().out
    assert "| toy | 3 | full_ft |" in out and "result files:" in out
    assert not (results_root / "checkpoints").exists() or not any((results_root / "checkpoints").rglob("*.pt"))


def test_finished_runs_are_skipped_unless_forced(results_root, capsys):
    assert main(RUN + ["--seeds", "0"]) == 0
    path = result_files(results_root)[0]
    first = path.stat().st_mtime_ns
    capsys.readouterr()
    assert main(RUN + ["--seeds", "0"]) == 0
    assert "1 already done, 0 to run" in capsys.readouterr().out
    assert path.stat().st_mtime_ns == first
    old = path.read_text()
    stale = record.checkpoint_path(results_root, json.loads(old)["run_key"])
    stale.parent.mkdir(parents=True, exist_ok=True)
    stale.write_bytes(b"an interrupted attempt's checkpoint")  # --force must not resume from it
    assert main(RUN + ["--seeds", "0", "--force"]) == 0
    assert path.stat().st_mtime_ns != first and not stale.exists()
    assert path.with_name(path.name + ".prev").read_text() == old  # the replaced result is kept


def test_same_seed_same_numbers(results_root, tmp_path):
    assert main(RUN + ["--seeds", "0"]) == 0
    assert main(RUN + ["--seeds", "0", "--out", str(tmp_path / "again")]) == 0
    a = record.read_result(result_files(results_root)[0])
    b = record.read_result(result_files(tmp_path / "again")[0])
    assert a.accuracy_matrix == b.accuracy_matrix


def test_dry_run_prints_the_plan_and_writes_nothing(results_root, capsys):
    assert main(RUN + ["--seeds", "0,1", "--dry-run", "--set", "train.lr=0.01"]) == 0
    out = capsys.readouterr().out
    assert "2 runs planned, 0 already done, 2 to run" in out and "lr=0.01" in out
    assert not results_root.exists()


def test_dry_run_shows_batches_schedule_lags_and_method_keys(results_root, capsys):
    """What ``--dry-run`` prints for each run (ImageNet-R's data and weights are not here, so
    the plan is printed directly rather than after the checks)."""
    runs = plan(["imr"], [10], ["hide_prompt", "coda_prompt", "sdlora_kd"], [0], results_root,
                overrides={"data": {"test_order": "class_sorted"}})
    print_plan(runs)
    lines = capsys.readouterr().out.splitlines()
    hide, coda, kd = (next(line for line in lines if f"/{m}+" in line) for m in ("hide_prompt", "coda_prompt", "sdlora_kd"))
    assert "bs=192(micro 24)" in hide and "cosine(lag 1)" in hide and "'head_init': 'trunc_normal'" in hide
    assert "coda_cosine(lag 1) drop_last=True test_order=class_sorted" in coda
    assert "'kd_residual': 'raw_squared'" in kd and "'kd_scope': 'per_projection'" in kd


def test_cli_errors_are_messages_not_tracebacks(results_root, capsys):
    assert main(RUN + ["--methods", "nope"]) == 2
    assert "unknown method 'nope'" in capsys.readouterr().err
    assert main(RUN + ["--set", "train.nope=1"]) == 2
    assert "Valid keys in 'train'" in capsys.readouterr().err
    assert main(["--bench", "nope"]) == 2
    assert "unknown benchmark 'nope'" in capsys.readouterr().err


def test_nothing_is_written_for_a_run_that_fails_before_its_first_task(results_root, capsys):
    def missing(data_dir, train_tf, test_tf, splits_dir):
        raise DataError(f"no data in {data_dir}: expected train/ and test/ class folders")

    if "broken" not in BENCHMARKS:
        register_benchmark(Benchmark(name="broken", title="Broken", num_classes=4, default_tasks=[2],
                                     load=missing, folder="broken",
                                     defaults=BENCHMARKS["toy"].defaults))
    assert main(["--bench", "broken", "--methods", "full_ft", "--seeds", "0", "--no-progress"]) == 2
    assert "expected train/ and test/" in capsys.readouterr().err
    assert not results_root.exists()


def test_atomic_write_keeps_the_old_file_when_a_write_fails(tmp_path):
    path = tmp_path / "r.json"
    files.atomic_write_json(path, {"v": 1})

    def half_then_crash(f):
        f.write(b'{"v": 2, "trunc')
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        files.atomic_replace(path, half_then_crash)
    assert json.loads(path.read_text()) == {"v": 1}
    assert os.listdir(tmp_path) == ["r.json"]  # no temporary file left behind


# ------------------------------------------------------------------- a method that trains nothing


@dataclass
class PrototypeConfig:
    stages: bool = False  # True: the default stage, which `train.epochs: 0` leaves untrained


class Prototypes(CLMethod):
    """Training-free: cosine similarity to each class's mean frozen feature, computed in end_task."""

    Config = PrototypeConfig

    def __init__(self, backbone, config, num_classes: int, num_tasks: int):
        super().__init__(backbone, config, num_classes, num_tasks)
        self.freeze_backbone()
        self.register_buffer("means", torch.zeros(num_classes, self.feature_dim))
        self.modes_at_end_task: list[bool] = []

    def stages(self, task):
        return super().stages(task) if self.config.stages else []

    @torch.no_grad()
    def end_task(self, task):
        self.modes_at_end_task.append(self.training)
        self.num_seen = task.num_seen
        for c in task.classes:
            feats = [self.backbone(x[y == c]) for x, y in task.batches()]
            self.means[c] = torch.cat(feats).mean(0)

    @torch.no_grad()
    def predict(self, x):
        assert not self.training
        return F.normalize(self.backbone(x), dim=1) @ F.normalize(self.means[: self.num_seen], dim=1).T


@pytest.fixture
def prototypes_registered():
    """``test_prototypes``, registered for one test only: it has no recipe, so the tests that
    run every registered method (test_resume, test_speed) must never see it, whatever order
    pytest imports the test modules in."""
    register_method("test_prototypes", title="Prototypes (test)")(Prototypes)
    yield
    METHODS.pop("test_prototypes")


@pytest.mark.parametrize("extra", [[], ["--set", "method.stages=true", "--set", "train.epochs=0"]],
                         ids=["no stages", "epochs 0"])
def test_a_training_free_method_runs_with_no_optimizer(results_root, tmp_path, monkeypatch, extra,
                                                       prototypes_registered):
    recipes_dir = tmp_path / "recipes"
    recipes_dir.mkdir()
    (recipes_dir / "test_prototypes.yaml").write_text("default:\n  train:\n    epochs: 1\n")
    monkeypatch.setattr(catalog, "RECIPE_DIR", recipes_dir)
    built = []
    monkeypatch.setattr(Prototypes, "begin_task", lambda self, task: built.append(self))
    args = ["--bench", "toy", "--methods", "test_prototypes", "--seeds", "0", "--no-progress", *extra]
    assert main(args) == 0
    result = record.read_result(next((results_root / "runs").rglob("*.json")))
    assert [t.cost["trainable_params"] for t in result.tasks] == [0, 0, 0]
    assert result.metrics["acc"] > 50.0  # toy's colours are far apart: class means separate them
    assert result.method_info.title == "Prototypes (test)"
    assert built[0].modes_at_end_task == [False, False, False]  # end_task runs in eval mode
    assert "Prototypes (test)" in (results_root / "tables" / "acc_toy.md").read_text()
