"""SD-LoRA-KD: SD-LoRA that absorbs a new direction into the old ones when they already span it.

Not in the released code (specs/sdlora.md §4); built from the paper's Sec. 3.5, Eq. 7-8 and
Algorithm 1 lines 9-12. After training task t >= 1:

1. Fit the new task's update by the old directions, jointly over every adapted projection of
   every block (the magnitudes are shared across layers, so one coefficient per old task):
   ``delta = argmin || T_t - sum_k delta_k dir_k ||`` on the flattened vectors, where ``dir_k``
   are the normalised old directions and ``T_t`` is the new task's term without its magnitude
   (``dir_t`` for the paper variant; the official variant does not normalise the current term
   while it is current, so there ``T_t`` is the raw ``B_t A_t`` it applies).
2. Relative residual ``rho = ||T_t - sum delta_k dir_k|| / ||T_t||``. If ``rho <= tau`` (9e-4):
   fold the fit into the old magnitudes and drop the new pair (zero it now, leave it out of the
   frozen stack at the next task); otherwise keep it.

The fold (``kd_fold``): ``scaled`` (default) adds ``alpha_t * delta_k``, which keeps the
model's function (up to the residual): ``alpha_t T_t ~ sum (alpha_t delta_k) dir_k``;
``literal`` adds ``delta_k`` as Eq. 8 prints it. Folds go into a persistent offset per task
(effective magnitude ``alpha_k + offset_k``), because the official variant re-creates every
alpha at 0.8 at each task and would erase a fold made into alpha itself; with the paper's
carried-over magnitudes the two are the same. The least squares uses the r x r Gram blocks of
``lora.direction_gram`` in float64 (never the 14M-long vectors of ViT-B).

Every task's residual and decision goes into the result file (``method_log.kd``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from clbench.errors import ConfigError
from clbench.methods.base import Task, register_method
from clbench.methods.lora import direction_gram
from clbench.methods.sdlora import SDLoRA

FOLDS = ("scaled", "literal")


@register_method("sdlora_kd", title="SD-LoRA-KD", paper_row=8, magnitudes="magnitudes")
class SDLoRAKnowledgeDistillation(SDLoRA):
    @dataclass
    class Config(SDLoRA.Config):
        kd_threshold: float = 9e-4  # tau, on the relative residual of the fit
        kd_fold: str = "scaled"  # scaled: alpha_k += alpha_t * delta_k; literal: alpha_k += delta_k

    def __init__(self, backbone, config: Config, num_classes: int, num_tasks: int):
        super().__init__(backbone, config, num_classes, num_tasks)
        if config.kd_fold not in FOLDS:
            raise ConfigError(f"method.kd_fold '{config.kd_fold}' is unknown; use one of {list(FOLDS)}")
        if config.kd_threshold < 0:
            raise ConfigError(f"method.kd_threshold must be >= 0, got {config.kd_threshold}")
        self.register_buffer("magnitude_offsets", torch.zeros(0))  # what folds added, per task
        self.kd_records: list[dict[str, Any]] = []  # one per finished task

    def magnitude_vector(self) -> torch.Tensor:
        return super().magnitude_vector() + self.magnitude_offsets

    def keep_previous_direction(self) -> bool:
        return not (self.kd_records and self.kd_records[-1]["dropped"])

    def grow(self, task: Task) -> None:
        super().grow(task)
        self.magnitude_offsets = torch.cat([self.magnitude_offsets.to(self.layers[0].weight),
                                            self.layers[0].weight.new_zeros(1)])

    def end_task(self, task: Task) -> None:
        self.kd_records.append(self.distil(task.index))
        super().end_task(task)

    @torch.no_grad()
    def distil(self, t: int) -> dict[str, Any]:
        """Fit task t's term by the kept old directions; fold and drop it if the fit is close."""
        record: dict[str, Any] = {"task": t, "residual": None, "threshold": self.config.kd_threshold,
                                  "dropped": False, "fit_tasks": [], "delta": []}
        num_tasks = self.layers[0].num_tasks
        gram = direction_gram(self.layers, self.direction_scales, num_tasks)
        old = [k for k in range(t) if gram[k, k] > 0]  # tasks whose direction is still stored
        target_sq = gram[t, t]
        if not old or target_sq <= 0:  # nothing to fit with, or nothing to fit
            return record
        g_old = gram[old][:, old].cpu()
        g_target = gram[old, t].cpu()
        # min-norm least squares on the normal equations (gelsd also handles collinear old directions)
        delta = torch.linalg.lstsq(g_old, g_target[:, None], driver="gelsd").solution[:, 0]
        residual_sq = target_sq.cpu() - 2 * delta @ g_target + delta @ g_old @ delta
        residual = float((residual_sq.clamp_min(0) / target_sq.cpu()).sqrt())
        record.update(residual=residual, fit_tasks=old, delta=delta.tolist())
        if residual <= self.config.kd_threshold:
            scale = self.magnitude_vector()[t].item() if self.config.kd_fold == "scaled" else 1.0
            index = torch.tensor(old, device=self.magnitude_offsets.device)
            self.magnitude_offsets.index_add_(0, index, (scale * delta).to(self.magnitude_offsets))
            for layer in self.layers:  # the new direction is gone from now on
                for p in layer.projections:
                    layer.current_B[p].zero_()
            record["dropped"] = True
        return record

    def stored_params(self) -> int:
        return super().stored_params() + self.magnitude_offsets.numel()

    def get_extra_state(self) -> dict[str, Any]:
        return {"kd_records": self.kd_records}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.kd_records = list(state["kd_records"])

    def task_log(self, task: Task) -> dict[str, Any]:
        log = super().task_log(task)
        log["kd"] = self.kd_records[task.index] if task.index < len(self.kd_records) else None
        log["kd_dropped_tasks"] = [r["task"] for r in self.kd_records if r["dropped"]]
        return log
