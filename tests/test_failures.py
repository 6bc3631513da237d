"""When things go wrong: each case a user met (a diverged run, a corrupt file, a full disk, an
output folder that cannot be written, a bad enum value, a corrupt image read by DataLoader
workers) gets its exit status, one message without a traceback, and a safe state on disk
(nothing half-written, the last good checkpoint kept, a corrupt file set aside as ``*.corrupt``).
Runs are the command line in this process on the tests' ``toy`` benchmark."""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import timm
import torch
from interrupt_hooks import HOOKS_FILE, arm, spec  # tests/, on the path as conftest.py's folder
from PIL import Image

from clbench import files, preflight, record
from clbench.cli import main
from clbench.config import DataConfig, TrainConfig
from clbench.errors import ConfigError, DataError
from clbench.jobs import read_status, status_path
from clbench.loading import seeded_loader
from clbench.methods import METHODS, get_method
from clbench.recipes import resolve_config

ONE_EPOCH = {"train": {"epochs": 1}}  # a toy run in a few seconds
TOY = ["--bench", "toy", "--methods", "full_ft", "--seeds", "0", "--set", "train.epochs=1", "--no-progress"]
KEY = resolve_config("toy", 3, "full_ft", 0, overrides=ONE_EPOCH).key


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def sweep(out: Path, *extra: str) -> int:
    return main([*TOY, "--out", str(out), *extra])


def numbers(result_file: Path) -> dict:
    r = json.loads(result_file.read_text())
    return {"accuracy_matrix": r["accuracy_matrix"], "metrics": r["metrics"]}


def temporaries(root: Path) -> list[Path]:
    return sorted(root.rglob("*.tmp"))


def no_traceback(text: str) -> bool:
    return "Traceback" not in text and 'File "' not in text


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """The numbers of an uninterrupted toy run."""
    out = tmp_path_factory.mktemp("reference")
    assert sweep(out) == 0
    return numbers(record.result_path(out, KEY))


# ----------------------------------------------------------------------------- divergence


def test_a_diverged_run_fails_with_where_and_why_and_keeps_its_last_checkpoint(tmp_path, capsys):
    lr = ["--set", "train.lr=1e12", "--set", "train.first_task_lr=0.003"]  # task 1 trains, task 2 diverges
    assert sweep(tmp_path, *lr) == 1
    out = capsys.readouterr().out
    key = next((tmp_path / "status").rglob("*.json")).relative_to(tmp_path / "status").with_suffix("").as_posix()
    failed = [line for line in out.splitlines() if "FAILED" in line]
    assert len(failed) == 1 and no_traceback(out)
    assert "training diverged in task 2/3, stage train, epoch 1/1: the loss is not finite at step" in failed[0]
    assert "learning rate (1e+12) is the likely cause" in failed[0]
    assert "1 run(s) failed" in out
    assert not record.result_path(tmp_path, key).exists()  # no result: it is in no table
    assert record.read_checkpoint(record.checkpoint_path(tmp_path, key))["completed_tasks"] == 1  # kept
    status = read_status(tmp_path, key)
    assert status["state"] == "failed" and status["error"].startswith("training diverged in task 2/3")
    assert main(["status", *TOY[:-1], "--out", str(tmp_path), *lr]) == 0
    line = capsys.readouterr().out.splitlines()[1]
    assert line.startswith("failed") and "training diverged in task 2/3" in line
    assert temporaries(tmp_path) == []


def test_on_divergence_continue_trains_on_and_records_where(tmp_path, capsys):
    assert sweep(tmp_path, "--set", "train.lr=1e12", "--set", "train.on_divergence=continue") == 0
    result = record.read_result(next((tmp_path / "runs").rglob("*.json")))
    assert result.config["train"]["on_divergence"] == "continue"
    assert result.diverged and result.diverged[0].startswith("task 1/3, stage train, epoch 1/1: the loss is not finite")
    assert "warning: training diverged in task 1/3" in capsys.readouterr().out


def test_a_non_finite_gradient_is_divergence_too(tmp_path, monkeypatch):
    """A finite loss whose gradient is not: the parameters go non-finite at the step."""
    from clbench import protocol

    real_step = protocol.optimization_step
    steps = [0]

    def poisoned_step(method, x, y, task, stage, optimizer, params, *rest):
        loss = real_step(method, x, y, task, stage, optimizer, params, *rest)
        steps[0] += task.index == 1
        if steps[0] == 2:  # the last of task 2's two steps: no later loss shows it
            with torch.no_grad():
                params[0].fill_(float("inf"))  # what an optimizer step on an infinite gradient leaves
        return loss

    monkeypatch.setattr(protocol, "optimization_step", poisoned_step)
    run = protocol.Run(resolve_config("toy", 3, "full_ft", 0, overrides=ONE_EPOCH, device="cpu"), tmp_path,
                       progress=False)
    with pytest.raises(protocol.DivergenceError, match="task 2/3, stage train, epoch 1/1: a parameter is not finite"):
        run.execute()


# ----------------------------------------------------------------------------- corrupt files


def test_a_truncated_result_is_set_aside_and_redone_and_report_skips_it(tmp_path, capsys, reference):
    assert sweep(tmp_path) == 0 and sweep(tmp_path, "--seeds", "1") == 0
    path = record.result_path(tmp_path, KEY)
    damaged = path.read_bytes()[:-200]
    path.write_bytes(damaged)
    capsys.readouterr()

    assert main(["report", "--out", str(tmp_path)]) == 0  # the other run's tables
    captured = capsys.readouterr()
    assert f"warning: skipped {path} is corrupt (not valid JSON" in captured.err
    assert "1 corrupt result file(s) skipped" in captured.err and no_traceback(captured.err)
    assert "one run (seed 1)" in captured.out
    assert main(["status", *TOY[:-1], "--out", str(tmp_path)]) == 0
    assert "its result file is corrupt" in capsys.readouterr().out

    assert sweep(tmp_path) == 0  # the run is redone
    err = capsys.readouterr().err
    assert f"warning: result file {path} is corrupt" in err and "moved to seed0.json.corrupt" in err
    assert numbers(path) == reference
    assert path.with_name("seed0.json.corrupt").read_bytes() == damaged  # kept, never deleted


def test_a_result_whose_numbers_were_changed_fails_its_checksum(tmp_path):
    assert sweep(tmp_path) == 0
    path = record.result_path(tmp_path, KEY)
    doc = json.loads(path.read_text())
    doc["accuracy_matrix"]["correct"][0][0] += 1  # valid JSON, a plausible number: only the checksum tells
    path.write_text(json.dumps(doc))
    with pytest.raises(record.CorruptFileError, match="checksum does not match"):
        record.read_result(path)


def interrupted_after_task(out: Path, task: int, monkeypatch) -> None:
    """A sweep that dies (a bug in its run) while training task ``task`` (1-based): its
    checkpoint holds the tasks before."""
    from clbench import protocol

    real = protocol.Run.learn

    def dies(self, t):
        if t.index == task - 1:
            raise RuntimeError("killed")
        return real(self, t)

    with monkeypatch.context() as m:
        m.setattr(protocol.Run, "learn", dies)
        assert sweep(out) == 1


def test_a_truncated_checkpoint_is_set_aside_and_the_run_starts_over(tmp_path, capsys, monkeypatch, reference):
    interrupted_after_task(tmp_path, 3, monkeypatch)
    ckpt = record.checkpoint_path(tmp_path, KEY)
    ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    capsys.readouterr()
    assert sweep(tmp_path) == 0
    captured = capsys.readouterr()
    assert f"warning: checkpoint {ckpt} is corrupt (does not load" in captured.err
    assert "moved to seed0.pt.corrupt; the run starts over from task 1" in captured.err
    assert no_traceback(captured.out + captured.err)
    assert numbers(record.result_path(tmp_path, KEY)) == reference
    assert ckpt.with_name("seed0.pt.corrupt").exists() and not ckpt.exists()
    assert temporaries(tmp_path) == []


def test_a_checkpoint_whose_weights_were_flipped_fails_its_checksum(tmp_path, monkeypatch):
    interrupted_after_task(tmp_path, 3, monkeypatch)
    path = record.checkpoint_path(tmp_path, KEY)
    ckpt = torch.load(path, weights_only=False)
    name = next(iter(ckpt["method"]))
    ckpt["method"][name].view(-1)[0] += 1  # torch's zip format would load this silently
    torch.save(ckpt, path)
    with pytest.raises(record.CorruptFileError, match="checksum does not match"):
        record.read_checkpoint(path)


def test_a_corrupt_status_record_is_set_aside(tmp_path, capsys):
    path = status_path(tmp_path, KEY)
    path.parent.mkdir(parents=True)
    path.write_text('{"state": "runn')
    assert read_status(tmp_path, KEY) is None
    assert f"warning: status record {path} is corrupt" in capsys.readouterr().err
    assert path.with_name("seed0.json.corrupt").exists() and not path.exists()


class Killed(BaseException):
    """Stands in for SIGKILL at a write: it leaves the temporary file behind (copied back after
    ``atomic_path`` removed it, as a killed process would not have), and the target as it was."""


def test_killed_at_each_write_point_leaves_nothing_behind_and_resumes_to_the_same_numbers(
        tmp_path, monkeypatch, reference):
    real_replace = os.replace
    writes: list[Path] = []

    def counting(src, dst):
        writes.append(Path(dst).relative_to(tmp_path / "count"))
        real_replace(src, dst)

    with monkeypatch.context() as m:
        m.setattr(files.os, "replace", counting)
        assert sweep(tmp_path / "count") == 0
    last_status = max(i for i, w in enumerate(writes) if w.parts[0] == "status")  # then the report's files
    run_writes = writes[: last_status + 1]
    assert {w.parts[0] for w in run_writes} == {"status", "checkpoints", "runs"}, run_writes
    assert len(run_writes) >= 8, run_writes

    for n, name in enumerate(run_writes):
        out = tmp_path / f"kill{n}"
        count = [0]

        def dies_at_the_nth(src, dst, n=n):
            if count[0] == n:
                shutil.copy(src, Path(src).with_name(Path(src).name + "~"))
                raise Killed
            count[0] += 1
            real_replace(src, dst)

        with monkeypatch.context() as m:
            m.setattr(files.os, "replace", dies_at_the_nth)
            with pytest.raises(Killed):
                sweep(out)
        for leftover in out.rglob("*.tmp~"):  # what a killed writer leaves
            leftover.rename(leftover.with_name(leftover.name[:-1]))
        assert temporaries(out), name
        assert sweep(out) == 0, name
        assert temporaries(out) == [], name
        assert numbers(record.result_path(out, KEY)) == reference, name


# ----------------------------------------------------------------------------- full disk


def test_a_full_disk_stops_the_run_keeps_its_checkpoint_and_a_rerun_resumes(tmp_path, capsys, monkeypatch,
                                                                             reference):
    real = files.atomic_replace
    checkpoints = [0]

    def disk_fills_at_the_second_checkpoint(path, write):
        if Path(path).suffix == ".pt":
            checkpoints[0] += 1
            if checkpoints[0] == 2:
                def half_then_full(f):
                    f.write(b"x" * 1000)
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                return real(path, half_then_full)
        return real(path, write)

    with monkeypatch.context() as m:
        m.setattr(files, "atomic_replace", disk_fills_at_the_second_checkpoint)
        assert sweep(tmp_path) == 2
    captured = capsys.readouterr()
    err_lines = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert len(err_lines) == 1 and no_traceback(captured.out + captured.err)
    assert f"no space left on the device of {record.checkpoint_path(tmp_path, KEY).parent} while writing seed0.pt" \
        in err_lines[0]
    assert record.read_checkpoint(record.checkpoint_path(tmp_path, KEY))["completed_tasks"] == 1  # the last good one
    assert temporaries(tmp_path) == [] and not record.result_path(tmp_path, KEY).exists()
    assert read_status(tmp_path, KEY)["state"] == "failed"
    assert sweep(tmp_path) == 0
    assert "resuming after task 1/3" in capsys.readouterr().out
    assert numbers(record.result_path(tmp_path, KEY)) == reference


# ----------------------------------------------------------------------------- output folder


def refused(capsys, argv: list[str], fragment: str) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    problem = [line for line in err.splitlines() if "--out" in line]
    assert len(problem) == 1 and fragment in problem[0], err
    assert no_traceback(err)
    return problem[0]


def test_out_below_a_file_is_refused_before_anything_runs(tmp_path, capsys):
    (tmp_path / "a-file").write_text("")
    refused(capsys, [*TOY, "--out", str(tmp_path / "a-file" / "results")], "is a file, not a folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


def test_out_that_cannot_be_created_is_refused(tmp_path, capsys):
    refused(capsys, [*TOY, "--out", "/proc/clbench-nonexistent/results"], "cannot create it (No such file")


def test_out_on_a_read_only_file_system_is_refused(tmp_path, capsys, monkeypatch):
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(tmp_path))

    monkeypatch.setattr(preflight.tempfile, "mkstemp", read_only)  # root writes anywhere: simulate the mount
    refused(capsys, [*TOY, "--out", str(tmp_path)], "cannot write into it (Read-only file system")
    assert list(tmp_path.iterdir()) == []


def test_out_without_room_for_the_checkpoints_is_refused(tmp_path, capsys, monkeypatch):
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda p: usage._replace(free=1000))
    line = refused(capsys, [*TOY, "--out", str(tmp_path / "r")], "1000 bytes free on its file system")
    model = timm.create_model("vit_toy_patch4_16", num_classes=0)
    assert preflight.state_bytes("vit_toy_patch4_16") == sum(t.numel() * 4 for t in model.state_dict().values())
    need = 2 * preflight.state_bytes("vit_toy_patch4_16")
    assert f"checkpoints need about {files.format_size(need)};" in line and " KiB;" in line  # not "0.00 GiB"


def test_sizes_read_in_a_unit_that_fits_them():
    assert [files.format_size(n) for n in (0, 1000, 12.5 * 2**10, 655 * 2**20, 1.2 * 2**30, 350 * 2**30)] == \
        ["0 bytes", "1000 bytes", "12.5 KiB", "655 MiB", "1.20 GiB", "350 GiB"]
    assert files.format_size(float("nan")) == "an unknown amount"


# ----------------------------------------------------------------------------- enum values


def test_a_bad_enum_value_is_refused_at_plan_time_with_the_valid_values(tmp_path, capsys):
    assert sweep(tmp_path / "r", "--set", "train.optimizer=foo") == 2
    err = capsys.readouterr().err
    assert err.strip() == "error: train.optimizer 'foo' is unknown; use one of sgd, adam, adamw"
    assert not (tmp_path / "r").exists()


def one_of_fields(cls) -> list[tuple[str, tuple[str, ...]]]:
    return [(f.name, f.metadata["choices"]) for f in dataclasses.fields(cls) if "choices" in f.metadata]


ENUMS = [("train", name, choices) for name, choices in one_of_fields(TrainConfig)] + \
        [("data", name, choices) for name, choices in one_of_fields(DataConfig)] + \
        [(f"method:{m}", name, choices) for m in sorted(METHODS) for name, choices in one_of_fields(get_method(m).Config)]


def test_the_enum_like_keys_are_declared():
    declared = {(section.split(":")[0], name) for section, name, _ in ENUMS}
    assert {("train", "optimizer"), ("train", "schedule"), ("train", "on_divergence"), ("data", "test_order"),
            ("method", "variant"), ("method", "head_init"), ("method", "prompt_mode"), ("method", "subspace"),
            ("method", "init"), ("method", "kd_residual"), ("method", "kd_scope"), ("method", "kd_fold")} <= declared


@pytest.mark.parametrize("section, name, choices", ENUMS, ids=[f"{s}.{n}" for s, n, _ in ENUMS])
def test_every_enum_key_refuses_an_unknown_value_when_resolved(section, name, choices):
    method = section.split(":")[1] if section.startswith("method:") else "full_ft"
    where = "method" if section.startswith("method:") else section
    with pytest.raises(ConfigError, match=f"{where}.{name} 'bogus' is unknown; use one of {', '.join(choices)}"):
        resolve_config("toy", 3, method, 0, overrides={where: {name: "bogus"}})  # plan time, not in a run
    for value in choices:  # and takes each valid one, alone or (its Config's validate hook) with what it needs
        try:
            assert resolve_config("toy", 3, method, 0, overrides={where: {name: value}}) is not None
        except ConfigError as err:  # a relation between keys: not the value being unknown
            assert "is unknown" not in str(err), err


# ----------------------------------------------------------------------------- data workers


def image_folder_dataset(root: Path):
    from clbench.benchmarks import datasets as D

    class_names = [f"n{i:03d}" for i in range(4)]
    for split in ("train", "test"):
        for k, c in enumerate(class_names):
            for i in range(2):
                path = root / split / c / f"img_{i}.jpg"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (8, 8), (40 * k, 128, 20 * i)).save(path, format="JPEG")
    bad = root / "train" / class_names[2] / "img_1.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not a JPEG")
    to_tensor = __import__("torchvision").transforms.ToTensor()
    return D.load_imagenet_r(root, to_tensor, to_tensor, root / "splits", num_classes=4)[0], bad


def test_a_corrupt_image_reads_the_same_with_or_without_workers(tmp_path):
    train, bad = image_folder_dataset(tmp_path / "imagenet-r")
    messages = []
    for workers in (0, 2):
        loader = seeded_loader(train, 0, 4, False, False, workers)
        with pytest.raises(DataError) as err:
            list(loader)
        messages.append(str(err.value))
    assert messages[0] == messages[1]
    assert messages[0].startswith(f"cannot read image {bad}: ") and "\n" not in messages[0]


def test_a_corrupt_image_in_a_sweep_with_workers_is_one_line(tmp_path, capsys):
    root = tmp_path / "data" / "imagenet-r"
    classes = [f"n{i:03d}" for i in range(200)]
    for split in ("train", "test"):
        for k, c in enumerate(classes):
            path = root / split / c / "img_0.jpg"
            path.parent.mkdir(parents=True)
            if split == "train":  # every training image is broken: the first batch meets one
                path.write_bytes(b"\xff\xd8\xff\xe0 truncated")
            else:
                Image.new("RGB", (8, 8), (k, 128, 0)).save(path, format="JPEG")
    for workers in (0, 2):
        argv = ["--bench", "imr", "--tasks", "5", "--methods", "full_ft", "--seeds", "0", "--no-progress",
                "--backbone", "vit_toy_patch4_16", "--set", "backbone.pretrained=false", "--set", "data.image_size=16",
                "--set", f"train.num_workers={workers}", "--set", "train.epochs=1", "--data-root", str(tmp_path / "data"),
                "--out", str(tmp_path / f"out{workers}")]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: cannot read image ") and err.count("\n") == 1 and no_traceback(err), err
        assert str(root / "train") in err
        key = next((tmp_path / f"out{workers}" / "status").rglob("*.json"))
        assert json.loads(key.read_text())["state"] == "failed"


# ----------------------------------------------------------------------------- signals at each instant
# A signal is a request to stop: the run stops at its next safe point (clbench.stopping), so a
# write in flight completes, the run is recorded interrupted (not failed) and the rerun resumes
# from its checkpoint to the numbers of an uninterrupted run. Each instant is reached by a hook
# (tests/interrupt_hooks.py) that sends the signal from inside it and holds it open until the
# process knows of the stop.

SIGNALLED_AT = [  # (instant, signal, extra sweep options, tasks the checkpoint holds after the stop)
    ("checkpoint", "SIGTERM", [], 2),  # inside torch's zip writer, writing task 2's checkpoint over task 1's
    ("status", "SIGINT", [], 1),  # the status write after task 1's checkpoint
    ("loader", "SIGTERM", ["--set", "train.num_workers=2"], 1),  # a worker handing over a batch of task 2
    ("evaluate", "SIGINT", ["--set", "train.eval_batch_size=8"], 1),  # the evaluation after task 2, 4 batches
]


def interrupted_line(sig: str, kept: int) -> str:
    return (f"[{KEY}] interrupted by {sig} during task {kept + 1}/3: its checkpoint holds tasks 1-{kept}; "
            f"run the same command again to resume")


@pytest.mark.parametrize("at, sig, extra, kept", SIGNALLED_AT, ids=[a for a, *_ in SIGNALLED_AT])
def test_a_signal_at_each_instant_stops_the_run_at_the_next_safe_point_and_the_rerun_resumes(
        tmp_path, monkeypatch, capsys, reference, at, sig, extra, kept):
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        arm(m.setattr, at, sig, os.getpid(), tmp_path / "latch", out, nth=2)
        assert sweep(out, *extra) == 128 + getattr(signal, sig)
    assert (tmp_path / "latch").exists()  # the hook fired
    err = capsys.readouterr().err
    assert interrupted_line(sig, kept) in err and no_traceback(err), err
    assert err.splitlines()[-1].startswith(f"error: interrupted by {sig}; every file is complete or absent")
    assert read_status(out, KEY)["state"] == "interrupted"  # not failed
    assert record.read_checkpoint(record.checkpoint_path(out, KEY))["completed_tasks"] == kept  # whole
    assert temporaries(out) == [] and not record.result_path(out, KEY).exists()
    assert sweep(out, *extra) == 0
    assert f"resuming after task {kept}/3" in capsys.readouterr().out
    assert numbers(record.result_path(out, KEY)) == reference
    assert read_status(out, KEY)["state"] == "done"


def test_a_second_signal_stops_at_once_even_inside_torchs_zip_writer(tmp_path, monkeypatch, capsys, reference):
    """Two SIGTERMs while task 2's checkpoint is written: the second raises where it lands,
    inside torch's writer; the checkpoint write is abandoned (task 1's stays whole) and the run
    is interrupted, not failed, whatever error the writer made of it."""
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        arm(m.setattr, "checkpoint", "SIGTERM", os.getpid(), tmp_path / "latch", out, nth=2, times=2)
        assert sweep(out) == 128 + signal.SIGTERM
    err = capsys.readouterr().err
    assert interrupted_line("SIGTERM", 1) in err and no_traceback(err), err
    assert read_status(out, KEY)["state"] == "interrupted"
    assert record.read_checkpoint(record.checkpoint_path(out, KEY))["completed_tasks"] == 1
    assert temporaries(out) == []
    assert sweep(out) == 0
    assert numbers(record.result_path(out, KEY)) == reference


@pytest.mark.parametrize("at", ["result", "done"])
def test_a_signal_during_a_runs_last_writes_leaves_it_done_and_starts_no_further_run(
        tmp_path, monkeypatch, capsys, reference, at):
    """A run whose result is complete is done whatever its last status write met; a sweep with
    runs left stops (exit 143) and starts none of them, one without ends as if no signal came."""
    seed1 = resolve_config("toy", 3, "full_ft", 1, overrides=ONE_EPOCH).key
    for seeds, code in (("0,1", 128 + signal.SIGTERM), ("0", 0)):
        out = tmp_path / f"seeds{seeds}"
        with monkeypatch.context() as m:
            arm(m.setattr, at, "SIGTERM", os.getpid(), tmp_path / f"latch{seeds}", out)
            assert sweep(out, "--seeds", seeds) == code
        captured = capsys.readouterr()
        assert (tmp_path / f"latch{seeds}").exists() and no_traceback(captured.err)
        assert numbers(record.result_path(out, KEY)) == reference
        assert read_status(out, KEY)["state"] == "done" and not record.checkpoint_path(out, KEY).exists()
        assert "interrupted during" not in captured.err
        assert not (status_path(out, seed1).exists() or record.result_path(out, seed1).exists())  # never started
        if code:
            assert captured.err.splitlines()[-1].startswith("error: interrupted by SIGTERM")
        else:
            assert "error" not in captured.err and "1 runs planned" in captured.out
    assert sweep(tmp_path / "seeds0,1", "--seeds", "0,1") == 0
    assert "1 already done, 1 to run" in capsys.readouterr().out


def test_a_full_disk_inside_torchs_zip_writer_is_the_one_line_error_and_keeps_the_last_checkpoint(
        tmp_path, monkeypatch, capsys, reference):
    """torch's writer turns the OS's error into "unexpected pos ..." (a traceback, exit 1, the
    sweep going on); the harness reports the full disk."""
    with monkeypatch.context() as m:
        arm(m.setattr, "checkpoint", "ENOSPC", "wait", tmp_path / "latch", tmp_path, nth=2)
        assert sweep(tmp_path, "--seeds", "0,1") == 2
    captured = capsys.readouterr()
    err_lines = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert len(err_lines) == 1 and no_traceback(captured.out + captured.err), captured.err
    assert f"no space left on the device of {record.checkpoint_path(tmp_path, KEY).parent} while writing seed0.pt" \
        in err_lines[0] and "free; nothing was left half-written" in err_lines[0]
    assert record.read_checkpoint(record.checkpoint_path(tmp_path, KEY))["completed_tasks"] == 1  # the last good one
    assert read_status(tmp_path, KEY)["state"] == "failed" and temporaries(tmp_path) == []
    assert len(list((tmp_path / "status").rglob("*.json"))) == 1  # seed 1 never started
    assert sweep(tmp_path) == 0
    assert "resuming after task 1/3" in capsys.readouterr().out
    assert numbers(record.result_path(tmp_path, KEY)) == reference


# ----------------------------------------------------------------------------- --jobs

@pytest.fixture(scope="module")
def two_seeds(tmp_path_factory) -> dict:
    """The numbers of a serial sweep of seeds 0 and 1 (one thread, as each --jobs 2 child on two cores)."""
    out = tmp_path_factory.mktemp("two_seeds")
    assert sweep(out, "--seeds", "0,1", "--threads", "1") == 0
    return {p.relative_to(out / "runs").as_posix(): numbers(p) for p in (out / "runs").rglob("*.json")}


def results(root: Path) -> dict:
    return {p.relative_to(root / "runs").as_posix(): numbers(p) for p in (root / "runs").rglob("*.json")}


def states(root: Path) -> dict:
    return {p.relative_to(root / "status").with_suffix("").as_posix(): read_status(root, p.relative_to(
        root / "status").with_suffix("").as_posix())["state"] for p in (root / "status").rglob("*.json")}


JOBS = ["--seeds", "0,1", "--jobs", "2", "--threads", "1", "--plugins", HOOKS_FILE]


@pytest.mark.slow
@pytest.mark.parametrize("at, sig, parallel", [("checkpoint", "SIGTERM", ["--jobs", "2"]),
                                               ("evaluate", "SIGINT", ["--devices", "cpu,cpu"])])
def test_jobs_2_a_signal_to_the_sweep_inside_a_childs_write_stops_every_child_at_a_safe_point(
        tmp_path, monkeypatch, capfd, two_seeds, at, sig, parallel):
    out = tmp_path / "out"
    monkeypatch.setenv("CLBENCH_TEST_INTERRUPT", spec(at, sig, os.getpid(), tmp_path / "latch", out))
    extra = ["--set", "train.eval_batch_size=8", *parallel]
    assert sweep(out, *JOBS, *extra) == 128 + getattr(signal, sig)
    captured = capfd.readouterr()
    assert (tmp_path / "latch").exists() and no_traceback(captured.err), captured.err
    assert re.search(r"^2 run\(s\) on 2 worker\(s\)( \(cpu, cpu\))?, 1 thread\(s\) each$", captured.out, re.M)
    found = states(out)
    assert "interrupted" in found.values() and set(found.values()) <= {"interrupted", "done"}, found
    assert f"interrupted by {sig} during task 2/3: its checkpoint holds tasks 1-1" in captured.err
    for line in (captured.out + captured.err).splitlines():  # the children's lines, each whole and prefixed
        if "toy/N3/full_ft" in line:
            assert re.match(r"\[w[12]( cpu)?\] ", line) and line.count("toy/N3/full_ft") == 1, line
    assert captured.err.splitlines()[-1].startswith(f"error: interrupted by {sig}")
    assert temporaries(out) == []
    monkeypatch.delenv("CLBENCH_TEST_INTERRUPT")
    assert sweep(out, *JOBS, *extra) == 0
    assert results(out) == two_seeds and set(states(out).values()) == {"done"}


@pytest.mark.slow
def test_jobs_2_children_stop_at_a_safe_point_when_the_sweep_is_killed(tmp_path, two_seeds):
    """SIGKILL to a --jobs sweep (the OOM killer, kill -9) while a child writes a checkpoint:
    the children see their parent gone at their next safe point and stop as on SIGTERM, so no
    orphan trains on; the rerun resumes to a serial sweep's numbers."""
    out, latch = tmp_path / "out", tmp_path / "latch"
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "CLBENCH_TEST_INTERRUPT": spec("checkpoint", "SIGKILL", "wait", latch, out, sweep_pid=0)}
    with open(tmp_path / "log", "w") as log:
        process = subprocess.Popen([sys.executable, "-m", "clbench", *TOY, *JOBS, "--out", str(out)], env=env,
                                   stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 300
        while not latch.exists() and process.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        assert latch.exists(), (tmp_path / "log").read_text()
        process.kill()  # the sweep's process alone: its children live on, orphans
        process.wait()

        def settled() -> dict:
            found = states(out)
            return found if found and "running" not in found.values() else {}

        deadline = time.time() + 120
        while not settled() and time.time() < deadline:
            time.sleep(0.1)
        found = settled()
        assert "interrupted" in found.values() and set(found.values()) <= {"interrupted", "done"}, \
            (found, (tmp_path / "log").read_text())
        assert "interrupted by SIGTERM during task 2/3: its checkpoint holds tasks 1-1" in (tmp_path / "log").read_text()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # whatever of the session is left
    assert temporaries(out) == []
    assert sweep(out, *JOBS) == 0
    assert results(out) == two_seeds


@pytest.mark.slow
def test_jobs_2_a_full_disk_in_one_child_starts_no_further_run_in_any(tmp_path, monkeypatch, capfd):
    """The first checkpoint written by either child meets a full disk: that child stops the
    sweep; the other finishes the run it had started, if any (it had written no checkpoint
    yet), and starts no other: seed 2 never starts."""
    monkeypatch.setenv("CLBENCH_TEST_INTERRUPT", spec("checkpoint", "ENOSPC", "wait", tmp_path / "latch", tmp_path))
    assert sweep(tmp_path, *JOBS[2:], "--seeds", "0,1,2") == 2
    captured = capfd.readouterr()
    err_lines = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert len(err_lines) == 1 and "no space left on the device" in err_lines[0] and no_traceback(captured.err)
    found = states(tmp_path)
    assert sorted(found.values()) in (["done", "failed"], ["failed"]), f"{found}\n{captured.out}\n{captured.err}"
    assert resolve_config("toy", 3, "full_ft", 2, overrides=ONE_EPOCH).key not in found  # never started
    assert temporaries(tmp_path) == []


# ----------------------------------------------------------------------------- signals at a random instant

SYNTH = ["--bench", "synth", "--tasks", "5", "--methods", "full_ft", "--seeds", "0", "--set", "train.epochs=1",
         "--device", "cpu", "--threads", "1", "--no-progress"]


def synth_sweep(out: Path, *extra: str) -> subprocess.Popen:
    """The command line in a fresh process (SIGINT at its default, as in a terminal), in a process
    group of its own (what a terminal's Ctrl-C reaches)."""
    return subprocess.Popen([sys.executable, "-m", "clbench", *SYNTH, "--out", str(out), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def wait_for(process: subprocess.Popen, folder: Path) -> float:
    """Wait until a file appears under ``folder`` (``status``: the run started training; ``runs``:
    it finished); the time it did."""
    deadline = time.time() + 600
    while not any(folder.rglob("*.json")) and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    return time.time()


@pytest.mark.slow
def test_sigkill_sigterm_and_sigint_at_a_random_point_then_a_rerun_equal_an_uninterrupted_run(tmp_path):
    straight = synth_sweep(tmp_path / "straight")
    training_s = -wait_for(straight, tmp_path / "straight" / "status")
    training_s += wait_for(straight, tmp_path / "straight" / "runs")  # then the report: not a run's time
    assert straight.wait(timeout=600) == 0, straight.communicate()
    expected = numbers(next((tmp_path / "straight" / "runs").rglob("*.json")))
    seed = int(os.environ.get("CLBENCH_SIGNAL_SEED") or random.randrange(10**6))
    print(f"random seed {seed} (CLBENCH_SIGNAL_SEED={seed} repeats these instants)")
    rng = random.Random(seed)
    for sig, code in ((signal.SIGKILL, -signal.SIGKILL), (signal.SIGTERM, 128 + signal.SIGTERM),
                      (signal.SIGINT, 128 + signal.SIGINT)):
        out = tmp_path / sig.name
        process = synth_sweep(out)
        wait_for(process, out / "status")
        delay = rng.uniform(0.0, 0.8 * training_s)
        time.sleep(delay)
        process.send_signal(sig)
        stdout, stderr = process.communicate(timeout=600)
        why = (f"{sig.name} after {delay:.2f}s of training (random seed {seed}: CLBENCH_SIGNAL_SEED={seed}):"
               f"\n{stdout}\n{stderr}")
        assert process.returncode == code, why
        if sig != signal.SIGKILL:  # stopped in order: nothing half-written, told how to resume
            assert temporaries(out) == [] and no_traceback(stderr), why
            assert "run the same command again to resume" in stderr.splitlines()[-1], why
            key = next((out / "status").rglob("*.json")).relative_to(out / "status").with_suffix("").as_posix()
            assert read_status(out, key)["state"] == "interrupted", why
        rerun = synth_sweep(out)
        stdout, stderr = rerun.communicate(timeout=600)
        assert rerun.returncode == 0, f"{why}\nrerun:\n{stdout}\n{stderr}"
        assert temporaries(out) == [], why
        assert numbers(next((out / "runs").rglob("*.json"))) == expected, why


@pytest.mark.slow
def test_sigterm_and_ctrl_c_stop_a_parallel_sweep_at_once_and_a_rerun_finishes_it(tmp_path):
    """--jobs 2: SIGTERM to the sweep (a scheduler, kill) or SIGINT to its process group (Ctrl-C)
    stops the running runs and starts no other; the rerun resumes them to a serial sweep's numbers."""
    two = ["--methods", "full_ft,sdlora", "--threads", "1"]
    serial = synth_sweep(tmp_path / "serial", *two, "--jobs", "1")
    assert serial.wait(timeout=600) == 0, serial.communicate()
    def results(root: Path) -> dict:
        return {p.relative_to(root / "runs").as_posix(): numbers(p) for p in (root / "runs").rglob("*.json")}

    expected = results(tmp_path / "serial")
    assert len(expected) == 2
    for sig, code in ((signal.SIGTERM, 128 + signal.SIGTERM), (signal.SIGINT, 128 + signal.SIGINT)):
        out = tmp_path / sig.name
        process = synth_sweep(out, *two, "--jobs", "2")
        deadline = time.time() + 600
        while len(list((out / "status").rglob("*.json"))) < 2 and process.poll() is None and time.time() < deadline:
            time.sleep(0.02)  # both runs are training
        time.sleep(1.0)
        sent = time.time()
        if sig == signal.SIGINT:
            os.killpg(process.pid, sig)
        else:
            process.send_signal(sig)
        stdout, stderr = process.communicate(timeout=600)
        why = f"{sig.name}:\n{stdout}\n{stderr}"
        assert process.returncode == code and time.time() - sent < 20, why
        assert temporaries(out) == [] and "run the same command again to resume" in stderr.splitlines()[-1], why
        states = {read_status(out, p.relative_to(out / "status").with_suffix("").as_posix())["state"]
                  for p in (out / "status").rglob("*.json")}
        assert "interrupted" in states and states <= {"interrupted", "done"}, (states, why)
        rerun = synth_sweep(out, *two, "--jobs", "2")
        stdout, stderr = rerun.communicate(timeout=600)
        assert rerun.returncode == 0, f"{why}\nrerun:\n{stdout}\n{stderr}"
        assert results(out) == expected, why
