"""``AdaptedQKV``, the LoRA layer's autograd function (methods/lora.py), against today's weight-space
formula written out here, and its training FLOPs against the official code's branch form.

``weight_space_reference`` is the formula ``LoRAQKV.forward`` applied before the custom backward:
``F.linear(x, cat(W0_p + (B_cur c_cur) A_cur + (B_old c_old) A_old))``, left to autograd (which
then forms the weight gradient of the whole fused weight, the K slice included).
"""
from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from helpers import build, make_task, randomise_current

import clbench.methods.lora as lora
from clbench.methods.base import Stage
from clbench.methods.lora import PROJECTIONS, LoRAQKV, official_branch_form
from clbench.protocol import count_flops


def weight_space_reference(layer: LoRAQKV, x: torch.Tensor) -> torch.Tensor:
    parts = []
    for p, w in zip(PROJECTIONS, layer.weight.split(layer.proj_dim, 0)):
        if p in layer.projections:
            a_cur, b_cur, a_old, b_old = layer.current_A[p], layer.current_B[p], layer.frozen_A(p), layer.frozen_B(p)
            if layer.coefficients is not None:
                c_old, c_cur = layer.coefficients(layer, p)
                b_cur, b_old = b_cur * c_cur, b_old * c_old
            w = w + torch.addmm(b_cur @ a_cur, b_old, a_old)
        parts.append(w)
    return F.linear(x, torch.cat(parts, 0), layer.bias)


@contextlib.contextmanager
def weight_space_form(model):
    layers = lora.lora_layers(model)
    for layer in layers:
        layer.forward = lambda x, layer=layer: weight_space_reference(layer, x)
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward


def method_after(name: str, tasks: int, dtype=torch.float32, **config):
    """``name`` at its task ``tasks`` (of 4), every pair non-zero, as a training step sees it."""
    torch.manual_seed(0)
    method = build(name, rank_schedule=[[0, 2]], **config) if name == "sdlora" else build(name, **config)
    for t in range(tasks):
        task = make_task(t, 4)
        method.grow(task)  # InfLoRA's begin_task would design A from data: random A is as good here
        randomise_current(method.layers)
    method.to(dtype).train()
    return method, task


def grads_of(method, task, x, y, form) -> tuple[torch.Tensor, list[torch.Tensor]]:
    params = [p for p in method.parameters() if p.requires_grad]
    with form:
        loss = method.training_step(x, y, task, Stage())
    return loss.detach(), list(torch.autograd.grad(loss, params, allow_unused=True))


@pytest.mark.parametrize("dense", [False, True], ids=["low-rank", "dense"])
@pytest.mark.parametrize("name,tasks", [("sdlora", 1), ("sdlora", 3), ("inflora", 3)])
def test_outputs_equal_and_gradients_match_the_weight_space_formula(name, tasks, dense, monkeypatch):
    """Both backward forms (per-token low-rank products, or the slice's own g^T x), in float64 and
    float32; the forward is the same computation, so the loss is bit-identical."""
    monkeypatch.setattr(lora, "_dense_is_cheaper", lambda *args: dense)
    for dtype, rtol in ((torch.float64, 1e-10), (torch.float32, 1e-4)):
        method, task = method_after(name, tasks, dtype)
        x = torch.rand(5, 3, 16, 16, dtype=dtype)
        y = torch.arange(5) % len(task.classes) + task.known
        loss, grads = grads_of(method, task, x, y, contextlib.nullcontext())
        ref_loss, ref_grads = grads_of(method, task, x, y, weight_space_form(method))
        assert torch.equal(loss, ref_loss)
        assert len(grads) == len(ref_grads) and any(g is not None for g in grads)
        for g, r in zip(grads, ref_grads):
            assert (g is None) == (r is None) or (g is None and not r.any()) or (r is None and not g.any())
            if g is not None and r is not None:
                assert torch.allclose(g, r, rtol=rtol, atol=rtol * r.abs().max().item()), (dtype, (g - r).abs().max())


def test_frozen_rows_get_coefficient_gradients_but_no_factor_gradients():
    method, task = method_after("sdlora", 3)
    x, y = torch.rand(4, 3, 16, 16), torch.arange(4) % 3 + task.known
    method.training_step(x, y, task, Stage()).backward()
    assert method.magnitudes.grad is not None and bool((method.magnitudes.grad != 0).all())  # alpha_0..alpha_2
    layer = method.layers[0]
    assert all(not layer.frozen_A(p).requires_grad and layer.frozen_A(p).grad is None for p in layer.projections)


def test_the_official_branch_form_computes_the_same_model():
    method, task = method_after("sdlora", 3, torch.float64)
    x = torch.rand(3, 3, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        ours = method.backbone(x)
        with official_branch_form(method) as layers:
            assert len(layers) == 6
            branches = method.backbone(x)
        assert torch.allclose(ours, branches, rtol=1e-12, atol=1e-12)
        assert not torch.equal(ours, method.backbone(torch.rand_like(x)))  # the check can fail


@pytest.mark.parametrize("name", ["sdlora", "inflora"])
def test_training_flops_are_at_most_the_official_branch_forms_at_every_task(name):
    """The tokens of the toy ViT (17 per image) against its width 32: a case where the total
    rank soon exceeds the width, so the backward switches forms; ViT-B: ``clbench speed``."""
    for tasks in (1, 2, 3, 4):
        method, task = method_after(name, tasks)
        x, y = torch.rand(8, 3, 16, 16), torch.arange(8) % 3 + task.known

        def step(form):
            def run():
                with form:
                    method.training_step(x, y, task, Stage()).backward()
            return count_flops(run)

        ours, official = step(contextlib.nullcontext()), step(official_branch_form(method))
        today = step(weight_space_form(method))
        assert ours <= official, (tasks, ours, official)
        assert ours < today, (tasks, ours, today)  # K's weight gradient is no longer formed
