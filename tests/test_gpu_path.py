"""The CUDA code paths, run on the CPU: precision (train.precision), torch.compile, the image
cache's device augmentation, the fused-attention and host-sync checks (``clbench.gpu_path``), per-run peak
memory, and ``clbench gpu-check --smoke``. What truly needs a GPU is marked ``gpu`` (README)."""
from __future__ import annotations

import contextlib
import json
import sys

import pytest
import timm
import torch
from helpers import built_for_speed as built
from helpers import toy_run

from clbench import gpu_path
from clbench.benchmarks.image_cache import DeviceAugment, SourceImage
from clbench.cli import main
from clbench.errors import ConfigError
from clbench.methods import get_method
from clbench.methods.base import Stage
from clbench.methods.full_ft import FullFineTuning
from clbench.protocol import autocast_for, grad_scaler_for, optimization_step, resolve_precision
from clbench.recipes import resolve_config

# ------------------------------------------------------------------------------ precision


def test_precision_resolves_per_device_and_rejects_unknown_values():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert [resolve_precision(p, cpu) for p in ("auto", "bf16", "fp16", "fp32")] == ["fp32", "bf16", "fp16", "fp32"]
    assert resolve_precision("auto", cuda) == "bf16"
    assert autocast_for(cpu) is contextlib.nullcontext and autocast_for(cuda, "fp32") is contextlib.nullcontext
    ctx = autocast_for(cpu, "bf16")()
    assert isinstance(ctx, torch.autocast) and ctx.device == "cpu" and ctx.fast_dtype == torch.bfloat16
    assert grad_scaler_for(cpu, "bf16") is None and isinstance(grad_scaler_for(cpu, "fp16"), torch.amp.GradScaler)
    with pytest.raises(ConfigError, match="train.precision 'fp8' is unknown; use one of auto, bf16, fp16, fp32"):
        resolve_config("toy", 2, "full_ft", 0, None, {"train": {"precision": "fp8"}}, "cpu")


@pytest.mark.parametrize("method", ["full_ft", "sdlora"])
def test_a_bf16_run_on_cpu_trains_under_cpu_autocast(method, results_root, monkeypatch):
    """The CPU twin of CUDA's default: the same autocast, on the CPU (SD-LoRA's update stays fp32)."""
    seen = []
    cls = get_method(method)
    original = cls.training_step

    def probe(self, x, y, task, stage):
        loss = original(self, x, y, task, stage)
        seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"), loss.dtype))
        return loss

    monkeypatch.setattr(cls, "training_step", probe)
    result = toy_run(results_root, method, precision="bf16")
    assert seen and all(s[:2] == (True, torch.bfloat16) for s in seen)
    assert result.config["train"]["precision"] == "bf16" and 0 <= result.metrics["acc"] <= 100


def test_fp16_steps_through_the_grad_scaler():
    method, task, x, y = _built("full_ft")
    scaler = grad_scaler_for(torch.device("cpu"), "fp16")
    optimizer = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.1)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    before = [p.detach().clone() for p in params]
    scales = []
    for _ in range(20):  # an overflowing step is skipped and halves the scale, as on a GPU
        loss = optimization_step(method, x, y, task, Stage(), optimizer, params, autocast_for(task.device, "fp16"),
                                 scaler)
        assert torch.isfinite(loss)
        scales.append(scaler.get_scale())
    assert scales[0] <= 2.0**16 and len(set(scales)) >= 1
    assert any(not torch.equal(a, p) for a, p in zip(before, params))  # steps were taken


def _built(name: str):
    return built(name, "cpu")


# ------------------------------------------------------------------------------ device paths on the CPU


def test_device_augmentation_draws_crops_without_waiting_for_the_device():
    """The CPU twin of the CUDA sync check: no operation whose CUDA kernel makes the host wait."""
    pixels = torch.randint(0, 256, (8, 3, 40, 40), dtype=torch.uint8)
    batch = SourceImage(pixels, torch.tensor([[30, 50], [50, 30], [40, 40], [20, 90]] * 2))
    augment, generator = DeviceAugment(32), torch.Generator().manual_seed(0)
    with gpu_path.SyncingOps() as ops:
        out = augment(batch, train=True, generator=generator)
        augment(batch, train=False)
    assert ops.found == {}
    assert out.shape == (8, 3, 32, 32) and out.dtype == torch.float32 and 0 <= out.min() and out.max() <= 1
    with gpu_path.SyncingOps() as ops:
        _ = batch.pixels[batch.pixels > 128]  # the check does see a wait
    assert ops.found


def test_fused_attention_kernel_check_runs_on_cpu(monkeypatch):
    model = timm.create_model("vit_toy_patch4_16", num_classes=0).eval()
    x = torch.rand(2, 3, 16, 16)
    assert gpu_path.fused_attention_kernel(model, x, contextlib.nullcontext) == \
        "fused attention kernel: flash or memory-efficient attention runs"
    assert "runs" in gpu_path.fused_attention_kernel(model, x, autocast_for(torch.device("cpu"), "bf16"))

    def unfused(*args, **kwargs):
        raise RuntimeError("No available kernel. Aborting execution.")

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", unfused)
    assert "none accepts these inputs, the math kernel runs (No available kernel" in \
        gpu_path.fused_attention_kernel(model, x, contextlib.nullcontext)
    for block in model.blocks:
        block.attn.fused_attn = False
    assert "not used" in gpu_path.fused_attention_kernel(model, x, contextlib.nullcontext)


# ------------------------------------------------------------------------------ peak memory per run


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-task RSS peaks read /proc")
def test_peak_memory_is_per_run_not_the_process_high_water_mark(results_root, monkeypatch):
    """Three runs in one process; the second holds 400 MiB for a moment. The third's figure is its
    own again (a process-wide high-water mark would still show the second's)."""
    calm = toy_run(results_root / "a")
    original = FullFineTuning.training_step

    def hungry(self, x, y, task, stage):
        ballast = torch.ones(100 * 2**20)  # 400 MB, touched
        loss = original(self, x, y, task, stage) + 0 * ballast[0]
        return loss

    monkeypatch.setattr(FullFineTuning, "training_step", hungry)
    big = toy_run(results_root / "b")
    monkeypatch.setattr(FullFineTuning, "training_step", original)
    again = toy_run(results_root / "c", seed=1)
    label = "RSS high-water mark per task (VmHWM, reset per task) above the run's start"
    for r in (calm, big, again):
        assert all(t.memory_measured.endswith("cpu_peak_rss_mb: " + label) and t.cpu_peak_rss_mb is not None
                   for t in r.tasks)
    peak = {name: max(t.cpu_peak_rss_mb for t in r.tasks) for name, r in (("a", calm), ("b", big), ("c", again))}
    assert peak["b"] >= 390 and 0 <= peak["a"] < 200 and 0 <= peak["c"] < 200, peak  # MiB
    # the kernel's mark behind getrusage (what used to be reported) is reset with it: nothing carries over
    assert again.tasks[-1].cpu_max_rss_mb < big.tasks[0].cpu_max_rss_mb - 300
    stored = json.loads(next((results_root / "c").rglob("seed1.json")).read_text())
    assert stored["tasks"][0]["memory_measured"].endswith("cpu_peak_rss_mb: " + label)


# ------------------------------------------------------------------------------ the GPU check, tiny


@pytest.mark.slow
def test_gpu_check_smoke_runs_every_step_on_cpu(tmp_path, capsys):
    """``clbench gpu-check --smoke``: the speed rows (bf16 and fp32; compiled rows are the same
    code with train.compile, tested below), the generated ImageNet-R layout and the run through
    the image cache."""
    report = tmp_path / "check.json"
    assert main(["gpu-check", "--smoke", "--no-compile", "--device", "cpu", "--methods", "sdlora", "--workers", "0",
                 "--work", str(tmp_path / "work"), "--json", str(report)]) == 0
    out = capsys.readouterr().out
    rows = json.loads(report.read_text())["rows"]
    assert [(r["what"], r["precision"], r["compile"]) for r in rows] == [
        ("sdlora", "fp32", False), ("sdlora: run, image cache, 1 epoch/task", "fp32", False),
        ("sdlora", "bf16", False)]
    for r in rows:
        assert r["train_first"] > 0 and r["train_last"] > 0 and r["peak_mib"] > 0 and r["projected_s"] > 0, r
    assert all(r["train_tflops"] > 0 and "the official form's" in r["note"] for r in rows if "run" not in r["what"])
    assert (tmp_path / "work" / "data" / "imagenet-r" / "train" / "n00000199").is_dir()
    assert any((tmp_path / "work" / "data" / "imagenet-r" / ".clbench_cache").glob("source-400-*.npy"))
    assert "| measurement" in out and "train TFLOP/s" in out


def test_gpu_check_without_a_gpu_says_how_to_run_it(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert main(["gpu-check", "--device", "cpu"]) == 2
    assert "run `clbench gpu-check --smoke` to check the code path here" in capsys.readouterr().err


@pytest.mark.slow
def test_a_compiled_sdlora_step_on_cpu_matches_eager():
    """``train.compile`` through inductor on the CPU (gcc): the blocks compile, SD-LoRA's custom
    autograd function included, and a training step and a prediction match eager mode."""
    from clbench.protocol import compile_blocks

    traced = set()  # (torch.compiler.is_compiling(), grad mode) as the blocks' attention saw them

    def record(module, args):
        traced.add((torch.compiler.is_compiling(), torch.is_grad_enabled()))

    def step_and_predict(compiled: bool):
        torch.manual_seed(0)
        method, task, x, y = _built("sdlora")
        if compiled:
            compile_blocks(method.backbone, num_tasks=2)
            for block in method.backbone.blocks:
                block.attn.register_forward_pre_hook(record)
        method.train()
        loss = method.training_step(x, y, task, Stage())
        loss.backward()
        grads = [p.grad.clone() for p in method.parameters() if p.grad is not None]
        method.eval()
        with torch.no_grad():
            return loss.detach(), grads, method.predict_unmerged(x)

    torch.compiler.reset()
    try:
        eager, compiled = step_and_predict(False), step_and_predict(True)
        assert {(True, True), (True, False)} <= traced  # dynamo traced the blocks: training and inference graphs
    finally:
        torch.compiler.reset()
    assert torch.allclose(eager[0], compiled[0], atol=1e-5)
    assert len(eager[1]) == len(compiled[1]) > 0
    for a, b in zip(eager[1], compiled[1]):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)
    assert torch.allclose(eager[2], compiled[2], atol=1e-5)


def test_speed_prints_the_official_branch_forms_flops_beside_ours(results_root, tmp_path, capsys):
    from helpers import SPEED_SYNTH as SYNTH
    from helpers import data_rows

    report = tmp_path / "speed.json"
    assert main(SYNTH + ["--methods", "sdlora", "--vs", "sdlora", "--tasks", "4", "--batch-size", "16",
                         "--eval-batch-size", "16", "--json", str(report)]) == 0
    header, *rows = data_rows(capsys.readouterr().out)
    column = header.index("official GFLOP/img")
    assert [r[column] != "—" for r in rows] == [False, True, True]  # the plain backbone has none
    for t in json.loads(report.read_text())["methods"][0]["tasks"]:
        assert 0 < t["train_flops"] <= t["train_flops_official"], t
