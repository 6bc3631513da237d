"""The SLURM launcher: profiles, run states, status/collect and the plain-sbatch array without a
cluster; then, marked ``slurm``, real job arrays on the local single-node cluster that
``.ci/run`` starts: results equal to a local run, a failing job shown by ``status``, a preempted
element requeued and resumed, a rerun that submits nothing, and a job (submitit's, and a
plain-sbatch element) signalled during its checkpoint write requeued and finished."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from pathlib import Path

import interrupt_hooks as hooks  # tests/, on the path as conftest.py's folder
import pytest
import submitit

from clbench import files, protocol, record
from clbench.benchmarks import BENCHMARKS
from clbench.cli import main
from clbench.errors import ConfigError
from clbench.jobs import read_status, update_status
from clbench.recipes import resolve_config
from clbench.record import RunResult
from clbench.slurm import launcher
from clbench.slurm.launcher import NotRequeued, load_profile, note_requeue
from clbench.status import run_states, submission_path

REPO = Path(__file__).resolve().parent.parent
TOY = ["--bench", "toy", "--methods", "full_ft", "--no-progress"]




def result(root: Path, key: str) -> RunResult:
    return record.read_result(record.result_path(root, key))


# ==================================================================== without a cluster


def test_profiles_load_validate_and_take_overrides():
    gpu = load_profile("gpu")
    assert gpu.gpus_per_task == 1 and gpu.time_limit("hide_prompt") > gpu.time_limit("sdlora")
    local = load_profile("local", ["time_min=45", "time_min_per_method.sdlora=12", "partition=debug"])
    assert (local.time_limit("full_ft"), local.time_limit("sdlora"), local.partition) == (45, 12, "debug")
    with pytest.raises(ConfigError, match="Valid keys"):
        load_profile("local", ["time=5"])
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_profile("local", ["time_min"])
    with pytest.raises(ConfigError, match="unknown method"):
        load_profile("local", ["time_min_per_method.sdlroa=5"])
    with pytest.raises(ConfigError, match="available: .*gpu.*local"):
        load_profile("nope")


def _a100_profile():
    return load_profile("gpu", ["partition=a100", "mem_gb=32", "sbatch_extra=['--exclude=node7', '--exclusive']"])


def test_profile_becomes_submitit_parameters():
    profile = _a100_profile()
    params = profile.submitit_parameters(profile.time_limit("hide_prompt"))
    assert params["additional_parameters"] == {"exclude": "node7", "exclusive": True}
    assert params["time"] == 1440 and params["gpus_per_node"] == 1 and params["partition"] == "a100"
    with pytest.raises(ConfigError, match="--name=value"):
        load_profile("local", ["sbatch_extra=['exclude=node7']"]).extra_parameters()


@pytest.mark.slurm
def test_submitit_accepts_the_profile_parameters(tmp_path):
    """submitit checks parameters by writing the sbatch script; its executor needs ``srun``."""
    profile = _a100_profile()
    executor = submitit.SlurmExecutor(folder=tmp_path)
    executor.update_parameters(**profile.submitit_parameters(profile.time_limit("hide_prompt")))


def test_run_state_joins_record_submission_and_sacct(tmp_path):
    from clbench.plan import plan

    out = tmp_path / "r"
    run = plan(["toy"], None, ["full_ft"], [0], out)[0]

    def run_state(slurm):
        return run_states([run], out, slurm)[0]

    assert run_state({}).state == "todo"
    log = tmp_path / "12_3.err"
    log.write_text("Traceback...\nslurmstepd: error: *** JOB 12 CANCELLED DUE TO TIME LIMIT ***\n")
    submission_path(out, run.key).parent.mkdir(parents=True)
    submission_path(out, run.key).write_text(json.dumps(
        {"job_id": "12_3", "submitted_at": time.time() - 90, "stderr": str(log)}))
    assert run_state({}).state == "pending"  # submitted, not in sacct yet
    assert run_state({"12_3": "PENDING"}).note.startswith("submitted 1m")
    update_status(out, run.key, state="running", tasks_done=2, elapsed_s=30.0, job_id="12_3", host="n1", pid=1)
    running = run_state({"12_3": "RUNNING"})
    assert (running.state, running.job_id, running.tasks_done) == ("running", "12_3", 2)
    assert running.elapsed_s >= 30.0
    update_status(out, run.key, state="requeued")
    assert run_state({"12_3": "PENDING"}).note == "requeued, resumes after task 2"
    gone = run_state({"12_3": "TIMEOUT"})
    assert gone.state == "failed" and not gone.confirmed
    assert "ended TIMEOUT without a result" in gone.error and "DUE TO TIME LIMIT" in gone.error
    # a local run whose process is gone
    dead = subprocess.Popen(["true"])
    dead.wait()
    update_status(out, run.key, state="running", job_id=None, host=socket.gethostname(), pid=dead.pid)
    assert run_state({}).state == "interrupted"


def test_requeue_is_refused_after_stalled_attempts(tmp_path):
    out, key = tmp_path, "toy/N3/full_ft/seed0"
    me = {"pid": os.getpid(), "host": socket.gethostname()}
    update_status(out, key, tasks_done=1, attempts=[{"from_task": 0, **me}])
    note_requeue(out, key, max_stalled=2)  # it made progress in this attempt
    assert read_status(out, key)["stalled_requeues"] == 0
    update_status(out, key, attempts=[{"from_task": 1, **me}])  # restarted, finished nothing since
    note_requeue(out, key, max_stalled=2)
    note_requeue(out, key, max_stalled=2)
    assert read_status(out, key)["stalled_requeues"] == 2
    with pytest.raises(NotRequeued, match="3 times in a row without finishing a task"):
        note_requeue(out, key, max_stalled=2)


def test_status_and_collect_of_local_runs(results_root, tmp_path, capsys, one_thread, monkeypatch):
    elsewhere = tmp_path / "elsewhere"
    assert main(TOY + ["--seeds", "0", "--out", str(elsewhere)]) == 0
    assert main(TOY + ["--seeds", "1"]) == 0

    def broken(self, task):
        raise ValueError("unknown optimizer 'nope'")

    with monkeypatch.context() as m:  # a bug inside the run: failed, with its traceback
        m.setattr(protocol.Run, "learn", broken)
        assert main(TOY + ["--seeds", "0", "--set", "train.lr=0.004"]) == 1
    capsys.readouterr()

    assert main(["status"] + TOY + ["--seeds", "0,1", "--launcher", "slurm", "--profile", "gpu"]) == 0  # the sweep's line
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split()[:2] == ["todo", "toy/N3/full_ft/seed0"]
    assert lines[2].split()[:4] == ["done", "toy/N3/full_ft/seed1", "local", "3/3"]
    assert lines[-1] == "2 runs: 1 done, 1 todo"
    assert main(["status"] + TOY[:-1] + ["--seeds", "0", "--set", "train.lr=0.004", "--lines", "2"]) == 0
    out = capsys.readouterr().out
    assert "failed" in out and "ValueError: unknown optimizer 'nope'" in out and "    | " in out

    assert main(["collect"] + TOY[:-1] + ["--seeds", "0,1,2"]) == 1  # seed 0 is elsewhere, seed 2 never ran
    assert "1 of 3 runs finished" in capsys.readouterr().out
    csv = tmp_path / "sweep.csv"
    assert main(["collect"] + TOY[:-1] + ["--seeds", "0,1", "--from", str(elsewhere), "--csv", str(csv)]) == 0
    out = capsys.readouterr().out
    assert "2 of 2 runs finished (1 gathered" in out and "| toy | 3 | full_ft |" in out
    assert result(results_root, "toy/N3/full_ft/seed0") == result(elsewhere, "toy/N3/full_ft/seed0")
    assert len(csv.read_text().splitlines()) == 3

    # a result made with another recipe is not gathered into this sweep
    stale = elsewhere / "runs/toy/N3/full_ft/seed0.json"
    (results_root / "runs/toy/N3/full_ft/seed0.json").unlink()
    data = json.loads(stale.read_text())
    data["config"]["train"]["lr"] *= 10
    data.pop("checksum", None)
    files.atomic_write_json(stale, data, checksum=True)  # a whole file, of another recipe
    assert main(["collect"] + TOY[:-1] + ["--seeds", "0", "--from", str(elsewhere)]) == 1
    assert "made by another configuration" in capsys.readouterr().out


def test_emitted_sbatch_array_runs_the_same_job(results_root, tmp_path, capsys, one_thread):
    emit = tmp_path / "array"
    assert main(TOY + ["--seeds", "0,1", "--launcher", "sbatch", "--emit", str(emit), "--profile", "gpu",
                       "--slurm", "partition=a100", "--slurm", "array_parallelism=1"]) == 0
    script = (emit / "array.sbatch").read_text()
    for line in ("#SBATCH --array=0-1%1", "#SBATCH --time=360", "#SBATCH --signal=B:USR2@180",
                 "#SBATCH --partition=a100", "#SBATCH --gpus-per-node=1", "#SBATCH --requeue",
                 f"#SBATCH --output={emit}/logs/%A_%a.out"):
        assert line in script, line
    assert "-m clbench.slurm.launcher" in script and str(emit / "tasks.jsonl") in script
    subprocess.run(["bash", "-n", str(emit / "array.sbatch")], check=True)
    tasks = [json.loads(line) for line in (emit / "tasks.jsonl").read_text().splitlines()]
    assert [t["key"] for t in tasks] == ["toy/N3/full_ft/seed0", "toy/N3/full_ft/seed1"]

    # element 1 as SLURM would start it, in this process (the toy benchmark lives in the tests' helpers.py)
    env = {"SLURM_ARRAY_JOB_ID": "77", "SLURM_ARRAY_TASK_ID": "1", "SLURM_JOB_ID": "78", "SLURM_CPUS_PER_TASK": "1"}
    with pytest.MonkeyPatch.context() as m:
        for k, v in env.items():
            m.setenv(k, v)
        assert launcher.main([str(emit / "tasks.jsonl")]) == 0
    record = read_status(results_root, "toy/N3/full_ft/seed1")
    assert (record["state"], record["job_id"], record["stderr"]) == ("done", "77_1", f"{emit}/logs/77_1.err")
    assert main(TOY + ["--seeds", "1", "--out", str(tmp_path / "local")]) == 0
    assert (result(results_root, "toy/N3/full_ft/seed1").accuracy_matrix
            == result(tmp_path / "local", "toy/N3/full_ft/seed1").accuracy_matrix)
    capsys.readouterr()
    assert main(TOY + ["--seeds", "1", "--launcher", "sbatch", "--emit", str(tmp_path / "again")]) == 0
    assert "nothing to emit" in capsys.readouterr().out


def test_ci_script_runs_the_readme_test_command():
    command = "pip install -e '.[test]' && python -m pytest -q"
    ci = (REPO / ".ci" / "run").read_text()
    assert any(line.strip() == command for line in ci.splitlines())  # exactly, on a line of its own
    readme = REPO / "README.md"
    if readme.exists():
        assert command in readme.read_text()
    subprocess.run(["bash", "-n", str(REPO / ".ci" / "run")], check=True)


# ==================================================================== on a real cluster

SYNTH = ["--bench", "synth", "--tasks", "5", "--methods", "full_ft", "--no-progress"]
ON_CLUSTER = ["--launcher", "slurm", "--profile", "local", "--poll", "1", "--wait-timeout", "10"]


@pytest.fixture(scope="module")
def cluster():
    """Skip unless a SLURM controller answers, a node can run jobs and accounting works."""
    def ok(*command: str) -> str | None:
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout if done.returncode == 0 else None

    nodes = ok("sinfo", "-h", "-o", "%T")
    if not nodes or not any(s.strip("*~#") in ("idle", "mixed", "allocated", "completing") for s in nodes.split()):
        pytest.skip("no SLURM node is up (.ci/run starts a local single-node cluster)")
    if ok("sacct", "-n", "-X", "-j", "1") is None:
        pytest.skip("SLURM accounting (sacct) does not answer; submitit needs it")
    if "synth" not in BENCHMARKS:
        pytest.skip("the synth benchmark is not registered")


def wait_until(condition, timeout_s: float, what: str, poll_s: float = 0.3):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")


def result_keys(out: Path) -> list[str]:
    return [p.relative_to(out / "runs").with_suffix("").as_posix() for p in sorted((out / "runs").rglob("*.json"))]


@pytest.mark.slurm
@pytest.mark.timeout(600)
def test_failing_job_is_reported_by_status_and_not_resubmitted(cluster, tmp_path, capsys):
    # a run that passes every plan-time check and fails inside its job: training diverges
    sweep = SYNTH + ["--seeds", "0", "--set", "train.lr=1e30", "--set", "train.epochs=1",
                     "--out", str(tmp_path / "cluster")]
    assert main(sweep + ON_CLUSTER) == 1  # submits, waits, reports
    assert "FAILED" in capsys.readouterr().out
    assert main(["status"] + sweep) == 0
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if "seed0" in ln)
    assert line.split()[0] == "failed" and "training diverged" in line  # one line: no traceback below it
    assert main(sweep + ON_CLUSTER) == 1
    out = capsys.readouterr().out
    assert "failed before" in out and "nothing to submit" in out


@pytest.mark.slurm
@pytest.mark.timeout(900)
def test_array_survives_preemption_equals_local_and_a_rerun_submits_nothing(cluster, tmp_path, capsys, one_thread):
    """One array of two seeds; element seed0 is preempted (submitit's interrupt: SIGTERM then
    USR2) after its first task, is requeued and resumes from there."""
    out = tmp_path / "cluster"
    sweep = SYNTH + ["--seeds", "0,1", "--set", "train.epochs=2", "--out", str(out)]
    assert main(sweep + ON_CLUSTER + ["--no-wait"]) == 0
    assert "submitted 2 run(s) as job array" in capsys.readouterr().out

    def seed0_after_a_task():
        records = list((out / "status").rglob("seed0.json"))
        record = json.loads(records[0].read_text()) if records else {}
        return record if record.get("tasks_done", 0) >= 1 else None

    record = wait_until(seed0_after_a_task, 300, "element seed0 to finish its first task", poll_s=0.2)
    assert record["tasks_done"] < 5, "the run finished before it could be preempted"
    submitit.SlurmJob(out / "slurm" / "%j", record["job_id"])._interrupt()
    assert main(sweep + ON_CLUSTER) == 0  # the same command waits for the runs it finds queued/running
    assert "2 run(s) already queued or running: not resubmitted" in capsys.readouterr().out

    keys = result_keys(out)
    assert len(keys) == 2
    attempts = [read_status(out, key)["attempts"] for key in keys]  # seed0, seed1
    assert len(attempts[0]) == 2 and attempts[0][0]["job_id"] == attempts[0][1]["job_id"] == record["job_id"]
    assert attempts[0][1]["from_task"] >= record["tasks_done"]  # resumed, not restarted
    assert len(attempts[1]) == 1
    local = tmp_path / "local"
    assert main(sweep[:-2] + ["--out", str(local)]) == 0  # the same seeds with the local launcher
    for key in keys:
        assert result(out, key).environment["slurm_job_id"]
        assert result(out, key).accuracy_matrix == result(local, key).accuracy_matrix

    assert main(["status"] + sweep) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "2 runs: 2 done"
    jobs_before = sorted(p.name for p in (out / "slurm").iterdir())
    assert main(sweep + ON_CLUSTER) == 0
    assert "2 already done, 0 to run" in capsys.readouterr().out
    assert sorted(p.name for p in (out / "slurm").iterdir()) == jobs_before


@pytest.mark.slurm
@pytest.mark.timeout(600)
def test_a_job_signalled_during_its_checkpoint_write_is_requeued_and_finishes(cluster, tmp_path, capsys, monkeypatch,
                                                                             one_thread):
    """Preemption (submitit's interrupt: SIGTERM, then USR2) while the job writes its first
    checkpoint (a hook holds the write open until the job knows of the signal): the write
    completes, then submitit checkpoints and requeues the job, which resumes from that
    checkpoint and ends with a local run's numbers."""
    out, latch = tmp_path / "cluster", tmp_path / "latch"
    monkeypatch.setenv(hooks.ENV, hooks.spec("checkpoint", "SIGUSR2", "wait", latch, out))
    sweep = TOY + ["--seeds", "0", "--set", "train.epochs=1", "--plugins", hooks.HOOKS_FILE, "--out", str(out)]
    key = resolve_config("toy", 3, "full_ft", 0, overrides={"train": {"epochs": 1}}).key
    assert main(sweep + ON_CLUSTER + ["--no-wait"]) == 0
    wait_until(latch.exists, 300, "the job to be inside its first checkpoint write")
    job_id = files.read_json(submission_path(out, key))["job_id"]
    submitit.SlurmJob(out / "slurm" / "%j", job_id)._interrupt()
    assert main(sweep + ON_CLUSTER) == 0  # waits for the requeued job
    status = read_status(out, key)
    assert status["state"] == "done", status
    assert [a["from_task"] for a in status["attempts"]] == [0, 1], status["attempts"]  # resumed from that checkpoint
    assert status["attempts"][0]["job_id"] == status["attempts"][1]["job_id"] == job_id
    local = tmp_path / "local"
    monkeypatch.delenv(hooks.ENV)
    assert main(TOY + ["--seeds", "0", "--set", "train.epochs=1", "--out", str(local)]) == 0
    assert result(out, key).accuracy_matrix == result(local, key).accuracy_matrix


@pytest.mark.slurm
@pytest.mark.timeout(600)
def test_an_sbatch_element_signalled_during_its_checkpoint_write_requeues_itself_and_finishes(
        cluster, tmp_path, monkeypatch, one_thread):
    """The plain-sbatch array's pre-time-out signal (USR2 to the batch shell, which is python)
    while the element writes its first checkpoint: the write completes, the element requeues
    itself, and the requeued element resumes from that checkpoint."""
    out, latch, emit = tmp_path / "cluster", tmp_path / "latch", tmp_path / "array"
    monkeypatch.setenv(hooks.ENV, hooks.spec("checkpoint", "SIGUSR2", "wait", latch, out))
    sweep = TOY + ["--seeds", "0", "--set", "train.epochs=1", "--plugins", hooks.HOOKS_FILE, "--out", str(out)]
    key = resolve_config("toy", 3, "full_ft", 0, overrides={"train": {"epochs": 1}}).key
    assert main(sweep + ["--launcher", "sbatch", "--emit", str(emit), "--profile", "local"]) == 0
    submitted = subprocess.run(["sbatch", "--parsable", str(emit / "array.sbatch")], check=True, capture_output=True,
                               text=True, timeout=60)
    job_id = f"{submitted.stdout.strip().split(';')[0]}_0"
    wait_until(latch.exists, 300, "the element to be inside its first checkpoint write")
    subprocess.run(["scancel", "--batch", "--signal=USR2", job_id], check=True, timeout=60)
    wait_until(lambda: record.result_path(out, key).exists(), 300, "the requeued element to finish")
    status = wait_until(lambda: (lambda s: s if s.get("state") == "done" else None)(read_status(out, key) or {}),
                        60, "the element's final status")
    assert [a["from_task"] for a in status["attempts"]] == [0, 1], status["attempts"]
    assert status["attempts"][0]["job_id"] == status["attempts"][1]["job_id"] == job_id
    local = tmp_path / "local"
    monkeypatch.delenv(hooks.ENV)
    assert main(TOY + ["--seeds", "0", "--set", "train.epochs=1", "--out", str(local)]) == 0
    assert result(out, key).accuracy_matrix == result(local, key).accuracy_matrix
