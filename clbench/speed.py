"""``clbench speed``: throughput, FLOPs and memory of every method, at task 1 and at
the last task, with ratios measured in the same run.

    clbench speed --bench synth --methods all --device cpu --tasks 20
    clbench speed --bench imr --methods sdlora --tasks 10 --device cuda   # no data needed

Each method is built as a run builds it (``resolve_config`` -> ``create_backbone`` ->
``get_method``) and taken through every task by the protocol's own task loop
(``clbench.protocol.learn_task``: the same ``Task`` construction and input normalisation, the
same stages and optimizers, ``begin_task`` and ``end_task``) on random images of the
benchmark's size, with ``--steps-between`` optimisation steps per stage instead of epochs: enough for every
component a method adds per task to exist and hold non-zero values (a zero LoRA update is not
what SD-LoRA-KD would see). At task 1 and at the last task it measures

* **training**: the protocol's own step (``clbench.protocol.optimization_step``: autocast,
  forward, loss, backward, clipping, optimizer step) on one fixed batch of the recipe's batch
  size, for every training stage, after ``--warmup`` steps. Over ``--steps`` turns, each turn's
  step times are combined over the stages in proportion to their epochs; images/s is the median
  over turns: the rate at which a task's training images go through (data loading not included);
* **inference**: ``method.predict`` in eval mode after ``end_task`` (a merging method is merged),
  under the protocol's autocast, on a batch of the recipe's evaluation batch size;
* **FLOPs per image** with ``torch.utils.flop_counter``: one test image through ``predict`` (what
  result files report) and one training image (a training step's forward + backward / batch);
* **peak memory**: on CUDA the caching allocator's peak; on CPU the peak of live tensor bytes
  (parameters, gradients, optimizer state, activations), traced through a dispatch mode.

Ratios are measured on interleaved steps (A, B, A, B, ...) and are medians of per-turn ratios,
so that a machine busy with other work slows both sides alike: inference against the plain
backbone (the timm model's forward, no head); training at the last task against training at
task 1 (a copy of the method is kept from task 1); training against ``--vs`` (default
``full_ft``, measured first, with copies kept at its first and last task) at the same task. On
a CPU shared with other jobs, ``--threads 1`` keeps the step times steady.

Where the tools live: timing and peak memory of a call in ``clbench.measure``, the GPU-path
checks (host syncs, optimizer state, fused attention) in ``clbench.gpu_path``, the official
code's LoRA branch form in ``clbench.methods.lora`` (``official_branch_form``); this module builds
each method as a run does, takes it through its tasks and prints the table.

The projected run time adds, over the tasks, epochs x training images / training rate and the
evaluation of every seen test image, with rates interpolated between task 1 and the last task.
It leaves out data loading, ``begin_task``/``end_task`` work and checkpoints.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils.data import DataLoader, TensorDataset

from clbench import record
from clbench.backbones import create_backbone, normalization
from clbench.benchmarks import get_benchmark
from clbench.benchmarks.scenario import task_sizes
from clbench.catalog import unknown_name
from clbench.config import RunConfig, parse_set
from clbench.errors import ConfigError, DataError
from clbench.files import atomic_write_json
from clbench.gpu_path import fused_attention, fused_attention_kernel, gpu_path_checks
from clbench.measure import Timing, median_ratio, peak_memory_mib
from clbench.methods import METHODS, ordered_methods
from clbench.methods.base import CLMethod
from clbench.methods.lora import lora_layers, official_branch_form
from clbench.protocol import (
    Inputs,
    StagePlan,
    autocast_for,
    build_task,
    count_flops,
    learn_task,
    optimization_step,
    resolve_device,
    resolve_precision,
    stage_plans,
)
from clbench.protocol import build_method as protocol_build_method
from clbench.recipes import resolve_config
from clbench.task import Task, task_classes

# ------------------------------------------------------------------------------ measurements


@dataclass
class TaskSpeed:
    """One method at one task. Rates in images/s, FLOPs per image, memory in MiB."""

    task: int  # 1-based, as the table prints it
    train_images_per_s: float | None  # None: the method has nothing to train at this task
    infer_images_per_s: float
    infer_flops: int
    train_flops: int | None
    train_peak_mib: float | None
    infer_peak_mib: float
    infer_vs_backbone: float  # inference rate / the plain backbone's, paired steps
    train_vs_first: float | None  # training rate / this method's at task 1, paired steps
    train_vs_baseline: float | None = None  # training rate / --vs method's at the same task
    # a training image's FLOPs with every LoRA layer in the official code's branch form
    # (``official_branch_form``); None for a method without LoRA layers
    train_flops_official: int | None = None
    stage_epochs: list[int] = field(default_factory=list)  # epochs of each timed stage


@dataclass
class MethodSpeed:
    method: str
    tasks: list[TaskSpeed]
    checks: list[str] = field(default_factory=list)  # facts about the GPU path, per method
    projected_run_s: float | None = None
    error: str | None = None
    backbone_s_per_image: list[float] = field(default_factory=list)  # the plain backbone's paired steps


# ------------------------------------------------------------------------------ building like a run


@dataclass
class Setting:
    """What every method of one speed run shares."""

    bench: Any  # benchmarks.base.Benchmark
    num_tasks: int
    device: torch.device
    overrides: dict[str, Any]
    seed: int
    timing: Timing
    steps_between: int
    images_per_class: int
    batch_size: int | None
    eval_batch_size: int | None


def resolve(setting: Setting, method: str) -> RunConfig:
    """The run configuration, exactly as ``clbench.plan.plan`` resolves it."""
    return resolve_config(setting.bench.name, setting.num_tasks, method, setting.seed, None,
                          copy.deepcopy(setting.overrides) or None, str(setting.device))


def image_size(setting: Setting, cfg: RunConfig) -> int:
    return cfg.data.image_size or setting.bench.image_size


def build_method(setting: Setting, method: str) -> tuple[CLMethod, RunConfig, list[int], Inputs]:
    """``(method, config, task sizes, inputs)``, built as a run builds them (``protocol.build_method``,
    with the run's input normalisation)."""
    cfg = resolve(setting, method)
    sizes = task_sizes(setting.bench.num_classes, setting.num_tasks, cfg.data.initial_classes, cfg.data.increment)
    model, _ = protocol_build_method(cfg, sizes, setting.device)
    inputs = Inputs(setting.device, normalization(model.backbone) if cfg.backbone.normalize else None)
    return model, cfg, sizes, inputs


def synthetic_task(setting: Setting, cfg: RunConfig, sizes: list[int], t: int, inputs: Inputs) -> Task:
    """``Task`` ``t`` as a run builds it (``protocol.build_task``), its data random images of the
    benchmark's size, ``images_per_class`` per class, on the CPU like a DataLoader's (methods'
    passes over the data go through it)."""
    classes = task_classes(sizes, t)
    size = image_size(setting, cfg)
    g = torch.Generator().manual_seed(setting.seed * 1000 + t)
    labels = torch.tensor(list(classes)).repeat_interleave(setting.images_per_class)
    images = torch.rand(len(labels), 3, size, size, generator=g)
    train_cfg = cfg.train.for_task(t)
    if setting.batch_size:
        train_cfg = dataclasses.replace(train_cfg, batch_size=setting.batch_size)

    def make_loader(augment: bool = True, shuffle: bool = True, batch_size: int | None = None,
                    drop_last: bool | None = None) -> DataLoader:
        return DataLoader(TensorDataset(images, labels), batch_size=batch_size or train_cfg.batch_size,
                          shuffle=shuffle, drop_last=bool(drop_last), generator=torch.Generator().manual_seed(t))

    return build_task(t, sizes, train_cfg, inputs, make_loader, autocast_for(setting.device, cfg.train.precision))


def random_batch(task: Task, n: int, size: int, inputs: Inputs, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed batch of random images in [0, 1] with labels of ``task``, as the model sees them."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, size, size, generator=g)
    y = torch.randint(task.classes.start, task.classes.stop, (n,), generator=g)
    return inputs(x), y.to(inputs.device)


class Trainer:
    """The stages of one task with their optimizers (``protocol.stage_plans``, or the plans the
    protocol's ``learn_task`` just trained), and a step function per stage: the protocol's
    ``optimization_step`` on one fixed batch."""

    def __init__(self, method: CLMethod, task: Task, x: torch.Tensor, y: torch.Tensor,
                 plans: list[StagePlan] | None = None):
        self.method, self.task = method, task
        self.stages = []
        for plan in (stage_plans(method, task) if plans is None else plans):
            if plan.params:

                def step(plan=plan):
                    optimization_step(method, x, y, task, plan.stage, plan.optimizer, plan.params, task.autocast,
                                      plan.scaler)

                self.stages.append((plan.stage, plan.epochs, plan.optimizer, step))

    def state_tensors(self) -> list[torch.Tensor]:
        out = [*self.method.parameters(), *self.method.buffers()]
        for _, _, optimizer, _ in self.stages:
            for state in optimizer.state.values():
                out += [v for v in state.values() if isinstance(v, torch.Tensor)]
        return out + [p.grad for p in self.method.parameters() if p.grad is not None]


def effective_rate(batch: int, epochs: list[int], step_s: list[float]) -> float:
    """Training images per second over a task whose stages run ``epochs`` each at ``step_s``."""
    return sum(epochs) / sum(e * s / batch for e, s in zip(epochs, step_s))


# ------------------------------------------------------------------------------ one method


def measure_training(trainer: Trainer, timing: Timing, reference: Trainer | None = None,
                     baseline: Trainer | None = None) -> tuple[float, float | None, float | None]:
    """Images/s of one task's training, and its ratios to a ``reference`` (the same method at
    task 1) and a ``baseline`` (the ``--vs`` method at the same task).

    Per turn every contender runs one step of each of its stages; a turn's rate combines the
    stage times in proportion to the stages' epochs (the reference is weighted like this task
    when its stages are the same). Rate and ratios are medians over turns.
    """
    contenders = [c for c in (trainer, reference, baseline) if c is not None]
    flat = timing.times(*[step for c in contenders for *_, step in c.stages])
    names = [s.name for s, *_ in trainer.stages]
    rates, i = [], 0
    for c in contenders:
        per_stage, i = flat[i: i + len(c.stages)], i + len(c.stages)
        same = [s.name for s, *_ in c.stages] == names
        epochs = [e for _, e, _, _ in (trainer if same else c).stages]
        rates.append([effective_rate(c.task.train.batch_size, epochs, list(turn)) for turn in zip(*per_stage)])
    ratios = {id(c): statistics.median(a / b for a, b in zip(rates[0], r)) for c, r in zip(contenders[1:], rates[1:])}
    return (statistics.median(rates[0]), ratios.get(id(reference)) if reference else None,
            ratios.get(id(baseline)) if baseline else None)


State = tuple  # (method copy, its Task, batch x, batch y): enough to rebuild a Trainer


def measure_method(setting: Setting, name: str, backbone: torch.nn.Module, log: Callable[[str], None],
                   baseline_states: dict[str, State] | None = None,
                   keep_states: dict[str, State] | None = None) -> MethodSpeed:
    """Take ``name`` through every task with the protocol's own loop (``learn_task``: grow,
    begin_task, each stage's optimizer, end_task), training ``--steps-between`` steps per stage
    instead of epochs; measure it at task 1 and at the last task, after its stages and before
    ``end_task``, and its inference after ``end_task``.

    ``baseline_states``: the ``--vs`` method as it was at its task 1 (``"first"``) and last task
    (``"last"``), stepped in turns with this one. ``keep_states``: filled with this method's.
    """
    timing, device = setting.timing, setting.device
    method, cfg, sizes, inputs = build_method(setting, name)
    size = image_size(setting, cfg)
    eval_bs = setting.eval_batch_size or cfg.train.eval_batch_size
    x_eval = inputs(torch.rand(eval_bs, 3, size, size, generator=torch.Generator().manual_seed(1)))
    result = MethodSpeed(name, [])
    last = len(sizes) - 1
    states: dict[str, State] = {}
    compile_for = len(sizes) if cfg.train.compile else None
    for t in range(len(sizes)):
        task = synthetic_task(setting, cfg, sizes, t, inputs)
        x, y = random_batch(task, task.train.batch_size, size, inputs, seed=t)
        which = "first" if t == 0 else "last"
        measured = t in (0, last)
        speed = TaskSpeed(task=t + 1, train_images_per_s=None, infer_images_per_s=0.0, infer_flops=0,
                          train_flops=None, train_peak_mib=None, infer_peak_mib=0.0, infer_vs_backbone=0.0,
                          train_vs_first=None)

        def train_stage(plan: StagePlan) -> None:
            if not measured:  # enough steps for what the stage adds to hold non-zero values
                step = Trainer(method, task, x, y, [plan]).stages
                for _ in range(setting.steps_between if step else 0):
                    step[0][3]()

        def measure_training_of(plans: list[StagePlan]) -> None:
            if not measured:
                return
            trainer = Trainer(method, task, x, y, plans)
            log(f"{name}: task {t + 1}/{len(sizes)}: timing {len(trainer.stages)} training stage(s)")
            if not trainer.stages:
                return
            reference = Trainer(*states["first"]) if t > 0 and "first" in states else None
            base = Trainer(*baseline_states[which]) if baseline_states and which in baseline_states else None
            for other in (reference, base):
                if other is not None:
                    other.method.train()
            speed.stage_epochs = [e for _, e, _, _ in trainer.stages]
            speed.train_images_per_s, speed.train_vs_first, speed.train_vs_baseline = \
                measure_training(trainer, timing, reference, base)
            if t == 0:
                speed.train_vs_first = 1.0
            elif speed.train_vs_first is None and result.tasks[0].train_images_per_s:
                speed.train_vs_first = speed.train_images_per_s / result.tasks[0].train_images_per_s
            main_step = trainer.stages[-1][3]
            speed.train_flops = count_flops(main_step) // task.train.batch_size
            if lora_layers(method):
                with official_branch_form(method):
                    speed.train_flops_official = count_flops(main_step) // task.train.batch_size
            speed.train_peak_mib = peak_memory_mib(device, main_step, lambda: trainer.state_tensors() + [x])
            result.checks.extend(gpu_path_checks(trainer, device))
            if (t == 0 and last > 0) or keep_states is not None:
                try:  # optimizers are rebuilt for a copy when it is stepped again; the model is what is kept
                    states[which] = (copy.deepcopy(method), task, x, y)
                except Exception as err:  # a method that cannot be copied gets unpaired ratios
                    log(f"{name}: cannot keep a copy at task {t + 1} ({type(err).__name__}: {err}); "
                        f"its ratios divide separate medians")

        learn_task(method, task, train_stage, compile_for, after_stages=measure_training_of)
        if not measured:
            continue

        def predict() -> torch.Tensor:
            with torch.no_grad(), task.autocast():
                return method.predict(x_eval)

        def plain() -> torch.Tensor:
            with torch.no_grad(), task.autocast():
                return backbone(x_eval)

        own, base_times = timing.times(predict, plain)
        result.backbone_s_per_image += [b / eval_bs for b in base_times]
        speed.infer_images_per_s = eval_bs / statistics.median(own)
        speed.infer_vs_backbone = median_ratio(own, base_times)
        one = x_eval[:1]
        with torch.no_grad(), task.autocast():
            speed.infer_flops = count_flops(lambda: method.predict(one))
        speed.infer_peak_mib = peak_memory_mib(device, predict, lambda: [*method.parameters(), *method.buffers(), x_eval])
        result.tasks.append(speed)
    if last == 0:
        result.tasks.append(result.tasks[0])  # one task: first and last are the same
        states.setdefault("last", states.get("first"))
    if keep_states is not None:
        keep_states.update({k: v for k, v in states.items() if v is not None})
    result.checks = sorted(set(result.checks))
    return result


def projected_run_s(speed: MethodSpeed, num_tasks: int, train_images: int, test_images: int) -> float | None:
    """Seconds for a full run at the measured rates (see the module docstring)."""
    first, last = speed.tasks[0], speed.tasks[-1]
    if not first.train_images_per_s or not last.train_images_per_s:
        return None
    total = 0.0
    for t in range(num_tasks):
        f = t / (num_tasks - 1) if num_tasks > 1 else 0.0
        train_rate = (1 - f) * first.train_images_per_s + f * last.train_images_per_s
        infer_rate = (1 - f) * first.infer_images_per_s + f * last.infer_images_per_s
        epochs = sum((first if t == 0 else last).stage_epochs)
        total += epochs * train_images / num_tasks / train_rate
        total += test_images * (t + 1) / num_tasks / infer_rate
    return total


def split_sizes(setting: Setting, cfg) -> tuple[int, int] | None:
    """Training and test images of the benchmark: counted if the data is here, else the
    registration's ``num_images`` (ImageNet-R's 30,000 images split 80/20, as SD-LoRA's archive)."""
    bench = setting.bench
    try:
        train_tf, test_tf = bench.transforms(cfg.data.image_size)
        train, test = bench.load(bench.data_dir(cfg.data.root), train_tf, test_tf, record.default_root() / "splits")
        return len(train), len(test)
    except (DataError, OSError):
        return bench.num_images


# ------------------------------------------------------------------------------ the table


def _fmt(v: float | None, spec: str = ".0f", suffix: str = "") -> str:
    return "—" if v is None else f"{v:{spec}}{suffix}"


def _rate(v: float | None) -> str:
    """Images/s: whole numbers, three significant digits below 100 (ViT-B on a CPU)."""
    return _fmt(v, ".0f" if v is None or v >= 100 else ".3g")


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


COLUMNS = ["method", "task", "train img/s", "× full_ft", "× task 1", "infer img/s", "× backbone",
           "infer GFLOP/img", "train GFLOP/img", "official GFLOP/img", "train TFLOP/s", "train peak MiB",
           "infer peak MiB", "run (proj.)"]


def table_rows(backbone_speed: dict[str, float], results: list[MethodSpeed], vs: str) -> list[list[str]]:
    rows = [["plain backbone", "—", "—", "—", "—", _rate(backbone_speed["infer_images_per_s"]), "1.00",
             _fmt(backbone_speed["infer_flops"] / 1e9, ".4g"), "—", "—", "—", "—",
             _fmt(backbone_speed["infer_peak_mib"], ".0f"), "—"]]
    for r in results:
        if r.error:
            rows.append([r.method, "—", f"failed: {r.error}"] + [""] * (len(COLUMNS) - 3))
            continue
        shown = r.tasks if r.tasks[0] is not r.tasks[-1] else r.tasks[:1]
        for i, s in enumerate(shown):
            tflops = (s.train_flops * s.train_images_per_s / 1e12
                      if s.train_flops and s.train_images_per_s else None)
            rows.append([r.method if i == 0 else "", str(s.task), _rate(s.train_images_per_s),
                         _fmt(s.train_vs_baseline, ".2f"), _fmt(s.train_vs_first, ".2f"),
                         _rate(s.infer_images_per_s), _fmt(s.infer_vs_backbone, ".2f"),
                         _fmt(s.infer_flops / 1e9, ".4g"),
                         _fmt(None if s.train_flops is None else s.train_flops / 1e9, ".4g"),
                         _fmt(None if s.train_flops_official is None else s.train_flops_official / 1e9, ".4g"),
                         _fmt(tflops, ".3g"), _fmt(s.train_peak_mib, ".0f"), _fmt(s.infer_peak_mib, ".0f"),
                         _duration(None if i < len(shown) - 1 else r.projected_run_s)])
    header = [c.replace("full_ft", vs) for c in COLUMNS]
    return [header] + rows


def markdown(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([line(rows[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in rows[1:]])


# ------------------------------------------------------------------------------ the command


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bench", default="synth", help="benchmark whose recipes and image size to use (default synth); "
                                                    "its data is not read")
    p.add_argument("--methods", default="all", help="comma-separated method names, or all (default)")
    p.add_argument("--tasks", type=int, default=None, help="number of tasks (default: the benchmark's largest)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--vs", default="full_ft", help="method whose training rate the '× <vs>' column divides by "
                                                    "(default full_ft)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per measurement (default 30 on CPU, 50 on GPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3 on CPU, 10 on GPU)")
    p.add_argument("--steps-between", type=int, default=1,
                   help="optimisation steps per stage at the tasks that are not measured (default 1)")
    p.add_argument("--images-per-class", type=int, default=10,
                   help="synthetic images per class for methods' passes over a task's data (default 10)")
    p.add_argument("--batch-size", type=int, default=None, help="training batch (default: the recipe's)")
    p.add_argument("--eval-batch-size", type=int, default=None, help="inference batch (default: the recipe's)")
    p.add_argument("--backbone", default=None, help="timm model name, overrides every recipe")
    p.add_argument("--pretrained-path", default=None, help="local weights file for the backbone")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any recipe key, e.g. --set train.compile=true")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: torch's). On a machine shared with other work, 1 "
                        "gives far steadier figures than several threads waiting on each other")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="also write the measurements to this JSON file")


def main(args: argparse.Namespace) -> int:
    bench = get_benchmark(args.bench)
    num_tasks = args.tasks or max(bench.default_tasks)
    if num_tasks < 1 or num_tasks > bench.num_classes:
        raise ConfigError(f"--tasks {num_tasks}: {bench.name} has {bench.num_classes} classes; use 1..{bench.num_classes}")
    names = ordered_methods(list(METHODS)) if args.methods == "all" else \
        [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in names + [args.vs]:
        if m not in METHODS:
            raise ConfigError(unknown_name("method", m, METHODS))
    overrides = parse_set(args.overrides)
    if args.backbone:
        overrides.setdefault("backbone", {})["name"] = args.backbone
    if args.pretrained_path:
        overrides.setdefault("backbone", {})["pretrained_path"] = args.pretrained_path
    device = resolve_device(args.device)
    gpu = device.type == "cuda"
    if args.threads is not None:
        if args.threads < 1:
            raise ConfigError(f"--threads {args.threads}: use 1 or more")
        torch.set_num_threads(args.threads)
    timing = Timing(device, args.warmup if args.warmup is not None else (10 if gpu else 3),
                    args.steps if args.steps is not None else (50 if gpu else 30))
    if timing.steps < 1 or timing.warmup < 0:
        raise ConfigError("--steps must be at least 1 and --warmup at least 0")
    setting = Setting(bench, num_tasks, device, overrides, args.seed, timing, args.steps_between,
                      args.images_per_class, args.batch_size, args.eval_batch_size)

    def log(msg: str) -> None:
        print(f"[speed] {msg}", file=sys.stderr, flush=True)

    # The plain backbone: the inference reference of every ratio (the --vs method's backbone config).
    vs_cfg = resolve(setting, args.vs)
    backbone, weights = create_backbone(vs_cfg.backbone)
    backbone = backbone.to(device).eval()
    size = image_size(setting, vs_cfg)
    eval_bs = args.eval_batch_size or vs_cfg.train.eval_batch_size
    x_eval = torch.rand(eval_bs, 3, size, size, generator=torch.Generator().manual_seed(1)).to(device)
    precision = resolve_precision(vs_cfg.train.precision, device)
    autocast = autocast_for(device, precision)

    def plain() -> torch.Tensor:
        with torch.no_grad(), autocast():
            return backbone(x_eval)

    (times,) = timing.times(plain)
    with torch.no_grad():
        backbone_flops = count_flops(lambda: backbone(x_eval[:1]))
    backbone_speed = {"infer_images_per_s": eval_bs / statistics.median(times), "infer_flops": backbone_flops,
                      "infer_peak_mib": peak_memory_mib(device, plain, lambda: [*backbone.parameters(), x_eval])}

    results: dict[str, MethodSpeed] = {}
    baseline_states: dict[str, State] = {}
    for name in dict.fromkeys([args.vs] + names):  # the --vs method first: the others step in turns with it
        log(f"{name}: growing through {num_tasks} tasks on {device}")
        start = time.perf_counter()
        try:
            if name == args.vs:
                results[name] = measure_method(setting, name, backbone, log, keep_states=baseline_states)
                for s in results[name].tasks:
                    s.train_vs_baseline = 1.0 if s.train_images_per_s else None
            else:
                results[name] = measure_method(setting, name, backbone, log, baseline_states=baseline_states)
        except Exception as err:  # one broken method must not cost the others' figures
            log(f"{name} failed:\n{traceback.format_exc()}")
            results[name] = MethodSpeed(name, [], error=f"{type(err).__name__}: {err}")
        log(f"{name}: done in {time.perf_counter() - start:.0f}s")
        if gpu:
            torch.cuda.empty_cache()
    baseline_states.clear()

    baseline = results[args.vs]
    # The benchmark's image counts: read from its data once (a scan of every file), not per method.
    split = split_sizes(setting, vs_cfg)
    for r in results.values():
        if r.error:
            continue
        for i, s in enumerate(r.tasks):
            ref = None if baseline.error else baseline.tasks[i].train_images_per_s
            if s.train_vs_baseline is None and ref and s.train_images_per_s:  # no copy to step with
                s.train_vs_baseline = s.train_images_per_s / ref
        if split:
            r.projected_run_s = projected_run_s(r, num_tasks, *split)

    paired = [b for r in results.values() for b in r.backbone_s_per_image]
    if paired:  # the backbone as it ran beside the methods, over the whole command
        backbone_speed["infer_images_per_s"] = 1 / statistics.median(paired)
    shown = [results[n] for n in names]
    env = (f"{bench.name}, {num_tasks} tasks, {device}"
           f"{' (' + torch.cuda.get_device_name(device) + ')' if gpu else ''}, torch {torch.__version__}, "
           f"threads {torch.get_num_threads()}, backbone {weights}, {size}px, "
           f"eval batch {eval_bs}, {timing.steps} timed steps after {timing.warmup} warm-up")
    print(f"speed: {env}")
    print(f"attention: {fused_attention(backbone)}; {fused_attention_kernel(backbone, x_eval[:2], autocast)}; "
          f"precision: {precision} (train.precision={vs_cfg.train.precision}); compile: "
          f"{'on' if vs_cfg.train.compile else 'off'} (train.compile)")
    print()
    print(markdown(table_rows(backbone_speed, shown, args.vs)))
    notes = [f"{r.method}: {c}" for r in shown for c in r.checks]
    if notes:
        print("\n" + "\n".join(notes))
    print("\n× backbone: inference rate / the plain backbone's; × task 1: training rate / the same method's at "
          f"task 1; × {args.vs}: training rate / {args.vs}'s at the same task. Ratios are medians over interleaved "
          "steps, so a busy machine slows both sides alike; absolute rates follow its load. The backbone's rate "
          "is over all the steps it ran beside the methods. official GFLOP/img: the same training step with "
          "every LoRA layer in the official code's branch form (x W^T + c (x A^T) B^T per task; "
          "clbench.methods.lora.official_branch_form). peak MiB: "
          + ("torch.cuda.max_memory_allocated" if gpu else "live tensor bytes traced through a dispatch mode")
          + ". run (proj.): a full run's training and evaluation at these rates (no data loading).")
    if args.json:
        # bench, num_tasks and device: what `clbench preflight --speed FILE` matches runs by
        atomic_write_json(args.json, {"setting": env, "bench": bench.name, "num_tasks": num_tasks,
                                      "device": str(device), "backbone": backbone_speed,
                                      "methods": [dataclasses.asdict(r) for r in results.values()]})
    return 1 if any(r.error for r in shown) else 0


COMMANDS = {"speed": (add_arguments, main)}
