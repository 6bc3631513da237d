"""Preemption safety on CPU: a run that dies and is restarted ends with exactly the numbers of
an uninterrupted run: the same accuracy matrix, the same learned weights, the same logits on
every test image. A crash is simulated in-process: the run raises, and a fresh ``Run`` (as a
requeued job would) resumes from the checkpoint on disk."""
from __future__ import annotations

import pytest
import torch
from helpers import TOY_METHOD_ARGS
from torch.utils.data import ConcatDataset, DataLoader

from clbench import files, record
from clbench.benchmarks import BENCHMARKS
from clbench.errors import ConfigError
from clbench.methods import METHODS
from clbench.protocol import Run
from clbench.recipes import resolve_config
from clbench.record import RunResult


class Crash(Exception):
    """Stands in for the job being killed."""


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def config_for(bench: str, method: str, num_tasks: int, method_args: dict | None = None, **train):
    overrides = {"train": train} if train else {}
    if method_args:
        overrides["method"] = method_args
    return resolve_config(bench, num_tasks, method, seed=0, overrides=overrides or None, device="cpu")


def logits_on_test_set(run: Run) -> torch.Tensor:
    """The finished method's logits on every test image of the scenario, in a fixed order."""
    test = ConcatDataset([run.scenario.test_subset(i) for i in range(run.scenario.num_tasks)])
    run.method.eval()
    with torch.no_grad():
        return torch.cat([run.method.predict(run.inputs(x)) for x, _ in DataLoader(test, batch_size=64)])


def finish(config, out) -> tuple[Run, RunResult, int]:
    """Run to the end; also return the number of finished tasks it started from."""
    reports: list[int] = []
    run = Run(config, out, progress=False, on_progress=lambda done, num_tasks, elapsed_s: reports.append(done))
    result = run.execute()
    return run, result, reports[0]


def assert_same_run(a: tuple[Run, RunResult], b: tuple[Run, RunResult]) -> None:
    (run_a, res_a), (run_b, res_b) = a, b
    assert res_a.accuracy_matrix == res_b.accuracy_matrix
    assert res_a.metrics == res_b.metrics
    assert [t.accuracy for t in res_a.tasks] == [t.accuracy for t in res_b.tasks]
    state_a, state_b = run_a.method.state_dict(), run_b.method.state_dict()
    assert state_a.keys() == state_b.keys()
    for name in state_a:
        if isinstance(state_a[name], torch.Tensor):
            assert torch.equal(state_a[name], state_b[name]), name
    assert torch.equal(logits_on_test_set(run_a), logits_on_test_set(run_b))


def interrupted_then_resumed(config, out, monkeypatch, crash_after_task: int | None = None,
                             crash_in_task: int | None = None):
    """Crash right after the checkpoint of task ``crash_after_task`` (1-based count of finished
    tasks), or halfway through training task ``crash_in_task`` (0-based); then resume."""
    real_save = files.atomic_torch_save
    real_train = Run.learn

    def save_then_crash(path, obj):
        real_save(path, obj)
        if obj["completed_tasks"] == crash_after_task:
            raise Crash

    def train_then_crash(self, task):
        if task.index == crash_in_task:
            real_train(self, task)  # the work of this task is lost with the process
            raise Crash
        return real_train(self, task)

    with monkeypatch.context() as m:
        m.setattr(record, "atomic_torch_save", save_then_crash)
        m.setattr(Run, "learn", train_then_crash)
        with pytest.raises(Crash):
            Run(config, out, progress=False).execute()
    assert record.checkpoint_path(out, config.key).exists()
    torch.manual_seed(12345)  # a restarted process starts from another global RNG state
    return finish(config, out)


@pytest.mark.parametrize("crash, resumes_after", [({"crash_after_task": 1}, 1), ({"crash_in_task": 2}, 2)],
                         ids=["right-after-checkpoint-1", "while-training-task-3"])
def test_resumed_run_equals_uninterrupted_run(results_root, tmp_path, monkeypatch, crash, resumes_after):
    config = config_for("toy", "full_ft", 3)
    uninterrupted = finish(config, tmp_path / "straight")
    run, result, started_from = interrupted_then_resumed(config, tmp_path / "resumed", monkeypatch, **crash)
    assert started_from == resumes_after  # it resumed from the checkpoint, not from scratch
    assert_same_run(uninterrupted[:2], (run, result))
    assert not record.checkpoint_path(tmp_path / "resumed", run.key).exists()


def test_checkpoint_of_another_configuration_is_refused(tmp_path, monkeypatch):
    out = tmp_path / "r"
    config = config_for("toy", "full_ft", 3)
    with monkeypatch.context() as m:
        real_save = files.atomic_torch_save

        def save_then_crash(path, obj):
            real_save(path, obj)
            raise Crash

        m.setattr(record, "atomic_torch_save", save_then_crash)
        with pytest.raises(Crash):
            Run(config, out, progress=False).execute()
    config.train.lr *= 2  # same run key, different numbers: resuming would mix two recipes
    with pytest.raises(ConfigError, match="different configuration"):
        Run(config, out, progress=False).execute()


# Every other registered method on the toy benchmark, one epoch per task: their state_dict /
# grow / load_state_dict round trip is what a requeued job depends on.
OTHER_METHODS = sorted(set(METHODS) - {"full_ft"})


@pytest.mark.slow
@pytest.mark.parametrize("method", OTHER_METHODS)
def test_every_method_resumes_exactly(results_root, tmp_path, monkeypatch, method):
    config = config_for("toy", method, 3, TOY_METHOD_ARGS.get(method), epochs=1)
    uninterrupted = finish(config, tmp_path / "straight")
    run, result, started_from = interrupted_then_resumed(config, tmp_path / "resumed", monkeypatch,
                                                         crash_after_task=1)
    assert started_from == 1
    assert_same_run(uninterrupted[:2], (run, result))


@pytest.mark.slow
@pytest.mark.skipif("synth" not in BENCHMARKS, reason="the synth benchmark is not registered")
def test_resumed_synth_run_equals_uninterrupted_run(results_root, tmp_path, monkeypatch):
    config = config_for("synth", "full_ft", 5, epochs=1)
    uninterrupted = finish(config, tmp_path / "straight")
    run, result, started_from = interrupted_then_resumed(config, tmp_path / "resumed", monkeypatch,
                                                         crash_after_task=2)
    assert started_from == 2
    assert_same_run(uninterrupted[:2], (run, result))
