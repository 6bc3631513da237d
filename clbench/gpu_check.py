"""``clbench gpu-check``: the GPU path measured in one command, with no data and no weights.

    clbench gpu-check                      # on a CUDA machine: ViT-B/16, 224 px, ImageNet-R N=10 (~5-8 min)
    clbench gpu-check --smoke --device cpu # the same code path in seconds (synth backbone, tiny images)

It prints one table, a row per measurement, with training and inference images/s, training
TFLOP/s, peak memory and the projected ImageNet-R N=10 run time:

It measures (most telling first; one that would start after ``--budget-min`` is listed as skipped):

1. **SD-LoRA** through ``clbench speed``'s own measurement (``speed.measure_method``: the
   protocol's task loop and training step on random images, timed at task 1 and the last task),
   ViT-B/16 at 224 px with random weights (speed does not depend on them), at the default
   precision (bf16 on CUDA) without ``torch.compile``;
2. **one short SD-LoRA run** through the real protocol (``protocol.Run``: data loading, the uint8
   image cache with crops on the device, evaluation, checkpoints) on generated JPEGs in
   ImageNet-R's pre-split layout and size (200 classes, 24,000 training and 6,000 test images
   of about 400 px), one epoch per task; its projection scales the measured training time to
   the recipe's epochs;
3. SD-LoRA in fp32 (what the official repositories train in), then **every other method** as in 1;
4. SD-LoRA with ``train.compile`` on, in bf16 and fp32.

Peak memory: ``torch.cuda.max_memory_allocated`` on CUDA, live tensor bytes on CPU (speed rows:
every timed step traced; the run row: its first steps of every stage traced, ``protocol.TaskMemory``). Projected run time: speed's
projection (training and evaluation at the measured rates, no data loading) over ImageNet-R's
split sizes; for the run row, its measured time with every task's training scaled to the
recipe's epochs. ``--smoke`` uses the synth backbone at 32 px, 2 tasks for the speed rows and
few tiny images for the run: it checks the code path (a test runs it), not the speed.
"""
from __future__ import annotations

import argparse
import dataclasses
import multiprocessing
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from clbench import speed
from clbench.backbones import create_backbone
from clbench.benchmarks import get_benchmark
from clbench.catalog import unknown_name
from clbench.errors import ConfigError
from clbench.files import atomic_write_json
from clbench.measure import Timing
from clbench.methods import METHODS, ordered_methods
from clbench.protocol import Run, resolve_device, resolve_precision
from clbench.recipes import resolve_config


@dataclasses.dataclass
class Plan:
    """What one gpu-check measures."""

    bench: str
    speed_tasks: int
    run_tasks: int
    overrides: dict[str, Any]  # for every measurement
    steps: int
    warmup: int
    images_per_class: int
    train_per_class: int  # generated JPEGs for the run
    test_per_class: int
    image_side: int
    run_batch_size: int | None = None
    label: str = "ImageNet-R N=10"


def full_plan() -> Plan:
    return Plan(bench="imr", speed_tasks=10, run_tasks=10, overrides={"backbone": {"pretrained": False}},
                steps=20, warmup=5, images_per_class=2, train_per_class=120, test_per_class=30, image_side=400)


def smoke_plan() -> Plan:
    tiny = {"backbone": {"pretrained": False, "name": "vit_synth_patch8_32"}, "data": {"image_size": 32}}
    return Plan(bench="imr", speed_tasks=2, run_tasks=2, overrides=tiny, steps=1, warmup=0, images_per_class=1,
                train_per_class=2, test_per_class=1, image_side=40, run_batch_size=16,
                label="ImageNet-R N=2 at the synth backbone's cost")


def _merge(*layers: dict) -> dict:
    out: dict = {}
    for layer in layers:
        for section, values in layer.items():
            out[section] = {**out.get(section, {}), **values} if isinstance(values, dict) else values
    return out


# ------------------------------------------------------------------------------ generated data


def _write_image(job: tuple[str, int, int]) -> None:
    from PIL import Image

    path, side, seed = job
    rng = np.random.RandomState(seed)
    h, w = (int(side * f) for f in rng.uniform(0.75, 1.25, 2))
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    rgb = [np.sin(rng.uniform(1, 8) * xx + rng.uniform(0, 6)) * np.cos(rng.uniform(1, 8) * yy) for _ in range(3)]
    pixels = (np.stack(rgb, -1) + 1) * 110 + rng.randint(0, 35, (h, w, 3))
    Image.fromarray(pixels.astype(np.uint8)).save(path, quality=90)


def write_imagenet_r_like(root: Path, plan: Plan, log: Callable[[str], None]) -> Path:
    """200 class folders of JPEGs in ImageNet-R's pre-split layout under ``root/imagenet-r``."""
    base = root / "imagenet-r"
    jobs = []
    for split, per_class in (("train", plan.train_per_class), ("test", plan.test_per_class)):
        for c in range(200):
            folder = base / split / f"n{c:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            jobs += [(str(folder / f"{i}.jpg"), plan.image_side, hash((split, c, i)) % 2**31) for i in range(per_class)]
    start = time.perf_counter()
    workers = min(16, os.cpu_count() or 1)
    if workers > 1 and len(jobs) > 1000:
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            pool.map(_write_image, jobs, chunksize=64)
    else:
        for job in jobs:
            _write_image(job)
    log(f"wrote {len(jobs)} JPEGs (about {plan.image_side} px) to {base} in {time.perf_counter() - start:.0f}s")
    return root


# ------------------------------------------------------------------------------ measurements


@dataclasses.dataclass
class Row:
    what: str
    precision: str
    compile: bool
    train_first: float | None  # images/s at task 1
    train_last: float | None  # images/s at the last task
    infer: float | None
    train_tflops: float | None  # achieved TFLOP/s in training, last task
    peak_mib: float | None
    projected_s: float | None
    note: str = ""


def speed_row(setting: speed.Setting, name: str, label: str, precision: str, compile_: bool,
              log: Callable[[str], None]) -> Row:
    cfg = speed.resolve(setting, name)
    backbone, _ = create_backbone(cfg.backbone)
    backbone = backbone.to(setting.device).eval()
    try:
        r = speed.measure_method(setting, name, backbone, log)
    except Exception as err:  # one broken method must not cost the others' rows
        log(f"{label} failed: {type(err).__name__}: {err}")
        return Row(label, precision, compile_, None, None, None, None, None, None, f"failed: {type(err).__name__}")
    split = speed.split_sizes(setting, cfg)
    if split:
        r.projected_run_s = speed.projected_run_s(r, setting.num_tasks, *split)
    first, last = r.tasks[0], r.tasks[-1]
    tflops = (last.train_flops * last.train_images_per_s / 1e12
              if last.train_flops and last.train_images_per_s else None)
    peaks = [p for s in (first, last) for p in (s.train_peak_mib, s.infer_peak_mib) if p is not None]
    note = ""
    if last.train_flops and last.train_flops_official:
        note = f"train FLOPs {last.train_flops / last.train_flops_official:.2f}x the official form's"
    return Row(label, precision, compile_, first.train_images_per_s, last.train_images_per_s, last.infer_images_per_s,
               tflops, max(peaks, default=None), r.projected_run_s, note)


def run_row(plan: Plan, data_root: Path, out_root: Path, device: torch.device, workers: int,
            log: Callable[[str], None]) -> Row:
    """One short SD-LoRA run through the protocol and the image cache, one epoch per task."""
    short = {"train": {"epochs": 1, "num_workers": workers},
             "data": {"image_cache": True, "root": str(data_root)}}
    if plan.run_batch_size:
        short["train"]["batch_size"] = plan.run_batch_size
    overrides = _merge(plan.overrides, short)
    cfg = resolve_config(plan.bench, plan.run_tasks, "sdlora", 0, None, overrides, str(device))
    recipe = resolve_config(plan.bench, plan.run_tasks, "sdlora", 0, None, plan.overrides, str(device))
    precision = resolve_precision(cfg.train.precision, device)
    start = time.perf_counter()
    result = Run(cfg, out_root, progress=False).execute()
    wall = time.perf_counter() - start
    images = [len(t.classes) * plan.train_per_class for t in result.tasks]
    train_s = sum(t.train_time_s for t in result.tasks)
    projected = sum(t.train_time_s * recipe.train.for_task(t.task).epochs + t.eval_time_s for t in result.tasks)
    peaks = [t.cuda_peak_allocated_mb if device.type == "cuda" else t.cpu_peak_live_tensor_mb for t in result.tasks]
    peaks = [p for p in peaks if p is not None]
    first = images[0] / result.tasks[0].train_time_s
    last = images[-1] / result.tasks[-1].train_time_s
    note = (f"{sum(images)} training images in {train_s:.0f}s, run {wall:.0f}s with the cache build; "
            f"final acc {result.metrics['acc']:.1f}% (random weights)")
    return Row("sdlora: run, image cache, 1 epoch/task", precision, cfg.train.compile, first, last, None, None,
               max(peaks, default=None), projected, note)


# ------------------------------------------------------------------------------ the table


COLUMNS = ["measurement", "precision", "compile", "train img/s (task 1)", "train img/s (last)", "infer img/s",
           "train TFLOP/s", "peak MiB", "run (proj.)", "note"]


def table(rows: list[Row]) -> str:
    def cells(r: Row) -> list[str]:
        return [r.what, r.precision, "on" if r.compile else "off", speed._rate(r.train_first), speed._rate(r.train_last),
                speed._rate(r.infer), speed._fmt(r.train_tflops, ".3g"), speed._fmt(r.peak_mib, ".0f"),
                speed._duration(r.projected_s), r.note]

    return speed.markdown([COLUMNS] + [cells(r) for r in rows])


# ------------------------------------------------------------------------------ the command


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--smoke", action="store_true",
                   help="the same steps at a toy size (synth backbone, 32 px, 2 tasks): checks the code path on any device")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (without --smoke: a CUDA device)")
    p.add_argument("--methods", default="all", help="methods of the speed rows, comma-separated, or all (default)")
    p.add_argument("--work", type=Path, default=None,
                   help="folder for the generated images and the run's results (default: a temporary one)")
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers of the run (default: CPUs, at most 8)")
    p.add_argument("--no-compile", action="store_true",
                   help="leave out the compiled rows (inductor's compile takes minutes on a CPU)")
    p.add_argument("--budget-min", type=float, default=7.0,
                   help="start no new measurement after this many minutes (default 7: the whole check in ~8)")
    p.add_argument("--json", type=Path, default=None, help="also write the rows to this JSON file")


def main(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    if device.type != "cuda" and not args.smoke:
        raise ConfigError(f"gpu-check measures a CUDA device and torch sees {device}; "
                          f"run `clbench gpu-check --smoke` to check the code path here")
    plan = smoke_plan() if args.smoke else full_plan()
    names = ordered_methods(list(METHODS)) if args.methods == "all" else \
        [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in names:
        if m not in METHODS:
            raise ConfigError(unknown_name("method", m, METHODS))
    workers = args.workers if args.workers is not None else min(8, os.cpu_count() or 1)

    def log(msg: str) -> None:
        print(f"[gpu-check] {msg}", file=sys.stderr, flush=True)

    started = time.perf_counter()
    bench = get_benchmark(plan.bench)
    timing = Timing(device, plan.warmup, plan.steps)

    def setting(precision: str = "auto", compile_: bool = False) -> speed.Setting:
        extra = {"train": {"precision": precision, "compile": compile_}}
        return speed.Setting(bench, plan.speed_tasks, device, _merge(plan.overrides, extra), 0, timing, 1,
                             plan.images_per_class, None, None)

    default = resolve_precision("auto", device)
    rows: list[Row] = []

    def within_budget(what: str) -> bool:
        spent = (time.perf_counter() - started) / 60
        if spent < args.budget_min:
            return True
        log(f"skipping {what}: {spent:.1f} of --budget-min {args.budget_min:g} minutes spent")
        rows.append(Row(what, "", False, None, None, None, None, None, None, "skipped: time budget spent"))
        return False

    def speed_variant(name: str, precision: str = "auto", compile_: bool = False) -> None:
        resolved = resolve_precision(precision, device)
        if within_budget(f"{name} ({resolved}, compile {'on' if compile_ else 'off'})"):
            log(f"speed: {name} ({resolved}, compile {'on' if compile_ else 'off'})")
            rows.append(speed_row(setting(precision, compile_), name, name, resolved, compile_, log))
            if compile_:
                torch._dynamo.reset()  # the next measurements start from eager modules

    # Most telling first, so that a budget cut drops the least: SD-LoRA as users run it, the
    # run through the image cache, SD-LoRA in fp32, every other method, then compiled SD-LoRA.
    if "sdlora" in names:
        speed_variant("sdlora")
    with tempfile.TemporaryDirectory(prefix="clbench-gpu-check-") as tmp:
        if within_budget("sdlora: run, image cache"):
            work = Path(args.work) if args.work else Path(tmp)
            data = write_imagenet_r_like(work / "data", plan, log)
            log("run: sdlora through the image cache")
            rows.append(run_row(plan, data, work / "results", device, workers, log))
    other = "fp32" if default == "bf16" else "bf16"
    speed_variant("sdlora", other)
    for name in names:
        if name != "sdlora":
            speed_variant(name)
    for precision in (default, other) if not args.no_compile else ():
        speed_variant("sdlora", precision, compile_=True)

    gpu = f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""
    print(f"gpu-check{' --smoke' if args.smoke else ''}: {device}{gpu}, torch {torch.__version__}, "
          f"{plan.bench} N={plan.speed_tasks} speed rows, backbone "
          f"{(plan.overrides.get('backbone') or {}).get('name', 'ViT-B/16')} (random init), "
          f"{timing.steps} timed steps after {timing.warmup}; {time.perf_counter() - started:.0f}s in all")
    print()
    print(table(rows))
    print(f"\nrun (proj.): {plan.label}, training and evaluation at the measured rates (speed rows: no data "
          "loading) or the measured run with every task's training scaled to the recipe's epochs (run row). "
          "peak MiB: " + ("torch.cuda.max_memory_allocated." if device.type == "cuda" else
                          "live tensor bytes (the run row: over its first steps of every stage)."))
    if args.json:
        atomic_write_json(args.json, {"device": str(device), "smoke": bool(args.smoke),
                                      "rows": [dataclasses.asdict(r) for r in rows]})
    return 1 if any(r.note.startswith("failed") for r in rows) else 0


COMMANDS = {"gpu-check": (add_arguments, main)}
