"""Per-task low-rank updates on timm's fused ``qkv`` projection (shared by SD-LoRA and InfLoRA).

``LoRAQKV`` subclasses the ``nn.Linear`` it replaces and keeps that Linear's ``weight`` and
``bias`` under their original names, so the backbone's state-dict keys, its pretrained-weight
bookkeeping and timm's ``Attention.forward`` (which just calls ``self.qkv(x)``) are untouched.
It adds, to each chosen slice of the fused output (``q``, ``k``, ``v``), one low-rank pair per
task: ``A_k`` (rank x d_in, the default ``nn.Linear`` init, or given) and ``B_k`` (d_out x rank,
zeros), with no alpha/r scaling. The weight a forward uses is

    W_p = W0_p + sum_k  c_k * B_k A_k          for every adapted projection p,

where the coefficients ``c_k`` are the method's (SD-LoRA: magnitude over norm; InfLoRA: 1).

Why the update is formed in weight space. The official SD-LoRA code runs every old branch
separately on every token, so a step at task t costs O(t * tokens * rank * d) more than at task
1 and keeps t branches of activations for backward (its users run out of 24 GB after about six
tasks). Here the frozen pairs of all earlier tasks are kept stacked as one factor pair per
projection and the whole update is materialised once per step, ``(B * c) @ A``, which costs
O(d^2 * total rank) whatever the batch size, and the forward is one plain ``F.linear``: at
inference (and in a training forward) the per-token cost and the activation memory are those of
the plain backbone at every task.

Training is not free: gradients are needed for the factors and coefficients. Left to autograd,
the fused ``F.linear`` would compute the weight gradient ``g^T x`` of all three slices (2 *
tokens * 3d * d FLOPs; the untouched K slice included), more work than the official branches
at early tasks. ``AdaptedQKV`` (a custom autograd function) instead computes, per adapted slice
``p``, only what the factors need from the saved input ``x`` and the output gradient ``g_p``:
``u = x A^T`` and ``v = g_p B`` (tokens x rank), then ``dB = (g_p^T u) c``, ``dA = c (v^T x)``
and ``dc = sum(u * v)`` over the tokens, the frozen rows' part only when their coefficients
need a gradient. Per token that is 8 * d * rank for the current pair (the official branch: 12)
and 4 * d * rank for the frozen rows (official: 8), plus the input gradient ``g W`` that both
pay. Where the total rank is large next to d (a small model late in a sequence) it instead
forms the slice's own weight gradient ``g_p^T x`` once (2 * tokens * d^2) and takes the factor
gradients from it, whichever costs fewer FLOPs (``_dense_is_cheaper``); both are exact. It saves what ``F.linear`` saves (the input and the adapted weight), so the activation
memory stays that of the plain backbone. ``clbench speed`` prints both FLOP counts
(the official form's through ``official_branch_form``).

After a task, ``merged_copy(model)`` gives a plain timm model (every ``LoRAQKV`` replaced by an
``nn.Linear`` holding ``W0 + sum_k c_k B_k A_k``) for inference at the backbone's cost.
"""
from __future__ import annotations

import copy
import math
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from clbench.errors import ConfigError
from clbench.methods.base import CLMethod, ExpandingLinear, Task

PROJECTIONS = ("q", "k", "v")  # the three slices of timm's fused qkv output, in order

# (layer, projection) -> coefficients of (every frozen rank row [R], the current pair [] or [r]).
Coefficients = Callable[["LoRAQKV", str], tuple[torch.Tensor, torch.Tensor]]


def _scaled(b: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
    """``B`` with its columns (rank rows) multiplied by the coefficients ``c`` ([] or [r])."""
    return b if c is None else b * c.to(b.dtype)


def _branch(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
    """One branch of the official code: ``c * (x A^T) B^T`` (``c`` scales the rank rows)."""
    h = F.linear(x, a)
    return F.linear(h if c is None else h * c.to(h.dtype), b)


def low_rank_update(a_cur: torch.Tensor, b_cur: torch.Tensor, c_cur: torch.Tensor | None,
                    a_old: torch.Tensor, b_old: torch.Tensor, c_old: torch.Tensor | None) -> torch.Tensor:
    """``(B_cur c_cur) A_cur + (B_old c_old) A_old`` [d_out, d_in]: one matmul for the current
    pair and one for all frozen rows together (empty frozen rows add zeros). The frozen buffers
    enter their matmul as they are, so backward keeps no per-step copy of them."""
    return torch.addmm(_scaled(b_cur, c_cur) @ a_cur, _scaled(b_old, c_old), a_old)


def add_to_slices(weight: torch.Tensor, updates: dict[str, torch.Tensor], proj_dim: int) -> torch.Tensor:
    """The fused weight with ``updates[p]`` added to the rows of each projection ``p``."""
    slices = weight.split(proj_dim, 0)
    return torch.cat([w + updates[p] if p in updates else w for p, w in zip(PROJECTIONS, slices)], 0)


def _pair_grads(x: torch.Tensor, g: torch.Tensor, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor | None,
                need: tuple[bool, bool, bool]) -> tuple[torch.Tensor | None, ...]:
    """Gradients of ``(a, b, c)`` for the update ``(b c) a`` of one slice, from its input ``x``
    [tokens, d_in] and output gradient ``g`` [tokens, d_out], never forming ``g^T x``:
    ``u = x a^T``, ``v = g b`` (tokens x r), ``db = (g^T u) c``, ``da = c (v^T x)``,
    ``dc = sum over tokens of u * v``."""
    need_a, need_b, need_c = need
    if not a.shape[0] or not any(need):
        return None, None, None
    u = x @ a.t().to(x.dtype) if need_b or need_c else None  # [tokens, r]
    v = g @ b.to(g.dtype) if need_a or need_c else None  # [tokens, r]
    acc = torch.promote_types(x.dtype, torch.float32)  # scaling and the token sums: at least float32
    scale = None if c is None else c.to(acc)
    grad_a = grad_b = grad_c = None
    if need_b:
        grad_b = (g.t() @ u).to(acc)
        grad_b = (grad_b if scale is None else grad_b * scale).to(b.dtype)
    if need_a:
        grad_a = (v.t() @ x).to(acc)
        grad_a = (grad_a if scale is None else grad_a * scale.reshape(-1, 1)).to(a.dtype)
    if need_c and c is not None:
        grad_c = (u.to(acc) * v.to(acc)).sum(0).sum_to_size(c.shape).to(c.dtype)
    return grad_a, grad_b, grad_c


def _pair_grads_dense(grad_w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor | None,
                      need: tuple[bool, bool, bool]) -> tuple[torch.Tensor | None, ...]:
    """The same gradients from the slice's weight gradient ``G = g^T x`` [d_out, d_in]:
    ``db = (G a^T) c``, ``da = c (b^T G)``, ``dc = sum over rows of (G a^T) * b``."""
    need_a, need_b, need_c = need
    if not a.shape[0] or not any(need):
        return None, None, None
    acc = grad_w.dtype
    scale = None if c is None else c.to(acc)
    grad_a = grad_b = grad_c = None
    ga = grad_w @ a.t().to(acc) if need_b or need_c else None  # [d_out, r]
    if need_b:
        grad_b = (ga if scale is None else ga * scale).to(b.dtype)
    if need_a:
        grad_a = b.t().to(acc) @ grad_w
        grad_a = (grad_a if scale is None else grad_a * scale.reshape(-1, 1)).to(a.dtype)
    if need_c and c is not None:
        grad_c = (ga * b.to(acc)).sum(0).sum_to_size(c.shape).to(c.dtype)
    return grad_a, grad_b, grad_c


def _dense_is_cheaper(tokens: int, d_out: int, d_in: int, r_cur: int, r_old: int,
                      need: tuple[bool, ...]) -> bool:
    """Whether forming the slice's weight gradient ``g^T x`` once costs fewer FLOPs than the
    per-token low-rank products (many tokens per rank row favour the low-rank form, as on
    ViT-B; a small model with a large total rank favours the dense one)."""
    cur, old = any(need[:3]), any(need[3:])
    low = (cur * 8 * r_cur + old * 4 * r_old) * tokens * max(d_in, d_out)
    dense = 2 * tokens * d_out * d_in + (cur * 4 * r_cur + old * 2 * r_old) * d_out * d_in
    return dense < low


class AdaptedQKV(torch.autograd.Function):
    """``F.linear(x, W0 + U, bias)`` where ``U`` adds ``low_rank_update`` to each adapted slice
    of the fused qkv weight, with a backward that computes only the gradients the factors and
    coefficients need (see the module docstring for the FLOPs).

    Inputs: ``x``, ``weight``, ``bias``, the adapted projections' names, the slice size, then six
    tensors per projection: ``A_cur, B_cur, c_cur, A_old, B_old, c_old`` (a coefficient may be
    ``None``: 1). The forward is the very computation of ``LoRAQKV.adapted_weight`` + ``F.linear``,
    so outputs are bit-identical to it; gradients equal autograd's through it up to rounding.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, projections, proj_dim, *factors):
        # The update in float32 even under bf16 autocast: it is small next to W0 and is rounded
        # once, with W0, when F.linear casts the sum; a bf16 update would be rounded twice.
        with torch.autocast(x.device.type, enabled=False):
            updates = {p: low_rank_update(*factors[6 * i: 6 * i + 6]) for i, p in enumerate(projections)}
            w = add_to_slices(weight, updates, proj_dim)
        y = F.linear(x, w, bias)  # under the caller's autocast, if any: y has the compute dtype
        ctx.projections, ctx.proj_dim, ctx.x_dtype = projections, proj_dim, x.dtype
        ctx.has_bias = bias is not None
        # what F.linear itself would keep for backward: the input and the weight, as computed
        ctx.save_for_backward(x.to(y.dtype), w.to(y.dtype), *factors)
        return y

    @staticmethod
    def backward(ctx, grad_out):
        x, w, *factors = ctx.saved_tensors
        need = ctx.needs_input_grad
        with torch.autocast(grad_out.device.type, enabled=False):
            g = grad_out.to(w.dtype)
            grad_x = (g @ w).to(ctx.x_dtype) if need[0] else None
            g2, x2 = g.reshape(-1, g.shape[-1]), x.reshape(-1, x.shape[-1])
            grad_w = (g2.t() @ x2).to(w.dtype) if need[1] else None  # W0 is frozen in every method here
            grad_bias = g2.sum(0) if need[2] and ctx.has_bias else None
            grads: list[torch.Tensor | None] = []
            for i, p in enumerate(ctx.projections):
                a_cur, b_cur, c_cur, a_old, b_old, c_old = factors[6 * i: 6 * i + 6]
                n = need[5 + 6 * i: 11 + 6 * i]
                slot = PROJECTIONS.index(p)
                gp = g2[:, slot * ctx.proj_dim: (slot + 1) * ctx.proj_dim]
                if _dense_is_cheaper(x2.shape[0], gp.shape[1], x2.shape[1], a_cur.shape[0], a_old.shape[0], n):
                    grad_wp = (gp.t() @ x2).to(torch.promote_types(x2.dtype, torch.float32))
                    ga, gb, gc = _pair_grads_dense(grad_wp, a_cur, b_cur, c_cur, (n[0], n[1], n[2]))
                    gao, gbo, gco = _pair_grads_dense(grad_wp, a_old, b_old, c_old, (n[3], n[4], n[5]))
                else:
                    ga, gb, gc = _pair_grads(x2, gp, a_cur, b_cur, c_cur, (n[0], n[1], n[2]))
                    gao, gbo, gco = _pair_grads(x2, gp, a_old, b_old, c_old, (n[3], n[4], n[5]))
                if n[5] and gco is None and c_old is not None:  # no frozen rows yet
                    gco = torch.zeros_like(c_old)
                grads += [ga, gb, gc, gao, gbo, gco]
        return (grad_x, grad_w, grad_bias, None, None, *grads)


class LoRAQKV(nn.Linear):
    """A fused ``qkv`` Linear with per-task low-rank updates on some of its projections.

    Storage per adapted projection ``p``: the frozen pairs of finished tasks stacked as the
    buffers ``frozen_A_<p>`` [R, d_in] and ``frozen_B_<p>`` [d_out, R] (``frozen_task`` [R]
    names the task of every rank row), and the current task's trainable pair
    ``current_A[p]`` [r, d_in], ``current_B[p]`` [d_out, r]. ``coefficients`` (set by the
    method; ``None`` = all ones) scales the frozen rank rows and the current pair.

    The frozen stacks are data, not structure: ``load_state_dict`` resizes them to the
    checkpoint's shapes, so a method that drops directions (SD-LoRA-KD) restores exactly.
    """

    def __init__(self, qkv: nn.Linear, projections: Sequence[str]):
        if qkv.out_features % 3:
            raise ValueError(f"expected a fused qkv Linear (out_features divisible by 3), got {qkv}")
        unknown = [p for p in projections if p not in PROJECTIONS]
        if unknown or not projections or len(set(projections)) != len(projections):
            raise ValueError(f"projections must be distinct names among {PROJECTIONS}, got {list(projections)}")
        super().__init__(qkv.in_features, qkv.out_features, bias=qkv.bias is not None, device="meta")
        self.weight = qkv.weight  # adopt the pretrained tensors: same names, no copy
        self.bias = qkv.bias
        self.projections = tuple(p for p in PROJECTIONS if p in projections)
        self.proj_dim = qkv.out_features // 3
        self.num_tasks = 0  # pairs added so far; the last one is the current task's
        self.coefficients: Coefficients | None = None
        self.current_A = nn.ParameterDict()
        self.current_B = nn.ParameterDict()
        ref = qkv.weight
        for p in self.projections:
            self.register_buffer(f"frozen_A_{p}", ref.new_zeros(0, self.in_features))
            self.register_buffer(f"frozen_B_{p}", ref.new_zeros(self.proj_dim, 0))
        self.register_buffer("frozen_task", torch.zeros(0, dtype=torch.long, device=ref.device))

    # -- structure -------------------------------------------------------------------------

    def add_task(self, rank: int, keep_previous: bool = True, train_down: bool = True) -> None:
        """Freeze the current pair into the stacks (or drop it: ``keep_previous=False``) and
        start a new one: A with ``nn.Linear``'s default init, B zeros (the update starts at 0).
        ``train_down=False`` freezes A (InfLoRA designs it from data in ``begin_task``)."""
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        if self.num_tasks and keep_previous:
            previous = self.num_tasks - 1
            r = self.current_A[self.projections[0]].shape[0]
            for p in self.projections:
                self._set_frozen(p, torch.cat([self.frozen_A(p), self.current_A[p].detach()], 0),
                                 torch.cat([self.frozen_B(p), self.current_B[p].detach()], 1))
            self.frozen_task = torch.cat([self.frozen_task, self.frozen_task.new_full((r,), previous)])
        ref = self.weight
        for p in self.projections:
            a = torch.empty(rank, self.in_features, device=ref.device, dtype=ref.dtype)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # nn.Linear's default: U(+-1/sqrt(d_in))
            self.current_A[p] = nn.Parameter(a, requires_grad=train_down)
            self.current_B[p] = nn.Parameter(ref.new_zeros(self.proj_dim, rank))
        self.num_tasks += 1

    def frozen_A(self, p: str) -> torch.Tensor:
        return getattr(self, f"frozen_A_{p}")

    def frozen_B(self, p: str) -> torch.Tensor:
        return getattr(self, f"frozen_B_{p}")

    def _set_frozen(self, p: str, a: torch.Tensor, b: torch.Tensor) -> None:
        setattr(self, f"frozen_A_{p}", a)  # assigning a tensor to a buffer name keeps it a buffer
        setattr(self, f"frozen_B_{p}", b)

    @property
    def current_rank(self) -> int:
        return self.current_A[self.projections[0]].shape[0] if self.num_tasks else 0

    def factors(self, p: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """All rank rows of projection ``p``, frozen then current: A [R, d_in], B [d_out, R] and
        the task of every row [R]."""
        if not self.num_tasks:
            raise RuntimeError("no LoRA pair yet: call add_task first")
        a = torch.cat([self.frozen_A(p), self.current_A[p]], 0)
        b = torch.cat([self.frozen_B(p), self.current_B[p]], 1)
        tasks = torch.cat([self.frozen_task, self.frozen_task.new_full((self.current_rank,), self.num_tasks - 1)])
        return a, b, tasks

    # -- the adapted weight -------------------------------------------------------------------

    def coefficients_of(self, p: str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``(frozen rows [R], current pair [] or [r])`` coefficients of projection ``p``; ``None``
        for 1 (no multiplication at all)."""
        return (None, None) if self.coefficients is None else self.coefficients(self, p)

    def delta_weight(self, p: str) -> torch.Tensor:
        """``sum_k c_k B_k A_k`` for projection ``p``: one matmul for the current pair and one
        for all frozen rows together, whatever the number of tasks (``low_rank_update``)."""
        c_old, c_cur = self.coefficients_of(p)
        return low_rank_update(self.current_A[p], self.current_B[p], c_cur, self.frozen_A(p), self.frozen_B(p), c_old)

    def adapted_weight(self) -> torch.Tensor:
        """The fused weight this layer applies: W0 plus the update of every adapted slice."""
        if not self.num_tasks:
            return self.weight
        with torch.autocast(self.weight.device.type, enabled=False):  # see AdaptedQKV.forward
            updates = {p: self.delta_weight(p) for p in self.projections}
            return add_to_slices(self.weight, updates, self.proj_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.num_tasks:
            return F.linear(x, self.weight, self.bias)
        factors: list[torch.Tensor | None] = []
        for p in self.projections:
            c_old, c_cur = self.coefficients_of(p)
            factors += [self.current_A[p], self.current_B[p], c_cur, self.frozen_A(p), self.frozen_B(p), c_old]
        return AdaptedQKV.apply(x, self.weight, self.bias, self.projections, self.proj_dim, *factors)

    def branch_forward(self, x: torch.Tensor) -> torch.Tensor:
        """What ``forward`` computes, in the official code's form: ``x W0^T + b``, then on each
        adapted slice ``c * (x A^T) B^T`` for the current pair and for the frozen pairs (one
        branch per earlier task in the official code: the same matmuls, stacked), with no weight
        update formed (SD-LoRA's ``_LoRA_qkv_timm_train.forward``, InfLoRA's ``Attention_LoRA``).
        For counting that form's FLOPs (``official_branch_form``), not for training."""
        y = F.linear(x, self.weight, self.bias)
        if not self.num_tasks:
            return y
        parts = list(y.split(self.proj_dim, -1))
        for p in self.projections:
            c_old, c_cur = self.coefficients_of(p)
            i = PROJECTIONS.index(p)
            parts[i] = (parts[i] + _branch(x, self.current_A[p], self.current_B[p], c_cur)
                        + _branch(x, self.frozen_A(p), self.frozen_B(p), c_old))
        return torch.cat(parts, -1)

    @torch.no_grad()
    def merged_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` computing what this layer computes now (shares the bias)."""
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        out.weight = nn.Parameter(self.adapted_weight().detach().clone(), requires_grad=False)
        out.bias = self.bias
        return out

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, projections={''.join(self.projections)}, tasks={self.num_tasks}, "
                f"frozen_rank={self.frozen_task.numel()}")

    # -- checkpoints ----------------------------------------------------------------------------

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # Size the frozen stacks from the checkpoint: how many rows were kept is data.
        for name in [f"frozen_{f}_{p}" for p in self.projections for f in "AB"] + ["frozen_task"]:
            incoming = state_dict.get(prefix + name)
            mine = getattr(self, name)
            if incoming is not None and incoming.shape != mine.shape:
                setattr(self, name, mine.new_empty(incoming.shape))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)


# ------------------------------------------------------------------------------ model surgery


def attach_lora(model: nn.Module, projections: Sequence[str]) -> list[LoRAQKV]:
    """Replace the fused ``qkv`` Linear of every attention module of a timm model by a
    ``LoRAQKV``; returns them in block order. Works on any timm ViT with a fused qkv."""
    wrapped: list[LoRAQKV] = []
    for module in list(model.modules()):
        qkv = getattr(module, "qkv", None)
        if isinstance(qkv, nn.Linear) and not isinstance(qkv, LoRAQKV):
            module.qkv = LoRAQKV(qkv, projections)
            wrapped.append(module.qkv)
    if not wrapped:
        raise ValueError(f"{type(model).__name__} has no attention module with a fused `qkv` Linear; "
                         f"LoRA here needs a timm ViT such as vit_base_patch16_224")
    return wrapped


def lora_layers(model: nn.Module) -> list[LoRAQKV]:
    return [m for m in model.modules() if isinstance(m, LoRAQKV)]


@contextmanager
def official_branch_form(model: nn.Module) -> Iterator[list[LoRAQKV]]:
    """While active, every ``LoRAQKV`` of ``model`` runs ``branch_forward``: for counting the
    official code's FLOPs on the same model, parameters and batch (``clbench speed``'s
    official GFLOP/img). Yields the layers."""
    layers = lora_layers(model)
    for layer in layers:
        layer.forward = layer.branch_forward  # an instance attribute: nn.Module.__call__ takes it
    try:
        yield layers
    finally:
        for layer in layers:
            del layer.forward


@torch.no_grad()
def merged_copy(model: nn.Module) -> nn.Module:
    """A plain copy of ``model`` for inference: every ``LoRAQKV`` becomes an ``nn.Linear`` with
    its current adapted weight. Every other tensor is shared with ``model`` (all frozen), so
    the copy costs only the qkv weights, and a forward costs exactly the plain backbone's."""
    memo: dict[int, object] = {id(m): m.merged_linear() for m in lora_layers(model)}
    for tensor in list(model.parameters()) + list(model.buffers()):
        memo.setdefault(id(tensor), tensor)
    plain = copy.deepcopy(model, memo)
    for module in plain.modules():
        # A compiled module's forward is bound to the original (deepcopy keeps functions as
        # they are), so the copy would run the training modules: the copy runs eagerly instead.
        if getattr(module, "_compiled_call_impl", None) is not None:
            module._compiled_call_impl = None
    return plain.eval().requires_grad_(False)


# ------------------------------------------------------------------------------ math helpers


def per_task_sum(values: torch.Tensor, row_task: torch.Tensor, num_tasks: int) -> torch.Tensor:
    """Sum per task of per-row values (differentiable, a fixed number of kernels whatever t)."""
    return values.new_zeros(num_tasks).index_add(0, row_task, values)


def factor_sq_norms(a: torch.Tensor, b: torch.Tensor, row_task: torch.Tensor,
                    num_tasks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``||A_k||_F^2`` and ``||B_k||_F^2`` of every task from the stacked rows."""
    return (per_task_sum(a.pow(2).sum(1), row_task, num_tasks),
            per_task_sum(b.pow(2).sum(0), row_task, num_tasks))


def product_sq_norms(a: torch.Tensor, b: torch.Tensor, row_task: torch.Tensor,
                     num_tasks: int) -> torch.Tensor:
    """``||B_k A_k||_F^2`` of every task without forming the d_out x d_in products:
    ``||B A||^2 = sum((B^T B) * (A A^T))`` over each task's diagonal block of rank rows."""
    gram = (b.t() @ b) * (a @ a.t())
    same_task = row_task[:, None] == row_task[None, :]
    return per_task_sum((gram * same_task).sum(1), row_task, num_tasks)


def safe_norm(sq_norm: torch.Tensor) -> torch.Tensor:
    """``sqrt`` of squared norms, with 1 where a norm is 0: a zero update (B still at its zero
    init, or a dropped direction) has no direction, contributes 0 either way, and its gradient
    is then that of the unnormalised term instead of NaN."""
    return torch.where(sq_norm > 0, sq_norm, torch.ones_like(sq_norm)).sqrt()


def projection_gram(layer: LoRAQKV, p: str, scales: Coefficients, num_tasks: int,
                    dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``G[j, k] = <D_j, D_k>`` for one projection ``p`` of one layer, where ``D_k`` =
    ``sum over task k's rows of row_scale * B_row A_row`` (``scales`` gives the row scales of
    the frozen rows and of the current pair). From r x r blocks, never forming the matrices."""
    a, b, tasks = (t.detach() for t in layer.factors(p))
    s_old, s_cur = (s.detach().to(dtype) for s in scales(layer, p))
    b = b.to(dtype) * torch.cat([s_old, s_cur.expand(layer.current_rank)])
    a = a.to(dtype)
    rows = (b.t() @ b) * (a @ a.t())  # [R, R]: <b_i a_i^T, b_j a_j^T>
    onehot = F.one_hot(tasks, num_tasks).to(dtype)  # [R, T]
    return onehot.t() @ rows @ onehot


def direction_gram(layers: Sequence[LoRAQKV], scales: Coefficients, num_tasks: int,
                   dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``G[j, k] = <D_j, D_k>`` where ``D_k`` is task k's update over all adapted projections of
    all layers, flattened into one vector: the sum of every ``projection_gram``. For ViT-B with
    20 tasks the explicit matrix would be 20 x 14M floats. In float64, so that residuals down
    to ~1e-7 of the norm survive the cancellation in ``|T|^2 - 2 x.b + x.Gx``."""
    gram = torch.zeros(num_tasks, num_tasks, dtype=dtype, device=layers[0].weight.device)
    for layer in layers:
        for p in layer.projections:
            gram += projection_gram(layer, p, scales, num_tasks, dtype)
    return gram


# ------------------------------------------------------------------------------ input statistics


@contextmanager
def recording_input_moments(layers: Sequence[nn.Module]) -> Iterator[list[torch.Tensor]]:
    """While active, every forward through ``layers`` adds its input's uncentred second moment
    (sum over all tokens of x x^T, in float64) to the yielded accumulators; after the ``with``
    block they hold the means E[x x^T] (InfLoRA's per-block input statistics)."""
    sums = [torch.zeros(m.in_features, m.in_features, dtype=torch.float64, device=m.weight.device)
            for m in layers]
    counts = [0] * len(layers)

    def hook(i: int):
        def record(module, inputs):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float()
            sums[i].add_((x.t() @ x).double())
            counts[i] += x.shape[0]
        return record

    handles = [m.register_forward_pre_hook(hook(i)) for i, m in enumerate(layers)]
    try:
        yield sums
    finally:
        for h in handles:
            h.remove()
        for i, n in enumerate(counts):
            if n:
                sums[i].div_(n)


@torch.no_grad()
def input_second_moments(model: nn.Module, layers: Sequence[nn.Module],
                         batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                         autocast: Callable = None) -> list[torch.Tensor]:
    """E[x x^T] over every token of the input of each of ``layers``, one pass of ``model``
    over ``batches`` (in eval mode; the mode is restored)."""
    was_training = model.training
    model.eval()
    try:
        with recording_input_moments(layers) as moments:
            for x, _ in batches:
                if autocast is not None:
                    with autocast():
                        model(x)
                else:
                    model(x)
    finally:
        model.train(was_training)
    return moments


# ------------------------------------------------------------------------------ methods on top


class LoRAMethod(CLMethod):
    """What SD-LoRA and InfLoRA share: a frozen backbone whose qkv layers carry per-task LoRA
    pairs (``self.layers``), an expanding head (``self.head``), and inference through a merged
    copy of the backbone: one plain ViT forward per test image, built after each task.

    The merged copy is a cache, never state: it is dropped whenever the weights may change
    (``grow``, ``begin_task``, ``train()``, ``load_state_dict``) and rebuilt on demand.
    """

    def __init__(self, backbone: nn.Module, config: Any, num_classes: int, num_tasks: int,
                 projections: Sequence[str]):
        super().__init__(backbone, config, num_classes, num_tasks)
        self.freeze_backbone()
        try:
            self.layers: list[LoRAQKV] = attach_lora(backbone, projections)
        except ValueError as err:
            raise ConfigError(f"method.projections / backbone: {err}") from err
        self.head = ExpandingLinear(self.feature_dim, init=config.head_init)  # each Config names its own
        self._cache: dict[str, Any] = {}

    def grow(self, task: Task) -> None:
        super().grow(task)
        self.head.grow(task.num_new, freeze_old=True)  # the current-task loss gives old rows no gradient
        self._cache.clear()

    def begin_task(self, task: Task) -> None:
        self._cache.clear()

    def trainable_lora(self) -> list[nn.Parameter]:
        """The current task's trainable factors in every layer."""
        return [param for layer in self.layers for d in (layer.current_A, layer.current_B)
                for param in d.values() if param.requires_grad]

    def end_task(self, task: Task) -> None:
        self._cache.clear()
        self.inference_backbone()  # merge now, outside the protocol's FLOP count of predict

    def inference_backbone(self) -> nn.Module:
        """The backbone with every task's update folded into W0: a plain timm ViT."""
        where = (self.layers[0].weight.device, self.layers[0].weight.dtype)  # .to() does not clear the cache
        if self._cache.get("inference") is None or self._cache.get("where") != where:
            self._cache.update(inference=merged_copy(self.backbone), where=where)
        return self._cache["inference"]

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:  # mid-training a merged copy would go stale; compute unmerged
            return self.predict_unmerged(x)
        return self.head(self.inference_backbone()(x))

    @torch.no_grad()
    def predict_unmerged(self, x: torch.Tensor) -> torch.Tensor:
        """The training-time computation (W0 plus the stacked update formed per forward)."""
        return self.head(self.backbone(x))

    def train(self, mode: bool = True):
        if mode:
            self._cache.clear()
        return super().train(mode)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        self._cache.clear()
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def stored_params(self) -> int:
        frozen = sum(layer.frozen_A(p).numel() + layer.frozen_B(p).numel()
                     for layer in self.layers for p in layer.projections)
        return super().stored_params() + frozen
