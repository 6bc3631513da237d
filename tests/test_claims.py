"""A run is claimed before it trains, and several runs can train at once on one machine.

Real processes throughout: the claim is a POSIX record lock, which only another process can
contend for (a process never blocks on its own locks).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from clbench import record
from clbench.cli import main
from clbench.jobs import claim_path, read_status, run_job, update_status
from clbench.recipes import resolve_config

TESTS = Path(__file__).resolve().parent
# The command line in a fresh process, with the tests' ``toy`` benchmark registered.
CLI = (f"import sys; sys.path.insert(0, {str(TESTS)!r}); import conftest; from clbench.cli import main; "
       f"sys.exit(main(sys.argv[1:]))")
TOY = ["--bench", "toy", "--methods", "full_ft", "--no-progress"]


def cli_process(*argv: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-c", CLI, *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)


def hold_lock(path: Path) -> subprocess.Popen:
    """A process that holds ``path``'s record lock until it is killed (no torch: starts at once)."""
    code = ("import fcntl, sys, time; f = open(sys.argv[1], 'a+'); fcntl.lockf(f, fcntl.LOCK_EX); "
            "print('held', flush=True); time.sleep(600)")
    path.parent.mkdir(parents=True, exist_ok=True)
    holder = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def numbers(result_file: Path) -> dict:
    """What a run computed (not when, where or how fast)."""
    r = json.loads(result_file.read_text())
    return {"metrics": r["metrics"], "accuracy_matrix": r["accuracy_matrix"], "class_order": r["class_order"],
            "tasks": [{k: t[k] for k in ("accuracy", "classes", "method_log")} for t in r["tasks"]]}


def test_a_run_held_by_a_live_process_is_skipped_and_taken_over_when_it_dies(tmp_path, capsys):
    cfg = resolve_config("toy", 3, "full_ft", 0, device="cpu")
    holder = hold_lock(claim_path(tmp_path, cfg.key))
    try:
        update_status(tmp_path, cfg.key, state="running", host="node7", pid=holder.pid)
        assert run_job(cfg.to_dict(), str(tmp_path), progress=False) is None
        assert f"[{cfg.key}] skipped: being trained by host node7, pid {holder.pid}" in capsys.readouterr().out
        assert not record.result_path(tmp_path, cfg.key).exists()
    finally:
        holder.send_signal(signal.SIGKILL)  # the holder dies: the kernel releases its claim
        holder.wait()
    metrics = run_job(cfg.to_dict(), str(tmp_path), progress=False)
    assert metrics is not None and record.result_path(tmp_path, cfg.key).exists()
    assert claim_path(tmp_path, cfg.key).exists()  # never deleted: a deletion races with a taker


@pytest.mark.slow
def test_two_concurrent_sweeps_on_one_out_train_each_run_once(tmp_path):
    shared, single = tmp_path / "shared", tmp_path / "single"
    argv = [*TOY, "--seeds", "0,1"]
    sweeps = [cli_process(*argv, "--out", str(shared)) for _ in range(2)]
    outputs = [p.communicate(timeout=600)[0] for p in sweeps]
    assert [p.returncode for p in sweeps] == [0, 0], outputs
    assert main([*argv, "--out", str(single)]) == 0
    results = sorted((shared / "runs").rglob("*.json"))
    assert len(results) == 2
    for path in results:
        key = str(path.relative_to(shared / "runs").with_suffix(""))
        status = read_status(shared, key)
        assert status["state"] == "done" and len(status["attempts"]) == 1, status  # trained once
        assert numbers(path) == numbers(single / "runs" / path.relative_to(shared / "runs"))


@pytest.mark.slow
def test_a_killed_sweeps_run_is_resumed_from_its_checkpoint_by_the_next(tmp_path):
    argv = [*TOY, "--seeds", "0", "--out", str(tmp_path)]
    first = cli_process(*argv)
    checkpoints = tmp_path / "checkpoints"
    deadline = time.time() + 300
    while not any(checkpoints.rglob("*.pt")) and first.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert first.poll() is None, "the run finished before it could be killed"
    first.send_signal(signal.SIGKILL)  # like a lost node: no clean-up, the claim file stays
    first.wait()
    second = cli_process(*argv)
    output = second.communicate(timeout=600)[0]
    assert second.returncode == 0, output
    key = str(next((tmp_path / "runs").rglob("*.json")).relative_to(tmp_path / "runs").with_suffix(""))
    attempts = read_status(tmp_path, key)["attempts"]
    assert len(attempts) == 2 and attempts[0]["from_task"] == 0 and attempts[1]["from_task"] > 0, attempts


@pytest.mark.slow
def test_jobs_2_gives_the_numbers_of_a_serial_sweep(tmp_path):
    # CPU float results can depend on the thread count: both sweeps use one thread per run.
    argv = ["--bench", "synth", "--tasks", "5", "--methods", "full_ft", "--seeds", "0,1", "--set", "train.epochs=1",
            "--device", "cpu", "--threads", "1", "--no-progress"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for out, extra in ((tmp_path / "serial", []), (tmp_path / "parallel", ["--jobs", "2"])):
        done = subprocess.run([sys.executable, "-m", "clbench", *argv, *extra, "--out", str(out)],
                              capture_output=True, text=True, timeout=900, env=env)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "2 run(s) on 2 worker(s), 1 thread(s) each" in done.stdout
    serial = sorted((tmp_path / "serial" / "runs").rglob("*.json"))
    assert len(serial) == 2
    for path in serial:
        twin = tmp_path / "parallel" / "runs" / path.relative_to(tmp_path / "serial" / "runs")
        assert json.dumps(numbers(path), sort_keys=True) == json.dumps(numbers(twin), sort_keys=True)
        key = str(path.relative_to(tmp_path / "serial" / "runs").with_suffix(""))
        assert read_status(tmp_path / "parallel", key)["state"] == "done"
