"""A run's CPU memory figure: the peak of live tensor bytes, traced over one batch (the second) of
each pass over a task's data (``clbench.measure.SteadyStepPeak``, ``protocol.TaskMemory``),
checked against tensors of known size allocated where it measures, and where it does not."""
from __future__ import annotations

import torch
from helpers import toy_run
from torch.utils.data import DataLoader, TensorDataset

from clbench.measure import LiveTensorBytes, SteadyStepPeak, storage_bytes
from clbench.methods.full_ft import FullFineTuning
from clbench.protocol import TaskMemory
from clbench.task import Task

FLOAT = 4  # bytes


def loaders(peak: SteadyStepPeak, n: int = 8, batch_size: int = 2):
    """Loaders over ``n`` one-float samples, made through ``peak`` (the traced ones) and plainly."""
    data = TensorDataset(torch.arange(float(n)).unsqueeze(1))

    def make(batch_size: int = batch_size) -> DataLoader:
        return DataLoader(data, batch_size=batch_size)

    return peak.loaders(make), make


def test_the_figure_covers_what_the_second_batch_allocates_and_the_state():
    state = [torch.zeros(250)]  # 1,000 bytes alive throughout: a method's parameters
    peak = SteadyStepPeak(lambda: state)
    traced, plain = loaders(peak)
    loader = traced()
    assert len(loader) == 4 and loader.batch_size == 2  # the loader's own length and attributes
    kept = []
    for i, (x,) in enumerate(loader):
        work = torch.ones(10_000 * (i + 1))  # batch i: 40,000 * (i + 1) bytes, freed before the next
        kept.append(x)
        del work
    assert peak.traced_batches == 1
    # batch 1's 80,000 bytes with the state and its input; batch 2's 120,000 is not traced
    assert 80_000 + 1_000 + 2 * FLOAT <= peak.peak < 120_000, peak.peak
    assert [x.tolist() for x in kept] == [x.tolist() for (x,) in plain()]  # the same batches, in order


def test_the_optimizer_state_made_in_the_first_step_counts_in_the_second():
    model = torch.nn.Linear(1000, 100)  # 400,400 bytes of parameters
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)  # a buffer as large, in place
    data = TensorDataset(torch.rand(6, 1000), torch.zeros(6, dtype=torch.long))
    peak = SteadyStepPeak(lambda: list(model.parameters()))
    for x, y in peak.loaders(lambda: DataLoader(data, batch_size=2))():
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    # parameters, their gradients and the momentum buffer made in the first step, updated in place in
    # the traced one (only read or written there: counted because the optimizer stepped before)
    assert peak.peak >= 3 * 400_400, peak.peak


def test_a_single_batch_loader_traces_that_batch():
    peak = SteadyStepPeak(lambda: [])
    traced, _ = loaders(peak, n=2, batch_size=2)
    for _ in traced():
        _ = torch.ones(10_000)
    assert peak.traced_batches == 1 and peak.peak >= 40_000 and not peak.active


def test_a_dataset_held_as_one_tensor_is_not_counted_its_batches_are():
    images = torch.rand(1000, 1000)  # 4 MB in memory, read a sample at a time
    peak = SteadyStepPeak(lambda: [])
    loader = peak.loaders(lambda: DataLoader(TensorDataset(images), batch_size=10))()
    for (x,) in loader:
        _ = x * 2  # the step's own tensors count
    assert 2 * 10 * 1000 * FLOAT <= peak.peak < 1_000_000, peak.peak  # a batch and its product, not the 4 MB


def test_only_the_first_pass_of_a_loader_is_traced():
    peak = SteadyStepPeak(lambda: [])
    traced, _ = loaders(peak)
    loader = traced()
    for _ in loader:
        pass
    first = peak.peak
    for _ in loader:  # a second epoch: the same steps again, not traced
        _ = torch.ones(1_000_000)
    assert peak.peak == first and peak.traced_batches == 1
    for _ in traced():  # a new loader (the next stage, a method's own pass) is traced again
        _ = torch.ones(1_000_000)
    assert peak.peak >= 4_000_000 and peak.traced_batches == 2


def test_a_consumer_that_stops_early_ends_the_trace():
    peak = SteadyStepPeak(lambda: [])
    traced, _ = loaders(peak)
    for i, _ in enumerate(traced()):
        if i == 1:
            break  # inside the traced batch: leaving the loop closes the generator
    assert not peak.active and peak.traced_batches == 1
    _ = torch.ones(1_000_000)  # after the trace: not counted
    assert peak.peak < 1_000_000


def test_storage_bytes_counts_shared_storage_once():
    a = torch.zeros(100)
    assert storage_bytes([a, a[:10], a.view(10, 10), torch.zeros(5, dtype=torch.float64)]) == 400 + 40


def test_live_tensor_bytes_lets_go_of_storages_that_outlive_it():
    kept = torch.zeros(250)
    with LiveTensorBytes([kept]) as tracker:
        pass
    del kept  # freed after the mode: its figures stay as they were at the exit
    assert tracker.live == tracker.peak == 1000


def test_task_memory_on_cpu_records_live_tensor_bytes_at_least_the_method_state():
    model = torch.nn.Linear(100, 10)  # 4,040 bytes of parameters
    data = TensorDataset(torch.rand(6, 100), torch.zeros(6, dtype=torch.long))
    task = Task(index=0, num_tasks=2, classes=range(0, 10), train=None, device=torch.device("cpu"),
                make_loader=lambda **kw: DataLoader(data, batch_size=3))
    memory = TaskMemory(torch.device("cpu"))
    memory.start_task(task, model)
    fields = memory.task_fields()
    assert fields["cpu_peak_live_tensor_mb"] * 2**20 == 4040  # no pass over the data: the state alone
    task = Task(index=1, num_tasks=2, classes=range(0, 10), train=None, device=torch.device("cpu"),
                make_loader=lambda **kw: DataLoader(data, batch_size=3))
    memory.start_task(task, model)
    for x, y in task.loader():
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
    fields = memory.task_fields()
    assert fields["cpu_peak_live_tensor_mb"] * 2**20 >= 2 * 4040  # parameters and their gradients
    assert fields["memory_measured"].startswith("cpu_peak_live_tensor_mb: peak of live CPU tensor bytes")


def test_a_run_records_the_tensors_its_training_steps_hold(results_root, monkeypatch):
    """Two toy runs in one process; the second's training step holds 400 MiB for a moment. Its
    figure shows them; the first's is its own model, gradients, optimizer state and activations."""
    calm = toy_run(results_root / "a")
    original = FullFineTuning.training_step

    def hungry(self, x, y, task, stage):
        ballast = torch.ones(100 * 2**20)  # 400 MiB
        return original(self, x, y, task, stage) + 0 * ballast[0]

    monkeypatch.setattr(FullFineTuning, "training_step", hungry)
    big = toy_run(results_root / "b")
    for r in (calm, big):
        assert all(t.cpu_peak_live_tensor_mb is not None and t.cpu_peak_live_tensor_mb > 0 for t in r.tasks)
    calm_peak = max(t.cpu_peak_live_tensor_mb for t in calm.tasks)
    big_peak = max(t.cpu_peak_live_tensor_mb for t in big.tasks)
    assert 400 <= big_peak < 400 + 2 * calm_peak + 1, (big_peak, calm_peak)  # MiB
    assert calm_peak < 100
