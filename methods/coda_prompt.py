"""CODA-Prompt (Smith et al., CVPR 2023), as its official code (``GT-RIPL/CODA-Prompt``) runs it.

At each of ``layers``, a pool of ``num_components`` prompt components ``P_m`` (``length`` tokens),
each with a key ``K_m`` and an attention vector ``A_m``. For the frozen backbone's [CLS] query
``q`` an image's prompt is ``sum_m alpha_m P_m`` with ``alpha_m = cos(q * A_m, K_m)`` (elementwise
product, then cosine; no softmax, no top-k), so it is per image and never depends on the batch.
Its first ``length / 2`` tokens are the key prefix and the rest the value prefix of that layer
(prefix-tuning, methods/prompts.py). The head reads the final [CLS]; the loss is cross-entropy
over the current task's classes (+ the optional orthogonality penalty).

Each task adds ``num_components // num_tasks`` components per layer (10 for 10 tasks) and trains
only those; earlier ones are frozen (the official code ``detach()``es them) and all are used at
test. Here each task's components are their own parameters, so the cost report counts what
exists, not the whole pool.

Initialisation of a task's new components (``init``):

* ``gram_schmidt`` (default; the current official code): random Gaussian rows made orthogonal
  to all earlier components (K, A and the flattened P separately) and to each other, unit norm.
  The official loop projects each new row on each earlier row in turn, which equals projecting
  out their span while earlier rows stay orthogonal; this projects out the span exactly.
* ``orthogonal`` (the paper's code, commit 22948d2): the whole pool drawn once with
  ``nn.init.orthogonal_`` at construction; task t takes its slice. The draw happens right after
  the run's seeding, so a resumed run draws the same pool.

Orthogonality penalty (``ortho_weight`` times ``mean((T Tᵀ - I)²)`` over K, A and flattened P of
the components in use, summed over layers): 0 in every shipped script of the current code (the
default). The paper's code used mu = 0.1 with an extra factor 1e-6 inside the penalty:
``ortho_weight: 1.0e-7`` with ``init: orthogonal`` reproduces it.

Sources, recipe provenance (SD-LoRA's PILOT config is the recipe's ``imr`` default) and
departures: ``docs/methods/coda_prompt.md``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from clbench.config import one_of
from clbench.errors import ConfigError
from clbench.methods.base import HEAD_INITS, Stage, Task, masked_cross_entropy, register_method
from clbench.methods.prompts import Prefix, PromptMethod, prompted_forward

INITS = ("gram_schmidt", "orthogonal")


def orthonormal_rows(n: int, dim: int, earlier: torch.Tensor | None) -> torch.Tensor:
    """``n`` unit rows of width ``dim``, Gram-Schmidt-orthogonal to each other and to the span of
    the rows of ``earlier`` (``[s, dim]``), drawn from the global torch RNG."""
    device = earlier.device if earlier is not None else None
    rows = torch.randn(n, dim, device=device)
    if earlier is not None and earlier.shape[0] > 0:
        basis, _ = torch.linalg.qr(earlier.t().float())  # [dim, s], orthonormal columns
        rows = rows - (rows @ basis) @ basis.t()
    q, r = torch.linalg.qr(rows.t())
    # Gram-Schmidt = QR with a positive diagonal of R: fix QR's sign convention to match it.
    return (q * torch.sign(torch.diagonal(r)).where(torch.diagonal(r) != 0, 1.0)).t().contiguous()


def ortho_penalty(t: torch.Tensor) -> torch.Tensor:
    """``mean((T Tᵀ - I)²)`` of the rows of ``t`` (flattened to ``[n, -1]``)."""
    t = t.flatten(1)
    return (t @ t.t() - torch.eye(t.shape[0], device=t.device, dtype=t.dtype)).pow(2).mean()


class ComponentPool(nn.Module):
    """One layer's components, keys and attention vectors, one parameter chunk per task."""

    def __init__(self, length: int, dim: int, reservoir_size: int | None = None):
        super().__init__()
        self.length, self.dim = length, dim
        self.components = nn.ParameterList()  # [n_t, length, dim] per task
        self.keys = nn.ParameterList()  # [n_t, dim] per task
        self.attention = nn.ParameterList()  # [n_t, dim] per task
        if reservoir_size is not None:  # the paper's code: one orthogonal draw of the whole pool
            shapes = {"components": (reservoir_size, length, dim), "keys": (reservoir_size, dim),
                      "attention": (reservoir_size, dim)}
            for name, shape in shapes.items():
                self.register_buffer(f"_reservoir_{name}", nn.init.orthogonal_(torch.empty(shape)),
                                     persistent=False)
        self.reservoir = reservoir_size is not None

    def size(self) -> int:
        return sum(k.shape[0] for k in self.keys)

    def grow(self, n: int) -> None:
        """Add ``n`` components (old ones frozen), initialised as the module docstring says."""
        start = self.size()
        for name in ("components", "keys", "attention"):
            plist: nn.ParameterList = getattr(self, name)
            for p in plist:
                p.requires_grad_(False)
            shape = (n, self.length, self.dim) if name == "components" else (n, self.dim)
            if self.reservoir:
                new = getattr(self, f"_reservoir_{name}")[start: start + n].clone()
            else:  # rows of P are compared flattened, as in the official code
                earlier = torch.cat([p.detach().flatten(1) for p in plist]) if len(plist) else None
                new = orthonormal_rows(n, math.prod(shape[1:]), earlier).view(shape)
            plist.append(nn.Parameter(new))

    def prompt(self, query: torch.Tensor) -> torch.Tensor:
        """Each image's prompt ``[B, length, dim]``: ``sum_m cos(q * A_m, K_m) P_m``."""
        keys, attention = torch.cat(list(self.keys)), torch.cat(list(self.attention))
        attended = F.normalize(query.unsqueeze(1) * attention.unsqueeze(0), dim=2)  # [B, M, D]
        alpha = (attended * F.normalize(keys, dim=1).unsqueeze(0)).sum(-1)  # [B, M]
        return torch.einsum("bm,mld->bld", alpha, torch.cat(list(self.components)))

    def penalty(self) -> torch.Tensor:
        return sum(ortho_penalty(torch.cat(list(getattr(self, n))))
                   for n in ("keys", "attention", "components"))


@register_method("coda_prompt", title="CODA-Prompt", paper_row=3)
class CodaPrompt(PromptMethod):
    @dataclass
    class Config:
        num_components: int = 100  # per layer, over all tasks: num_components // num_tasks per task
        length: int = 8  # prompt tokens per layer: length/2 key prefix + length/2 value prefix
        layers: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])
        ortho_weight: float = 0.0  # current official code 0; the paper's code 0.1 x 1e-6 = 1e-7
        init: str = one_of("gram_schmidt", INITS)  # gram_schmidt (current code) | orthogonal (the paper's code)
        head_init: str = one_of("torch_linear", HEAD_INITS)  # CODA's and PILOT's nn.Linear head; see init_head_rows

        def validate(self, num_tasks: int | None = None) -> None:
            if self.length < 2 or self.length % 2:
                raise ConfigError(f"method.length={self.length} must be even (half key, half value prefix)")
            if num_tasks is not None and self.num_components < num_tasks:
                raise ConfigError(f"method.num_components={self.num_components} gives no component per task for "
                                  f"{num_tasks} tasks; set method.num_components to at least {num_tasks}")

    def __init__(self, backbone: nn.Module, config: Config, num_classes: int, num_tasks: int):
        super().__init__(backbone, config, num_classes, num_tasks)
        c, d = config, self.embed_dim
        self.check_layers("layers", c.layers)
        self.per_task = c.num_components // num_tasks  # at least 1 (Config.validate)
        used = self.per_task * num_tasks
        if used > d:
            raise ConfigError(f"method.num_components: {used} components cannot have orthogonal keys of width "
                              f"{d}; set method.num_components to at most {d}")
        reservoir = used if c.init == "orthogonal" else None
        self.pools = nn.ModuleList([ComponentPool(c.length, d, reservoir) for _ in c.layers])

    def grow(self, task: Task) -> None:
        super().grow(task)
        for pool in self.pools:
            pool.grow(self.per_task)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        query = self.query(x)
        half = self.config.length // 2
        prefixes = {}
        for layer, pool in zip(self.config.layers, self.pools):
            p = pool.prompt(query)
            prefixes[layer] = Prefix(p[:, :half], p[:, half:])
        return self.head(prompted_forward(self.backbone, x, prefixes=prefixes).cls)

    def training_step(self, x: torch.Tensor, y: torch.Tensor, task: Task, stage: Stage) -> torch.Tensor:
        loss = masked_cross_entropy(self._forward(x), y, task, "current")
        if self.config.ortho_weight > 0:
            loss = loss + self.config.ortho_weight * sum(pool.penalty() for pool in self.pools)
        return loss

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self._forward(x)
