"""InfLoRA (Liang & Li, CVPR 2024): interference-free LoRA, as ``liangyanshuo/InfLoRA`` runs it.

Every block's K and V projections get one LoRA pair per task, all summed (no scaling):
``W = W0 + sum_k B_k A_k``. The down-projection ``A_t`` (the paper's B_t) is designed from
data and frozen; only the up-projection ``B_t`` (zeros at first) and task t's head train.

* **Before training task t** (``begin_task``): one pass over the task's training data gives each
  block's uncentred input second moment ``C = E[x x^T]`` (x: the qkv input, after norm1). The
  old-input subspace is projected out (``C - M M^T C`` with a 'remove' basis M, or ``M M^T C``
  with a 'retain' basis spanning the complement), and ``A_t`` is the top-r left singular
  vectors of the result, transposed and scaled by 1/sqrt(3). So task t's update
  ``B_t A_t x`` is ~0 on earlier tasks' inputs whatever ``B_t`` learns.
* **After training** (``end_task``): a second pass with the trained model updates the memory by
  DualGPM with the threshold ``eps_t = lambda_b + (lambda_e - lambda_b) * t / T``
  (``InputSubspace.update``); ``subspace: gpm`` is plain GPM (the official DomainNet variant).
* **Heads**: one linear head per task (``nn.Linear``'s default init, as the official
  ``classifier_pool``), trained with cross-entropy on its own task; concatenated at test.
* **Inference**: every branch merged into W0, one plain backbone pass.

Deviations, each deliberate: the moment passes read the training data un-augmented and in
order (``task.batches()``; the official code iterates its augmented, shuffled train loader);
after the first task the basis is always stored as 'remove' and switched to its complement
past half the dimension (the official first-task branch would label the top-r basis itself
'retain' when r >= d/2, which its own later assert rejects); when the free space has fewer
than r dimensions, the rows of A the data cannot fill are projected onto the free space (the
official code keeps whatever vectors the SVD returns for zero singular values, which may lie
in the protected space). In every other case this projection changes nothing.

The DualGPM bases are the method's stored statistics of past data and are reported as
``stored_features`` (SD-LoRA's Table 5 lists 0.10M for InfLoRA).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from clbench.config import one_of
from clbench.errors import ConfigError
from clbench.methods.base import HEAD_INITS, Stage, Task, masked_cross_entropy, register_method
from clbench.methods.lora import LoRAMethod, input_second_moments

SUBSPACES = ("dualgpm", "gpm", "none")


class InputSubspace(nn.Module):
    """The GPM/DualGPM memory of one block's input space.

    ``basis`` [d, k] is orthonormal. 'remove' type (``retain`` false): it spans the inputs of
    earlier tasks, which new down-projections must avoid. 'retain' type: it spans the
    complement, where new down-projections must lie. Its size is data: ``load_state_dict``
    resizes it to the checkpoint's.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim
        self.register_buffer("basis", torch.zeros(dim, 0, dtype=torch.float64))
        self.register_buffer("retain", torch.zeros((), dtype=torch.bool))

    def free_part(self, moment: torch.Tensor) -> torch.Tensor:
        """``moment`` with the protected directions projected out of its column space."""
        if self.basis.shape[1] == 0:
            return moment
        inside = self.basis @ (self.basis.t() @ moment)
        return inside if bool(self.retain) else moment - inside

    def protected_projector(self) -> torch.Tensor:
        """The orthogonal projector onto the protected (earlier tasks') input subspace."""
        inside = self.basis @ self.basis.t()
        return torch.eye(self.dim, dtype=inside.dtype, device=inside.device) - inside if bool(self.retain) else inside

    @torch.no_grad()
    def update(self, moment: torch.Tensor, threshold: float, dual: bool = True) -> None:
        """Grow the protected subspace to capture ``threshold`` of the energy of ``moment``
        (energy = squared singular values of the second moment, as the official code counts)."""
        moment = moment.to(self.basis)
        u, s, _ = torch.linalg.svd(moment)
        energy = s.pow(2)
        total = energy.sum()
        if total <= 0:
            return
        k = self.basis.shape[1]
        if k == 0 and not bool(self.retain):  # first task: the top directions up to the threshold
            r = int((torch.cumsum(energy, 0) / total < threshold).sum())
            self.basis = u[:, :max(r, 1)].contiguous()
        elif not bool(self.retain):  # add the residual's top directions until the threshold
            u_hat, s_hat, _ = torch.linalg.svd(moment - self.basis @ (self.basis.t() @ moment))
            ratio = s_hat.pow(2) / total
            captured = float((total - s_hat.pow(2).sum()) / total)
            r = 0
            while r < len(ratio) and captured < threshold:
                captured += float(ratio[r])
                r += 1
            if r:
                self.basis = torch.cat([self.basis, u_hat[:, :r]], 1)[:, : self.dim].contiguous()
        else:  # retain: shrink the free complement by the directions that now carry energy
            u_hat, s_hat, _ = torch.linalg.svd(self.basis @ (self.basis.t() @ moment))
            ratio = s_hat.pow(2) / total
            free = float(s_hat.pow(2).sum() / total)
            r = 0
            while r < min(len(ratio), k) and free >= 1 - threshold:
                free -= float(ratio[r])
                r += 1
            if r:
                rest = self.basis - u_hat[:, :r] @ (u_hat[:, :r].t() @ self.basis)
                self.basis = torch.linalg.svd(rest)[0][:, : k - r].contiguous()
        if dual and not bool(self.retain) and self.basis.shape[1] > self.dim / 2:
            # Past half the dimension, keep the (smaller) complement instead.
            full = torch.linalg.svd(self.basis)[0]
            self.basis = full[:, self.basis.shape[1]:].contiguous()
            self.retain.fill_(True)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        incoming = state_dict.get(prefix + "basis")
        if incoming is not None and incoming.shape != self.basis.shape:
            self.basis = self.basis.new_empty(incoming.shape)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)


@register_method("inflora", title="InfLoRA", paper_row=5)
class InfLoRA(LoRAMethod):
    @dataclass
    class Config:
        rank: int = 10  # 10 (ImageNet-R, CIFAR), 30 (DomainNet)
        projections: list[str] = field(default_factory=lambda: ["k", "v"])
        lambda_begin: float = 0.98  # lamb: 0.98 ImageNet-R, 0.95 CIFAR-100 and DomainNet
        lambda_end: float = 1.0  # lame
        subspace: str = one_of("dualgpm", SUBSPACES)  # dualgpm | gpm (official DomainNet variant) | none (ablation)
        head_lr: float | None = None  # own lr for the head (DomainNet: fc_lrate 0.01); None: train.lr
        head_init: str = one_of("torch_linear", HEAD_INITS)  # the official classifier_pool of nn.Linear

    def __init__(self, backbone: nn.Module, config: Config, num_classes: int, num_tasks: int):
        if config.rank < 1:
            raise ConfigError(f"method.rank must be >= 1, got {config.rank}")
        if not 0 < config.lambda_begin <= config.lambda_end <= 1:
            raise ConfigError(f"need 0 < method.lambda_begin <= method.lambda_end <= 1, got "
                              f"{config.lambda_begin}, {config.lambda_end}")
        super().__init__(backbone, config, num_classes, num_tasks, config.projections)
        self.subspaces = nn.ModuleList(InputSubspace(layer.in_features) for layer in self.layers)

    def grow(self, task: Task) -> None:
        super().grow(task)
        for layer in self.layers:  # A is designed in begin_task and never trained
            layer.add_task(self.config.rank, train_down=False)

    def threshold(self, t: int) -> float:
        c = self.config
        return c.lambda_begin + (c.lambda_end - c.lambda_begin) * t / self.num_tasks

    def _moments(self, task: Task) -> list[torch.Tensor]:
        return input_second_moments(self.backbone, self.layers, task.batches(), task.autocast)

    @torch.no_grad()
    def begin_task(self, task: Task) -> None:
        super().begin_task(task)
        rank = self.config.rank
        for layer, memory, moment in zip(self.layers, self.subspaces, self._moments(task)):
            # subspace 'none' never stores a basis, so the projections below change nothing there
            down = torch.linalg.svd(memory.free_part(moment))[0][:, :rank].t()
            # Rows past the rank of the projected moment (a free space smaller than r) are
            # arbitrary SVD vectors; keep only their free part so they never act on old inputs.
            down = down - down @ memory.protected_projector()
            down = (down / math.sqrt(3)).to(layer.weight)
            for p in layer.projections:
                layer.current_A[p].copy_(down)

    def param_groups(self, task: Task, stage: Stage) -> list[dict[str, Any]]:
        head = {"params": self.head.task_parameters(task.index)}
        if self.config.head_lr is not None:
            head["lr"] = self.config.head_lr
        return [{"params": self.trainable_lora()}, head]

    def training_step(self, x: torch.Tensor, y: torch.Tensor, task: Task, stage: Stage) -> torch.Tensor:
        return masked_cross_entropy(self.head(self.backbone(x)), y, task, "current")

    @torch.no_grad()
    def end_task(self, task: Task) -> None:
        if self.config.subspace != "none":
            threshold = self.threshold(task.index)
            for memory, moment in zip(self.subspaces, self._moments(task)):
                memory.update(moment, threshold, dual=self.config.subspace == "dualgpm")
        super().end_task(task)

    def stored_features(self) -> int:
        return sum(m.basis.numel() for m in self.subspaces)

    def task_log(self, task: Task) -> dict[str, Any]:
        return {"threshold": self.threshold(task.index),
                "subspace_dims": [int(m.basis.shape[1]) for m in self.subspaces],
                "subspace_types": ["retain" if bool(m.retain) else "remove" for m in self.subspaces]}
