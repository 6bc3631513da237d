"""``run_suite.py speed`` and the GPU training path of the protocol (autocast, no host sync,
optimizer state on the device, optional torch.compile)."""
from __future__ import annotations

import contextlib
import copy
import json
import math
import re
import statistics

import pytest
import torch
from helpers import SPEED_SYNTH as SYNTH
from helpers import built_for_speed as _built
from helpers import data_rows

from clbench import gpu_path, measure, speed
from clbench.cli import main
from clbench.methods import METHODS, ordered_methods
from clbench.methods.full_ft import FullFineTuning
from clbench.protocol import autocast_for, compile_blocks, optimization_step


def test_speed_command_prints_every_column_on_the_synth_backbone(results_root, tmp_path, capsys):
    report = tmp_path / "speed.json"
    assert main(SYNTH + ["--methods", "full_ft", "--tasks", "4", "--batch-size", "16", "--eval-batch-size", "32",
                         "--json", str(report)]) == 0
    out = capsys.readouterr().out
    header, *rows = data_rows(out)
    assert header == speed.COLUMNS
    assert [r[:2] for r in rows] == [["plain backbone", "—"], ["full_ft", "1"], ["", "4"]]
    official = speed.COLUMNS.index("official GFLOP/img")
    for row in rows[1:]:
        measured = row[2:official] + row[official + 1:13]
        assert all(cell not in ("", "—") for cell in measured), row  # every measured column is filled
        assert row[official] == "—"  # full_ft has no LoRA branches to count
    assert re.fullmatch(r"\d+\.\d (min|h)", rows[-1][13])  # projected full run, from synth's real split sizes
    assert "attention layers use F.scaled_dot_product_attention" in out and "precision: fp32 (train.precision=auto)" in out

    measured = json.loads(report.read_text())
    first, last = measured["methods"][0]["tasks"]
    assert (first["task"], last["task"]) == (1, 4)
    assert first["train_vs_baseline"] == last["train_vs_baseline"] == 1.0  # full_ft against itself
    assert first["train_vs_first"] == 1.0 and math.isfinite(last["train_vs_first"]) and last["train_vs_first"] > 0
    # FLOPs: the backbone plus the 96-wide head over the classes seen (50, then 200); training ~3x a forward
    backbone_flops = measured["backbone"]["infer_flops"]
    assert first["infer_flops"] == backbone_flops + 2 * 96 * 50 and last["infer_flops"] == backbone_flops + 2 * 96 * 200
    assert 2.5 < first["train_flops"] / first["infer_flops"] < 3.5
    assert first["train_peak_mib"] > first["infer_peak_mib"] > 0
    paired = measured["methods"][0]["backbone_s_per_image"]
    assert len(paired) == 2 * 3  # beside the method at task 1 and task 3, 3 steps each
    assert measured["backbone"]["infer_images_per_s"] == pytest.approx(1 / statistics.median(paired))
    assert (measured["bench"], measured["num_tasks"], measured["device"]) == ("synth", 4, "cpu")

    # the figures as `clbench preflight --speed` reads them: a forecast for the same runs
    assert main(["preflight", "--bench", "synth", "--tasks", "4", "--methods", "full_ft", "--seeds", "0",
                 "--profile", "local", "--speed", str(report), "--out", str(tmp_path / "r")]) == 0
    forecast = capsys.readouterr().out
    assert "synth/N4/full_ft/seed0: " in forecast and " h of 0.50 h" in forecast and "1 of 1 run(s)" in forecast


@pytest.mark.slow
def test_speed_command_measures_every_registered_method(results_root, capsys):
    assert main(SYNTH + ["--methods", "all", "--tasks", "2", "--batch-size", "8", "--eval-batch-size", "8"]) == 0
    rows = data_rows(capsys.readouterr().out)[1:]
    named = [r[0] for r in rows if r[0]]
    assert named == ["plain backbone"] + ordered_methods(list(METHODS))
    assert not any("failed" in cell for r in rows for cell in r)


def test_speed_command_errors_are_messages(capsys):
    assert main(SYNTH + ["--methods", "nope"]) == 2
    assert "unknown method 'nope'" in capsys.readouterr().err
    assert main(SYNTH + ["--methods", "full_ft", "--tasks", "201"]) == 2
    assert "synth has 200 classes" in capsys.readouterr().err
    assert main(SYNTH + ["--methods", "full_ft", "--set", "train.nope=1"]) == 2
    assert "Valid keys in 'train'" in capsys.readouterr().err


# ------------------------------------------------------------------------------ measuring


def test_interleaved_timing_pairs_turns_and_ratios_follow_the_cost(monkeypatch):
    clock, calls = [0.0], []
    monkeypatch.setattr(measure.time, "perf_counter", lambda: clock[0])  # a clock the calls advance

    def work(seconds, name):
        def run():
            calls.append(name)
            clock[0] += seconds
        return run

    timing = measure.Timing(torch.device("cpu"), warmup=1, steps=5)
    fast, slow = timing.times(work(0.002, "fast"), work(0.006, "slow"))
    assert calls == ["fast", "slow"] * 6  # one warm-up turn, then five, always in turns
    assert fast == pytest.approx([0.002] * 5) and slow == pytest.approx([0.006] * 5)
    assert measure.median_ratio(fast, slow) == pytest.approx(3)  # fast runs 3x the images/s


def test_effective_rate_weights_stages_by_their_epochs():
    # 20 epochs at 0.1 s per batch of 10 and 10 epochs at 0.4 s: 30 epochs of images in 20*0.01 + 10*0.04 s/image
    assert speed.effective_rate(10, [20, 10], [0.1, 0.4]) == pytest.approx(30 / (20 * 0.01 + 10 * 0.04))
    assert speed.effective_rate(64, [5], [0.5]) == pytest.approx(128)


def test_projected_run_adds_training_and_evaluation_over_the_tasks():
    def at(task, train, infer, epochs):
        return speed.TaskSpeed(task=task, train_images_per_s=train, infer_images_per_s=infer, infer_flops=1,
                               train_flops=1, train_peak_mib=1, infer_peak_mib=1, infer_vs_backbone=1,
                               train_vs_first=1, stage_epochs=epochs)

    r = speed.MethodSpeed("m", [at(1, 100.0, 1000.0, [2]), at(3, 50.0, 500.0, [1])])
    # 3 tasks of 300 training and 30 test images; rates 100, 75, 50 (train) and 1000, 750, 500 (infer)
    expected = (2 * 300 / 100 + 300 / 75 + 300 / 50) + (30 / 1000 + 60 / 750 + 90 / 500)
    assert speed.projected_run_s(r, 3, 900, 90) == pytest.approx(expected)


def test_live_tensor_bytes_peaks_at_the_most_alive_at_once():
    kept = torch.zeros(250)  # 1000 bytes, listed: alive before and after
    unlisted = torch.zeros(50)  # 200 bytes nobody listed (a merged inference copy's weight)
    with measure.LiveTensorBytes([kept]) as tracker:
        a = torch.ones(1000)  # +4000
        b = a * 2  # +4000 -> 9000 alive
        del a
        c = torch.ones(500)  # 7000 alive
        d = unlisted + 1  # reading it counts it: +200 +200 -> 7400
        view = b[:10]  # a view allocates nothing
        del b, c, d, view
    assert tracker.peak == 9000
    assert tracker.live == 1200  # what is still alive: the two tensors from before


# ------------------------------------------------------------------------------ the GPU path


def test_bf16_autocast_is_used_only_on_cuda(results_root, monkeypatch):
    assert autocast_for(torch.device("cpu")) is contextlib.nullcontext
    with pytest.warns(UserWarning) if not torch.cuda.is_available() else contextlib.nullcontext():
        ctx = autocast_for(torch.device("cuda"))()
    assert isinstance(ctx, torch.autocast) and ctx.device == "cuda" and ctx.fast_dtype == torch.bfloat16

    seen = []
    original = FullFineTuning.training_step

    def probe(self, x, y, task, stage):
        seen.append((torch.is_autocast_enabled("cpu"), torch.is_autocast_enabled("cuda"), x.dtype))
        return original(self, x, y, task, stage)

    monkeypatch.setattr(FullFineTuning, "training_step", probe)
    assert main(["--bench", "toy", "--methods", "full_ft", "--seeds", "0", "--no-progress", "--device", "cpu"]) == 0
    assert seen and set(seen) == {(False, False, torch.float32)}  # a CPU run stays in fp32


def test_optimization_step_leaves_the_loss_on_the_device_and_the_state_with_the_parameters():
    method, task, x, y = _built("full_ft", "cpu")
    trainer = speed.Trainer(method, task, x, y)
    stage, _, optimizer, _ = trainer.stages[0]
    params = [p for g in optimizer.param_groups for p in g["params"]]
    before = [p.detach().clone() for p in params]
    loss = optimization_step(method, x, y, task, stage, optimizer, params, task.autocast)
    assert loss.requires_grad is False and loss.dim() == 0 and torch.isfinite(loss)
    assert any(not torch.equal(a, p) for a, p in zip(before, params))  # it stepped
    assert not any("optimizer state on" in c for c in gpu_path.gpu_path_checks(trainer, torch.device("cpu")))


def test_syncing_ops_sees_what_would_make_the_host_wait():
    x = torch.randn(6)
    with gpu_path.SyncingOps() as ops:
        _ = x[x > 0]  # boolean-mask indexing: the output size lives on the device
        _ = float(x.sum())  # .item()
        x[x > 0] = 0  # a Python number: masked_fill_, whichever operator torch routes it through
        x[x > 0] = torch.tensor(1.0)  # a literal is built on the host: index_put_ takes masked_fill_
        _ = torch.where(x > 0, x, -x)  # three-argument where: no wait
    assert ops.found == {"aten::index (boolean-mask indexing)": 1,
                         "aten::_local_scalar_dense (.item(), float(), int() or bool() of a tensor)": 1}


def test_mask_assignment_waits_unless_torch_takes_masked_fill():
    """The verdict on ``x[mask] = v`` is the installed torch's own: masked_fill_ for a host scalar,
    the mask turned into indices (nonzero, a wait) for a tensor of values or a device scalar."""
    x, mask = torch.randn(6), torch.tensor([True, False] * 3)
    index_put = torch.ops.aten.index_put_.default
    assert "aten::masked_fill_" in gpu_path.operators_called(index_put, (x, [mask], torch.tensor(0.0)), {})
    assert "aten::nonzero" in gpu_path.operators_called(index_put, (x, [mask], torch.zeros(3)), {})
    on_device = torch.tensor(2.0)  # made before the check: a model's tensor, on the GPU in a CUDA run
    host = torch.tensor(3.0)
    with gpu_path.SyncingOps([host]) as ops:
        x[mask] = torch.zeros(3)
        x[mask] = on_device
        x[mask] = host  # declared a host tensor (like Adam's step counts)
    assert ops.found == {"aten::index_put_ (boolean-mask assignment with a value that is not a host scalar)": 2}


@pytest.mark.parametrize("method_name", ["full_ft", "sdlora", "inflora"])
def test_training_step_has_no_operation_that_waits_for_the_device(method_name):
    """The protocol's step with full_ft, SD-LoRA and InfLoRA (LoRAQKV's backward), checked on CPU."""
    if method_name not in METHODS:
        pytest.skip(f"{method_name} is not registered")
    method, task, x, y = _built(method_name, "cpu")
    trainer = speed.Trainer(method, task, x, y)
    checks = gpu_path.gpu_path_checks(trainer, torch.device("cpu"))
    assert checks == ["training step: no operation that would wait for a CUDA device (checked on CPU)"], checks


@pytest.mark.gpu
@pytest.mark.parametrize("method_name", sorted(METHODS))
def test_training_step_never_waits_for_the_gpu(method_name):
    method, task, x, y = _built(method_name, "cuda")
    trainer = speed.Trainer(method, task, x, y)
    for _, _, _, step in trainer.stages:
        step()  # first steps may allocate optimizer state
    checks = gpu_path.gpu_path_checks(trainer, torch.device("cuda"))
    assert "training step: no host sync" in checks, checks
    assert not any("optimizer state on" in c for c in checks), checks


@pytest.mark.gpu
def test_cuda_training_step_runs_under_bf16_autocast(monkeypatch):
    seen = []
    original = FullFineTuning.training_step

    def probe(self, x, y, task, stage):
        seen.append((torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")))
        return original(self, x, y, task, stage)

    monkeypatch.setattr(FullFineTuning, "training_step", probe)
    method, task, x, y = _built("full_ft", "cuda")
    trainer = speed.Trainer(method, task, x, y)
    trainer.stages[0][3]()
    assert seen == [(True, torch.bfloat16)]


def _recording_backend(graphs: list):
    """A torch.compile backend (the public callable form) that runs each graph eagerly, as the
    ``eager`` backend does, and keeps the graphs dynamo hands it."""
    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward
    return backend


def test_compile_blocks_keeps_state_dict_keys_copies_and_outputs():
    method, task, x, y = _built("full_ft", "cpu")
    method.eval()
    keys = list(method.state_dict())
    with torch.no_grad():
        eager = method.predict(x)
    torch.compiler.reset()
    graphs = []
    compile_blocks(method.backbone, num_tasks=20, backend=_recording_backend(graphs))  # the wiring, not inductor
    compile_blocks(method.backbone, num_tasks=20, backend=_recording_backend(graphs))  # idempotent
    with torch.no_grad():
        compiled = method.predict(x)
    assert graphs  # dynamo did trace the blocks
    assert torch.allclose(eager, compiled, atol=1e-5)
    assert list(method.state_dict()) == keys  # checkpoints are unchanged
    twin = copy.deepcopy(method)  # e.g. SD-LoRA's merged inference copy
    with torch.no_grad():
        for p in twin.backbone.blocks[0].parameters():
            p.zero_()
        assert not torch.allclose(twin.predict(x), compiled)  # the copy runs its own weights
        assert torch.allclose(method.predict(x), compiled, atol=1e-5)
    torch.compiler.reset()


def test_compile_blocks_lets_a_block_recompile_more_often_than_dynamos_default():
    """A method whose blocks change per task recompiles them once per task and mode: with 20
    tasks, a block still compiles its twelfth variant (torch's default gives up after eight and
    runs the rest eagerly)."""
    method, *_ = _built("full_ft", "cpu")
    block = method.backbone.blocks[0]
    tokens = torch.rand(2, 5, block.norm1.normalized_shape[0])
    torch.compiler.reset()
    graphs = []
    compile_blocks(method.backbone, num_tasks=20, backend=_recording_backend(graphs))
    try:
        for dtype in (torch.float32, torch.float64, torch.bfloat16):
            block.to(dtype)
            for training in (True, False):
                block.train(training)
                for grad in (True, False):
                    before = len(graphs)
                    with torch.set_grad_enabled(grad):
                        block(tokens.to(dtype))
                    assert len(graphs) > before, (dtype, training, grad)  # a new variant was compiled
    finally:
        torch.compiler.reset()


@pytest.mark.gpu
@pytest.mark.slow
def test_a_compiled_cuda_run_finishes(results_root):
    assert main(["--bench", "toy", "--methods", "full_ft", "--seeds", "0", "--no-progress", "--device", "cuda",
                 "--set", "train.compile=true"]) == 0
