"""The protocol and the CLI end to end on the test-only ``toy`` benchmark."""
import json
import os

import pytest

from benchmarks.base import BENCHMARKS, Benchmark, DataError, register_benchmark
from harness.cli import main
from results import store
from results.metrics import summarize

RUN = ["--bench", "toy", "--methods", "full_ft", "--no-progress"]


def result_files(root):
    return sorted((root / "runs").rglob("*.json"))


def test_sweep_writes_one_complete_result_per_run(results_root, capsys):
    assert main(RUN + ["--seeds", "0,1"]) == 0
    files = result_files(results_root)
    assert [f.name for f in files] == ["seed0.json", "seed1.json"]
    r = json.loads(files[0].read_text())
    for key in ("benchmark", "num_tasks", "method", "seed", "class_order_seed", "class_order", "config",
                "environment", "pretrained", "tasks", "accuracy_matrix", "metrics", "cost"):
        assert key in r, key
    assert r["config"]["train"]["epochs"] == 5 and r["environment"]["versions"]["torch"]
    correct, total = r["accuracy_matrix"]["correct"], r["accuracy_matrix"]["total"]
    assert [sum(row) for row in total] == [16, 32, 48]  # 4 test images × 4 classes per task, cumulative
    assert r["metrics"] == summarize(correct, total)
    assert r["cost"]["flops_per_image"] > 0 and r["cost"]["backbone_passes"] == 1
    assert len(r["tasks"]) == 3 and all(t["train_time_s"] > 0 for t in r["tasks"])
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
    stale = store.checkpoint_path(results_root, json.loads(old)["run_key"])
    stale.parent.mkdir(parents=True, exist_ok=True)
    stale.write_bytes(b"an interrupted attempt's checkpoint")  # --force must not resume from it
    assert main(RUN + ["--seeds", "0", "--force"]) == 0
    assert path.stat().st_mtime_ns != first and not stale.exists()
    assert path.with_name(path.name + ".prev").read_text() == old  # the replaced result is kept


def test_same_seed_same_numbers(results_root, tmp_path):
    assert main(RUN + ["--seeds", "0"]) == 0
    assert main(RUN + ["--seeds", "0", "--out", str(tmp_path / "again")]) == 0
    a = json.loads(result_files(results_root)[0].read_text())
    b = json.loads(result_files(tmp_path / "again")[0].read_text())
    assert a["accuracy_matrix"] == b["accuracy_matrix"]


def test_dry_run_prints_the_plan_and_writes_nothing(results_root, capsys):
    assert main(RUN + ["--seeds", "0,1", "--dry-run", "--set", "train.lr=0.01"]) == 0
    out = capsys.readouterr().out
    assert "2 runs planned, 0 already done, 2 to run" in out and "lr=0.01" in out
    assert not results_root.exists()


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
    store.atomic_write_json(path, {"v": 1})

    def half_then_crash(f):
        f.write(b'{"v": 2, "trunc')
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        store.atomic_replace(path, half_then_crash)
    assert json.loads(path.read_text()) == {"v": 1}
    assert os.listdir(tmp_path) == ["r.json"]  # no temporary file left behind
