"""Mirrors of a run's training curves (``--log tensorboard,wandb``).

The result file is the record: every epoch's mean loss, learning rate and time are in its
``TaskRecord.epochs`` whatever is logged. A logger only mirrors them, and the accuracy after each
task, to a live dashboard:

- ``tensorboard``: ``torch.utils.tensorboard.SummaryWriter`` event files in
  ``<out>/logs/<run key>/`` (``pip install clbench[tensorboard]``; ``tensorboard --logdir <out>/logs``);
- ``wandb``: one W&B run per clbench run, named by its key, with the run's configuration
  (``pip install clbench[wandb]``; ``WANDB_MODE=offline`` keeps it on disk for ``wandb sync``).

Scalars: ``train/loss/<stage>`` and ``train/lr/<stage>`` at the epoch's global index (epochs
counted over all tasks and stages), ``eval/acc`` (over every class seen, on what the run evaluates
on) and ``eval/train_time_s`` at the task. A missing package is a ``ConfigError`` naming the extra.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from clbench.config import LOGGERS, RunConfig
from clbench.errors import ConfigError


class CurveLoggers:
    """The loggers a run asked for; with none, every call does nothing."""

    def __init__(self, names: list[str], log_dir: Path, config: RunConfig, resumed_epochs: int = 0):
        self.step = resumed_epochs  # a resumed run continues its curves where they stopped
        self.writers: list[Any] = []
        for name in names:
            if name not in LOGGERS:
                raise ConfigError(f"--log {name}: unknown; use {', '.join(LOGGERS)}")
            self.writers.append(_tensorboard(log_dir) if name == "tensorboard" else _wandb(config, log_dir))

    def epoch(self, task: int, entry: dict[str, Any]) -> None:
        for writer in self.writers:
            writer.scalars({f"train/loss/{entry['stage']}": entry["loss"], f"train/lr/{entry['stage']}": entry["lr"],
                            "train/task": task}, self.step)
        self.step += 1

    def task(self, task: int, accuracy: float, train_time_s: float) -> None:
        for writer in self.writers:
            writer.scalars({"eval/acc": accuracy, "eval/train_time_s": train_time_s}, task + 1, axis="task")

    def close(self) -> None:
        for writer in self.writers:
            writer.close()
        self.writers = []


class _TensorBoard:
    def __init__(self, writer: Any):
        self.writer = writer

    def scalars(self, values: dict[str, float], step: int, axis: str = "epoch") -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def _tensorboard(log_dir: Path) -> _TensorBoard:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:  # torch's writer needs the tensorboard package
        raise ConfigError("--log tensorboard needs the tensorboard package: pip install 'clbench[tensorboard]'") from err
    log_dir.mkdir(parents=True, exist_ok=True)
    return _TensorBoard(SummaryWriter(log_dir=str(log_dir)))


class _Wandb:
    def __init__(self, run: Any):
        self.run = run

    def scalars(self, values: dict[str, float], step: int, axis: str = "epoch") -> None:
        self.run.log({**values, axis: step})

    def close(self) -> None:
        self.run.finish()


def _wandb(config: RunConfig, log_dir: Path) -> _Wandb:
    try:
        import wandb
    except ImportError as err:
        raise ConfigError("--log wandb needs the wandb package: pip install 'clbench[wandb]'") from err
    log_dir.mkdir(parents=True, exist_ok=True)
    run = wandb.init(project=os.environ.get("WANDB_PROJECT", "clbench"), name=config.key, dir=str(log_dir),
                     config=config.to_dict(), reinit=True)
    run.define_metric("epoch")
    run.define_metric("task")
    run.define_metric("train/*", step_metric="epoch")
    run.define_metric("eval/*", step_metric="task")
    return _Wandb(run)
