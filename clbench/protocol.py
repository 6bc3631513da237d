"""The class-incremental protocol: one run = (benchmark scenario, method) -> one result file.

The protocol owns everything that is not a method's math: data loading and device placement,
mixed precision on GPU, the epoch loop, progress bars, evaluation on every class seen so far,
checkpoints at task boundaries, timing, memory, the cost report and the result file.

Resumption is exact on CPU: a checkpoint holds the method's state, the RNG states and the
partial accuracy matrix after a finished task; data order and augmentation are drawn from
generators seeded by (seed, task, loader, epoch, sample), so a resumed run sees the same batches
as an uninterrupted one, and the number of DataLoader workers does not change them.
Optimizers are created afresh for every task and stage, so no optimizer state crosses a
checkpoint.

A non-finite loss or parameter stops the run with ``DivergenceError`` (naming the task, stage,
epoch and step) before anything of that task is written, unless ``train.on_divergence`` is
``continue``: then where it happened goes into the result (``diverged``). A checkpoint that
does not read back is moved aside and the run starts over.

A signal only asks the run to stop (``clbench.stopping``): it stops at its next safe point,
where ``stopping.check()`` raises ``Interrupted``: before each training step and each
evaluation batch, and before each task, after the previous task's checkpoint and progress
writes. A write in flight completes, and the checkpoint holds the finished tasks.

Progress is reported through ``on_progress(tasks_done, num_tasks, elapsed_s)``: once the run
has started (after a resume, with the restored tasks counted) and after every finished task,
once its checkpoint is on disk. ``clbench.jobs.run_job`` turns it into the run's status record.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import os
import platform
import random
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset
from tqdm.auto import tqdm

import clbench
from clbench import files, record, stopping
from clbench.backbones import create_backbone, normalization
from clbench.benchmarks import get_benchmark, import_all
from clbench.benchmarks.image_cache import DeviceBatches, cached_datasets
from clbench.benchmarks.scenario import IndexedSubset, Scenario, validation_split
from clbench.benchmarks.transforms import with_transform
from clbench.config import RunConfig, TrainConfig, build_dataclass, without_execution_settings
from clbench.errors import ConfigError, CorruptFileError, DivergenceError
from clbench.loading import seeded_loader
from clbench.loggers import CurveLoggers
from clbench.measure import SteadyStepPeak, storage_bytes
from clbench.methods import get_method
from clbench.methods.base import CLMethod
from clbench.metrics import summarize
from clbench.record import RunResult, TaskRecord
from clbench.task import Stage, Task, task_classes

SOURCE_ROOT = Path(clbench.__file__).resolve().parent.parent  # the checkout, for an editable install
import_all()  # every benchmark module: what they register (synth's ViT with timm) is there for build_method


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name} was asked for, but torch sees no CUDA device; use --device cpu (or auto)")
    return device


def resolve_precision(precision: str, device: torch.device) -> str:
    """``train.precision`` on ``device``: ``auto`` is bf16 on CUDA and fp32 elsewhere (CPU runs
    stay in fp32 and bit-reproducible; fp32 is what every official repository trains in)."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_for(device: torch.device, precision: str = "auto") -> Callable[[], contextlib.AbstractContextManager]:
    """The autocast of ``train.precision`` on ``device`` (nothing for fp32), as a context factory."""
    dtype = AUTOCAST_DTYPES.get(resolve_precision(precision, device))
    if dtype is None:
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=dtype)


def grad_scaler_for(device: torch.device, precision: str = "auto") -> torch.amp.GradScaler | None:
    """A gradient scaler for fp16 (its gradients underflow without one); ``None`` otherwise."""
    if resolve_precision(precision, device) != "fp16":
        return None
    return torch.amp.GradScaler(device.type)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def source_commit() -> str:
    """The git commit of the checkout clbench runs from, ``-dirty`` if any file differs from it
    (untracked files count: a new method file is part of what ran); empty for an installed wheel."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=SOURCE_ROOT, capture_output=True, text=True,
                              timeout=5).stdout.strip()

    try:
        top = git("rev-parse", "--show-toplevel")
        if not top or Path(top).resolve() != SOURCE_ROOT:  # site-packages inside some other repository
            return ""
        dirty = git("status", "--porcelain", "--untracked-files=normal") != ""
        return git("rev-parse", "HEAD") + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return ""


def environment(device: torch.device) -> dict[str, Any]:
    import timm
    import torchvision

    return {
        "versions": {"clbench": clbench.__version__, "python": platform.python_version(),
                     "torch": torch.__version__, "torchvision": torchvision.__version__,
                     "timm": timm.__version__, "numpy": np.__version__},
        "git_commit": source_commit(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "device_type": device.type,
        "hostname": socket.gethostname(),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
    }


def _proc_status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


class TaskMemory:
    """Peak memory of each task of a run, measured afresh per task, with how it was measured.

    * CUDA: torch's peak of allocated memory, reset at every task's start (``cuda_peak_allocated_mb``).
    * CPU: the peak of live tensor bytes (``cpu_peak_live_tensor_mb``), the CPU's counterpart of
      CUDA's figure: the method's parameters, buffers and gradients, the optimizer's state, and
      every tensor made while the second batch of the first pass over each of the task's
      loaders is out (each training stage's second step, its steady state: the batch,
      activations, gradients; a method's own passes over the data), traced by
      ``measure.SteadyStepPeak``; the other steps repeat it. At least the method's state at the
      task's end. It counts tensors, not what the allocator holds, so it does not depend on what
      ran before in the process. Evaluation is not traced, nor a dataset held in memory.
    * CPU, Linux, also: the kernel's resident-set high-water mark (``VmHWM``), reset to the current RSS
      at every task's start (``/proc/self/clear_refs``), minus the RSS when the run started: what
      this run added at its peak, not what earlier runs in the same process left behind
      (``cpu_peak_rss_mb``). Memory an earlier run freed to the allocator but the OS still counts
      is reused unseen, so a run after another reads low, down to 0 (a pool worker's later runs).
    * Elsewhere: ``getrusage``'s high-water mark since the process started (it carries over).

    ``cpu_max_rss_mb`` (``getrusage``'s high-water mark, which the same reset restarts: the task's
    absolute peak RSS) is recorded too.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.start_kib = _proc_status_kib("VmRSS")
        self.tensors: SteadyStepPeak | None = None

    def _reset_hwm(self) -> bool:
        try:
            Path("/proc/self/clear_refs").write_text("5")  # 5: reset the peak RSS, nothing else
            return True
        except OSError:
            return False

    def start_task(self, task: Task | None = None, method: CLMethod | None = None) -> None:
        """From here, the task's peaks; on the CPU, ``task``'s loaders trace one batch of their
        first pass (``task.make_loader`` is wrapped) with ``method``'s tensors counted."""
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.hwm_reset = self.start_kib is not None and self._reset_hwm()
        self.tensors = None
        if self.device.type == "cpu" and task is not None and method is not None:
            def state() -> list[torch.Tensor]:
                params = list(method.parameters())
                return [*params, *method.buffers(), *(p.grad for p in params if p.grad is not None)]

            self.tensors = SteadyStepPeak(state)
            task.make_loader = self.tensors.loaders(task.make_loader)

    def task_fields(self) -> dict[str, Any]:
        """``TaskRecord`` fields for the task since ``start_task``."""
        out: dict[str, Any] = {"cpu_max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
        if self.device.type == "cuda":
            out["cuda_peak_allocated_mb"] = torch.cuda.max_memory_allocated(self.device) / 2**20
            out["memory_measured"] = "torch.cuda.max_memory_allocated, reset per task"
        hwm = _proc_status_kib("VmHWM") if self.hwm_reset else None
        if hwm is not None:
            out["cpu_peak_rss_mb"] = max(hwm - self.start_kib, 0) / 1024
            if self.device.type != "cuda":
                out["memory_measured"] = "RSS high-water mark per task (VmHWM, reset per task) above the run's start"
        elif self.device.type != "cuda":
            out["memory_measured"] = "getrusage max RSS of the process since it started (carries over)"
        if self.tensors is not None:
            peak = max(self.tensors.peak, storage_bytes(self.tensors.state()))
            out["cpu_peak_live_tensor_mb"] = peak / 2**20
            out["memory_measured"] = (
                "cpu_peak_live_tensor_mb: peak of live CPU tensor bytes over the second batch of the first pass "
                "over each of the task's loaders (traced), the method's parameters, buffers and gradients and the "
                "optimizer's state included; cpu_peak_rss_mb: " + out.get("memory_measured", "not measured"))
        return out


def count_flops(fn: Callable[[], Any]) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def optimization_step(method: CLMethod, x: torch.Tensor, y: torch.Tensor, task: Task, stage: Stage,
                      optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter],
                      autocast: Callable[[], contextlib.AbstractContextManager],
                      scaler: torch.amp.GradScaler | None = None) -> torch.Tensor:
    """One step of the training loop (also what ``clbench speed`` times): the method's loss
    under ``autocast``, backward, gradient clipping, optimizer step. Returns the detached loss,
    still on the device: nothing here waits for the device, except fp16's ``scaler`` (its step
    reads on the host whether the gradients overflowed).

    With ``train.micro_batch_size`` the batch is split into ``batch_size / micro_batch_size``
    groups (fewer if the batch is shorter), each group's loss is back-propagated with weight
    1 / groups, and one step follows: the gradient that DDP with one group per device computes
    (each device's mean loss, the gradients averaged), also for losses that are not a mean over
    samples (HiDe-Prompt's contrastive term). A short last batch is split as evenly as
    ``torch.tensor_split`` does, as a DistributedSampler shards it over the devices."""
    micro = task.train.micro_batch_size
    scaled = (lambda loss: loss) if scaler is None else scaler.scale
    if micro is None or len(x) <= micro:
        with autocast():
            loss = method.training_step(x, y, task, stage)
        optimizer.zero_grad(set_to_none=True)
        scaled(loss).backward()
    else:
        groups = min(task.train.batch_size // micro, len(x))
        optimizer.zero_grad(set_to_none=True)
        loss = torch.zeros((), device=x.device)
        for xg, yg in zip(torch.tensor_split(x, groups), torch.tensor_split(y, groups)):
            with autocast():
                part = method.training_step(xg, yg, task, stage) / groups
            scaled(part).backward()
            loss = loss + part.detach()
    if scaler is not None:
        scaler.unscale_(optimizer)  # clipping sees the true gradients
    if task.train.grad_clip:
        torch.nn.utils.clip_grad_norm_(params, task.train.grad_clip)
    if scaler is None:
        optimizer.step()
    else:
        scaler.step(optimizer)  # skipped when a gradient overflowed; the scale then shrinks
        scaler.update()
    return loss.detach()


def compile_blocks(backbone: torch.nn.Module, num_tasks: int = 1, backend: str = "inductor") -> None:
    """Regional ``torch.compile``: every transformer block (``backbone.blocks``, else the whole
    backbone) compiles its forward in place, so state-dict keys and deep copies are unchanged.
    Blocks share their compiled code; a method that changes a block's structure per task
    recompiles once per task, so the recompile limit is raised to allow that. Idempotent."""
    import torch._dynamo

    limit = max(torch._dynamo.config.recompile_limit, 4 * num_tasks)  # train/eval x grad modes
    torch._dynamo.config.recompile_limit = limit
    blocks = getattr(backbone, "blocks", None)
    for module in (blocks if blocks is not None else [backbone]):
        if getattr(module, "_compiled_call_impl", None) is None:
            module.compile(backend=backend)


def build_method(config: RunConfig, sizes: list[int], device: torch.device) -> tuple[CLMethod, str]:
    """How a run builds its model, seeded: the backbone, then the method around it, on
    ``device``; also the pretrained weights' identifier. ``clbench speed`` builds it so too."""
    seed_everything(config.seed)
    backbone, weights_id = create_backbone(config.backbone)
    cls = get_method(config.method)
    method = cls(backbone, build_dataclass(cls.Config, config.method_args, "method"), num_classes=sum(sizes),
                 num_tasks=len(sizes)).to(device)
    return method, weights_id


class Inputs:
    """How batches reach the model: moved to the device, cached uint8 images scaled to [0, 1],
    normalised by the backbone's mean and std when the recipe asks (``backbone.normalize``)."""

    def __init__(self, device: torch.device, mean_std: tuple[list[float], list[float]] | None = None):
        self.device = device
        self.mean_std = None if mean_std is None else tuple(
            torch.tensor(v, device=device).view(1, 3, 1, 1) for v in mean_std)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        if x.dtype == torch.uint8:  # a cached test image: ToTensor's scaling, done on the device
            x = x.float().div_(255)
        return self.normalise(x)

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.mean_std is None else (x - self.mean_std[0]) / self.mean_std[1]


def build_task(index: int, sizes: list[int], train: TrainConfig, inputs: Inputs,
               make_loader: Callable[..., DataLoader],
               autocast: Callable[[], contextlib.AbstractContextManager]) -> Task:
    """Task ``index`` of a scenario with these task ``sizes``, its data through ``make_loader``
    (``Task.loader``'s arguments). A method's own passes over the data (``task.batches``) are
    normalised as the training batches are."""
    task = Task(index=index, num_tasks=len(sizes), classes=task_classes(sizes, index), train=train,
                device=inputs.device, make_loader=make_loader, autocast=autocast)
    if inputs.mean_std is not None:
        batches = task.batches

        def normalised_batches(*args, **kwargs):
            for x, y in batches(*args, **kwargs):
                yield inputs.normalise(x), y

        task.batches = normalised_batches  # type: ignore[method-assign]
    return task


@dataclasses.dataclass
class StagePlan:
    """One stage of a task, ready to train: its epochs and a fresh optimizer and scheduler."""

    stage: Stage
    epochs: int
    optimizer: torch.optim.Optimizer
    scheduler: Any
    params: list[torch.nn.Parameter]
    scaler: torch.amp.GradScaler | None = None  # fp16's gradient scaler (train.precision)


def stage_plans(method: CLMethod, task: Task) -> Iterator[StagePlan]:
    """The task's stages that have epochs, each with a fresh optimizer built when the stage is
    reached (after the previous one trained, as its parameter groups may depend on it). A stage
    with no epochs or no parameters to train is skipped and builds no optimizer: a training-free
    method may have such stages, or none."""
    for stage in method.stages(task):
        epochs = stage.epochs if stage.epochs is not None else task.train.epochs
        if epochs <= 0 or not any(g["params"] for g in method.param_groups(task, stage)):
            continue
        optimizer, scheduler = method.configure_optimizers(task, stage)
        yield StagePlan(stage, epochs, optimizer, scheduler, [p for g in optimizer.param_groups for p in g["params"]],
                        grad_scaler_for(task.device, task.train.precision))


def learn_task(method: CLMethod, task: Task, train_stage: Callable[[StagePlan], None],
               compile_blocks_for: int | None = None,
               after_stages: Callable[[list[StagePlan]], None] | None = None) -> int:
    """The lifecycle of one task, the same for a run and for ``clbench speed``: ``grow``, place on
    the device, (compile), ``begin_task``, every stage of ``stage_plans`` through ``train_stage``
    with the module in train mode, ``after_stages`` (speed measures there), then ``end_task``
    in eval mode. Returns the number of parameters this task's optimizers updated."""
    method.grow(task)
    method.to(task.device)
    if compile_blocks_for is not None:
        compile_blocks(method.backbone, compile_blocks_for)
    method.begin_task(task)
    trainable: dict[int, int] = {}
    plans = []
    for plan in stage_plans(method, task):
        trainable.update({id(p): p.numel() for p in plan.params})
        method.train()
        train_stage(plan)
        plans.append(plan)
    if after_stages is not None:
        after_stages(plans)
    method.eval()
    method.end_task(task)
    return sum(trainable.values())


class Run:
    """One run of one method on one scenario. ``execute()`` writes and returns its ``RunResult``.

    ``execute`` is made of public steps that a test or a notebook can drive one by one, without
    writing anything: ``prepare()`` (load the data, build the scenario and the method), then for
    each task ``t``: ``learn(task(t))`` (train it; returns the parameters its optimizers updated)
    and ``evaluate(t)`` (counts of correct and total test images per task seen). ``loader``
    makes a loader as the run does (seeded for training, in order for evaluation)."""

    def __init__(self, config: RunConfig, out_root: Path, progress: bool = True,
                 on_progress: Callable[[int, int, float], None] | None = None):
        self.config = config
        self.out_root = Path(out_root)
        self.progress = progress and sys.stderr.isatty()  # no carriage-return frames in a log file
        self.on_progress = on_progress or (lambda tasks_done, num_tasks, elapsed_s: None)
        self.key = config.key
        self.result_path = record.result_path(self.out_root, self.key)
        self.checkpoint_path = record.checkpoint_path(self.out_root, self.key)
        self.device = resolve_device(config.device)
        self.autocast = autocast_for(self.device, config.train.precision)
        self.epoch_log: list[dict[str, Any]] = []  # the task being trained's curve (TaskRecord.epochs)
        self.diverged: list[str] = []  # where training diverged, with train.on_divergence=continue
        self._diverged_stages: set[tuple[int, str]] = set()
        self.curves = CurveLoggers([], record.log_dir(self.out_root, self.key), config)  # execute() opens the asked ones

    # -- set-up ----------------------------------------------------------------------------------

    def prepare(self) -> None:
        cfg = self.config
        bench = get_benchmark(cfg.benchmark)
        train_tf, test_tf = bench.transforms(cfg.data.image_size)
        data_dir = bench.data_dir(cfg.data.root)
        splits_dir = self.out_root / "splits"
        train, test = bench.load(data_dir, train_tf, test_tf, splits_dir)
        self.data_provenance = getattr(train, "provenance", str(data_dir))
        self.device_augment = None
        if cfg.data.image_cache:  # uint8 memmaps; crops, flips and scaling happen on the device
            train, test, self.device_augment = cached_datasets(
                bench, train, test, cfg.data.image_size or bench.image_size, test_tf, cfg.data.cache_source_size,
                data_dir, self.out_root / "cache" / bench.name, cfg.train.num_workers)
            self.train_plain = train  # the same sources; DeviceBatches crops them as the test transform
        else:
            self.train_plain = with_transform(  # the training images without augmentation
                train, test_tf, lambda: bench.load(data_dir, test_tf, test_tf, splits_dir)[0])
        if cfg.data.eval_on == "val":  # evaluate on held-out training images; no test image is read
            keep, held_out = validation_split(train.targets, cfg.data.val_fraction, cfg.data.val_seed)
            test = IndexedSubset(self.train_plain, held_out)  # without augmentation, as test images
            train, self.train_plain = IndexedSubset(train, keep), IndexedSubset(self.train_plain, keep)
            self.data_provenance += (f"; evaluated on a validation split, not the test set: {len(held_out)} "
                                     f"training images ({cfg.data.val_fraction:.0%} of each class, seed "
                                     f"{cfg.data.val_seed}), trained on the other {len(keep)}")
        self.scenario = Scenario.build(train, test, bench.num_classes, cfg.num_tasks, cfg.class_order_seed,
                                       cfg.data.initial_classes, cfg.data.increment)
        self.plain_scenario = dataclasses.replace(self.scenario, train=self.train_plain)

        self.method, self.weights_id = build_method(cfg, self.scenario.sizes, self.device)
        self.inputs = Inputs(self.device, normalization(self.method.backbone) if cfg.backbone.normalize else None)

    def loader(self, dataset: Dataset, batch_size: int, shuffle: bool, drop_last: bool,
                seed: int | None) -> DataLoader:
        """A training loader (``seed``: its stream) whose batches do not depend on the worker
        count (``clbench.loading``), or, without a seed, an evaluation loader in order."""
        workers = self.config.train.num_workers
        pin = self.device.type == "cuda"
        if seed is not None:
            return seeded_loader(dataset, seed, batch_size, shuffle, drop_last, workers, pin)
        return DataLoader(dataset, batch_size=batch_size, shuffle=False, drop_last=drop_last, num_workers=workers,
                          persistent_workers=False, pin_memory=pin, worker_init_fn=stopping.leave_to_the_main_process)

    def task(self, t: int) -> Task:
        train_cfg = self.config.train.for_task(t)
        calls = [0]  # each loader made for this task gets its own, reproducible seed

        def make_loader(augment: bool = True, shuffle: bool = True, batch_size: int | None = None,
                        drop_last: bool | None = None) -> DataLoader:
            calls[0] += 1
            scenario = self.scenario if augment else self.plain_scenario
            seed = (self.config.seed * 1_000_003 + t * 10_007 + calls[0]) % 2**63
            loader = self.loader(scenario.train_subset(t), batch_size or train_cfg.batch_size, shuffle,
                                  train_cfg.drop_last if drop_last is None else drop_last, seed)
            if self.device_augment is not None:
                loader = DeviceBatches(loader, self.device_augment, self.device, train=augment, seed=seed)
            return loader

        return build_task(t, self.scenario.sizes, train_cfg, self.inputs, make_loader, self.autocast)

    # -- the loop --------------------------------------------------------------------------------

    def learn(self, task: Task) -> int:
        """Learn one task (``learn_task``), its stages trained for their epochs over the task's
        augmented, shuffled training data; returns the parameters its optimizers updated."""
        def train_stage(plan: StagePlan) -> None:
            loader = task.loader(augment=True, shuffle=True)
            bar = tqdm(total=plan.epochs * len(loader), disable=not self.progress, leave=False, dynamic_ncols=True,
                       desc=f"{self.config.method} task {task.index + 1}/{task.num_tasks} {plan.stage.name}")
            for epoch in range(plan.epochs):
                epoch_started, lrs = time.time(), [g["lr"] for g in plan.optimizer.param_groups]
                running = torch.zeros((), device=self.device)
                first_bad = torch.full((), -1, device=self.device)  # the first step with a non-finite loss
                for step, (x, y) in enumerate(loader):
                    stopping.check()  # a safe point: a stop asked for ends the run here (clbench.stopping)
                    x, y = self.inputs(x), y.to(self.device, non_blocking=True)
                    loss = optimization_step(self.method, x, y, task, plan.stage, plan.optimizer, plan.params,
                                             self.autocast, plan.scaler)
                    running += loss
                    first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss), step, first_bad)
                    bar.update()
                    if step == len(loader) - 1 and self.progress:  # one host sync per epoch
                        bar.set_postfix(epoch=f"{epoch + 1}/{plan.epochs}", loss=f"{running.item() / (step + 1):.3f}")
                self._check_finite(task, plan, epoch, int(first_bad), len(loader))
                if plan.scheduler is not None:
                    plan.scheduler.step()
                self._epoch_done(task, plan, epoch, running.item() / max(len(loader), 1), lrs,
                                 time.time() - epoch_started)
            bar.close()

        compile_for = self.scenario.num_tasks if self.config.train.compile else None
        return learn_task(self.method, task, train_stage, compile_for)

    def _epoch_done(self, task: Task, plan: StagePlan, epoch: int, loss: float, lrs: list[float],
                    seconds: float) -> None:
        """One epoch's line of the training curve (``TaskRecord.epochs``), mirrored to the loggers."""
        entry = {"stage": plan.stage.name, "epoch": epoch, "loss": loss, "lr": lrs[0], "time_s": seconds}
        if len(set(lrs)) > 1:  # parameter groups at different rates (a head's own lr)
            entry["lr_groups"] = lrs
        self.epoch_log.append(entry)
        self.curves.epoch(task.index, entry)

    def _check_finite(self, task: Task, plan: StagePlan, epoch: int, bad_step: int, steps: int) -> None:
        """After an epoch: a non-finite loss (at ``bad_step``, -1: none) or a non-finite parameter
        (a non-finite gradient) stops the run, or with ``train.on_divergence=continue`` is noted
        once per stage in the result. One host sync per epoch."""
        if bad_step < 0 and bool(torch.stack([p.isfinite().all() for p in plan.params]).all()):
            return
        what = (f"the loss is not finite at step {bad_step + 1}/{steps}" if bad_step >= 0
                else f"a parameter is not finite after step {steps}/{steps} (its gradient was not)")
        where = (f"task {task.index + 1}/{task.num_tasks}, stage {plan.stage.name}, "
                 f"epoch {epoch + 1}/{plan.epochs}")
        if self.config.train.on_divergence == "continue":
            if (task.index, plan.stage.name) not in self._diverged_stages:  # the first epoch of each stage
                self._diverged_stages.add((task.index, plan.stage.name))
                self.diverged.append(f"{where}: {what}")
                tqdm.write(f"[{self.key}] warning: training diverged in {where}: {what}; going on "
                           f"(train.on_divergence=continue)")
            return
        lr = max(g["lr"] for g in plan.optimizer.param_groups)
        kept = (f"its checkpoint after task {task.index} is kept" if task.index else "no checkpoint was written")
        raise DivergenceError(
            f"training diverged in {where}: {what}; the learning rate ({lr:g}) is the likely "
            f"cause: lower train.lr (or set train.grad_clip) and rerun; the run is failed and wrote no "
            f"result, {kept} (--set train.on_divergence=continue trains on regardless)")

    def _read_checkpoint(self) -> dict[str, Any] | None:
        """The run's checkpoint, or None: there is none, or it does not read back (it is then
        moved aside, and the run starts over)."""
        if not self.checkpoint_path.exists():
            return None
        try:
            return record.read_checkpoint(self.checkpoint_path)
        except CorruptFileError as err:
            files.set_aside(self.checkpoint_path, err.why, "checkpoint", "the run starts over from task 1")
            return None

    @torch.no_grad()
    def evaluate(self, t: int) -> tuple[list[int], list[int]]:
        """Counts (correct, total) per task ``i <= t`` on the test data of every seen class."""
        self.method.eval()
        sizes = self.scenario.sizes
        bounds = np.cumsum(sizes[: t + 1])
        class_sorted = self.config.data.test_order == "class_sorted"
        test = ConcatDataset([self.scenario.test_subset(i, class_sorted) for i in range(t + 1)])
        loader = self.loader(test, self.config.train.eval_batch_size, False, False, None)
        correct = torch.zeros(t + 1, dtype=torch.long, device=self.device)
        total = torch.zeros(t + 1, dtype=torch.long, device=self.device)
        bounds_t = torch.as_tensor(bounds, device=self.device)
        for x, y in tqdm(loader, disable=not self.progress, leave=False, desc=f"eval after task {t + 1}"):
            stopping.check()
            x, y = self.inputs(x), y.to(self.device)
            with self.autocast():
                logits = self.method.predict(x)
            task_of = torch.bucketize(y, bounds_t, right=True)
            hit = (logits.argmax(dim=1) == y).long()
            correct.index_add_(0, task_of, hit)
            total.index_add_(0, task_of, torch.ones_like(hit))
        return correct.tolist(), total.tolist()

    def _flops_per_image(self) -> int:
        x, _ = self.scenario.test_subset(0)[0]
        x = self.inputs(x.unsqueeze(0))
        self.method.eval()
        with torch.no_grad():
            return count_flops(lambda: self.method.predict(x))

    def execute(self) -> RunResult:
        cfg = self.config
        started = time.time()
        memory = TaskMemory(self.device)  # before the build: the model and the data count
        self.prepare()  # data errors surface here, before anything is written
        T = self.scenario.num_tasks
        correct = [[0] * T for _ in range(T)]
        total = [[0] * T for _ in range(T)]
        records: list[TaskRecord] = []
        first = 0
        ckpt = self._read_checkpoint()
        if ckpt is not None:
            if without_execution_settings(ckpt["config"]) != cfg.identity():
                raise ConfigError(f"{self.checkpoint_path} was written by a different configuration; "
                                  f"delete it or rerun with --force")
            first = ckpt["completed_tasks"]
            for t in range(first):
                self.method.grow(self.task(t))
            self.method.load_state_dict(ckpt["method"])
            self.method.to(self.device)
            correct, total = ckpt["correct"], ckpt["total"]
            records = [TaskRecord(**r) for r in ckpt["tasks"]]
            started -= ckpt["elapsed_s"]
            self.diverged = list(ckpt.get("diverged", []))
            set_rng_state(ckpt["rng"])
            tqdm.write(f"[{self.key}] resuming after task {first}/{T} from {self.checkpoint_path}")
        self.on_progress(first, T, time.time() - started)
        self.curves = CurveLoggers(cfg.log, record.log_dir(self.out_root, self.key), cfg,
                                   resumed_epochs=sum(len(r.epochs) for r in records))

        for t in range(first, T):
            stopping.check()  # after the last task's checkpoint and status writes completed
            task = self.task(t)
            self.epoch_log = []
            memory.start_task(task, self.method)
            t0 = time.time()
            trainable = self.learn(task)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            t1 = time.time()
            row_c, row_n = self.evaluate(t)
            correct[t][: t + 1], total[t][: t + 1] = row_c, row_n
            t2 = time.time()
            cost = self.method.cost_report(task, trainable)
            cost.flops_per_image = self._flops_per_image()
            acc_t = 100.0 * sum(row_c) / max(sum(row_n), 1)
            records.append(TaskRecord(task=t, classes=list(task.classes), train_time_s=t1 - t0,
                                      eval_time_s=t2 - t1, accuracy=acc_t, cost=cost.to_dict(),
                                      method_log=self.method.task_log(task), epochs=self.epoch_log,
                                      **memory.task_fields()))
            self.curves.task(t, acc_t, t1 - t0)
            if cfg.save_model == "every-task" or (cfg.save_model == "final" and t == T - 1):
                save_model(record.model_path(self.out_root, self.key, t), self.method, cfg, self.scenario, t + 1)
            tqdm.write(f"[{self.key}] task {t + 1}/{T}: acc over {task.num_seen} seen classes "
                       f"{acc_t:.2f}%  ({t1 - t0:.1f}s train, {t2 - t1:.1f}s eval)")
            if t < T - 1:
                record.write_checkpoint(self.checkpoint_path, {
                    "config": cfg.to_dict(), "completed_tasks": t + 1, "method": self.method.state_dict(),
                    "rng": rng_state(), "correct": correct, "total": total,
                    "tasks": [dataclasses.asdict(r) for r in records], "elapsed_s": time.time() - started,
                    "diverged": self.diverged})
            self.on_progress(t + 1, T, time.time() - started)

        result = RunResult(
            run_key=self.key, benchmark=cfg.benchmark, benchmark_title=get_benchmark(cfg.benchmark).title,
            num_tasks=T, method=cfg.method, method_info=type(self.method).info, tag=cfg.tag, seed=cfg.seed,
            class_order_seed=cfg.class_order_seed, class_order=self.scenario.order,
            task_sizes=self.scenario.sizes, config=cfg.to_dict(), pretrained=self.weights_id,
            data=self.data_provenance, environment=environment(self.device), tasks=records,
            accuracy_matrix={"correct": correct, "total": total}, metrics=summarize(correct, total),
            cost=records[-1].cost, wall_time_s=time.time() - started,
            finished_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), argv=sys.argv,
            diverged=self.diverged)
        record.write_result(self.result_path, result)
        self.checkpoint_path.unlink(missing_ok=True)
        self.curves.close()
        return result


MODEL_FORMAT = 1


def save_model(path: Path, method: CLMethod, config: RunConfig, scenario: Scenario, completed_tasks: int) -> None:
    """Keep a trained method (``--save-model``): its state dict after ``completed_tasks`` tasks, its
    run's configuration and class order, and for a method that merges its updates into the
    backbone (``inference_backbone``) that merged backbone, a plain timm ViT, on its own."""
    merged = getattr(method, "inference_backbone", None)
    files.atomic_torch_save(path, {
        "format": MODEL_FORMAT, "config": config.to_dict(), "completed_tasks": completed_tasks,
        "class_order": scenario.order, "task_sizes": scenario.sizes,
        "method": {k: v.detach().cpu() for k, v in method.state_dict().items()},
        "merged_backbone": None if merged is None else {k: v.detach().cpu() for k, v in merged().state_dict().items()}})


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[CLMethod, dict[str, Any]]:
    """A method kept by ``--save-model``, ready for inference: rebuilt from its run's configuration
    (the same backbone and method, grown to its tasks), its state loaded, in eval mode on
    ``device``. ``method.predict(x)`` gives logits over the harness classes seen, ``x`` as the
    run's test images (the benchmark's test transform; normalised if ``backbone.normalize``); harness
    class ``j`` is the dataset's class ``info['class_order'][j]``. Needs no pretrained weights (the
    state dict holds the whole backbone), but the method's registration: a plugin's method needs
    its plugin imported first. Also returns the file's other entries (config, completed_tasks,
    class_order, task_sizes, merged_backbone)."""
    saved = torch.load(path, map_location="cpu", weights_only=False)
    if saved.get("format") != MODEL_FORMAT:
        raise ValueError(f"{path}: not a model file of clbench (format {saved.get('format')})")
    config = RunConfig.from_dict(saved["config"])
    config.backbone.pretrained = False  # the state dict holds the backbone too: no weights file is needed
    device = torch.device(device)
    sizes = saved["task_sizes"]
    method, _ = build_method(config, sizes, device)

    def no_data(*args: Any, **kwargs: Any) -> DataLoader:
        raise RuntimeError("a loaded model has no training data")

    for t in range(saved["completed_tasks"]):  # structure only, as a resumed run grows
        method.grow(build_task(t, sizes, config.train.for_task(t), Inputs(device), no_data, contextlib.nullcontext))
    method.load_state_dict(saved["method"])
    method.to(device).eval()
    return method, {k: v for k, v in saved.items() if k != "method"}


def run(config: RunConfig, out_root: Path, progress: bool = True,
        on_progress: Callable[[int, int, float], None] | None = None) -> RunResult:
    """Run one configuration to completion (resuming from its checkpoint if there is one)."""
    return Run(config, out_root, progress, on_progress).execute()
