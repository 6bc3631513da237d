"""The LoRA building block on timm's fused qkv (methods/lora.py), on a small untrained ViT.

Reference computations here are written independently of the code under test: per task and
per projection, in activation space, the way the official repositories run their branches.
"""
from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from clbench.methods.lora import (
    LoRAQKV,
    attach_lora,
    direction_gram,
    input_second_moments,
    lora_layers,
    merged_copy,
    product_sq_norms,
)

D = 32  # width of conftest's vit_toy_patch4_16


def toy_vit(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("vit_toy_patch4_16", num_classes=0).eval()


def randomise_current(layers, scale: float = 0.3) -> None:
    """Give the current pair non-trivial values (B starts at zero)."""
    with torch.no_grad():
        for layer in layers:
            for p in layer.projections:
                layer.current_A[p].normal_()
                layer.current_B[p].normal_().mul_(scale)


def per_task_pairs(layer: LoRAQKV, p: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    a, b, tasks = layer.factors(p)
    return [(a[tasks == k], b[:, tasks == k]) for k in range(layer.num_tasks)]


class BranchQKV(nn.Module):
    """Reference: W0 x + b, then every task's branch added to its slice, B_k (A_k x) * c_k."""

    def __init__(self, layer: LoRAQKV, coefficient=lambda p, k, a, b: 1.0):
        super().__init__()
        self.weight, self.bias = layer.weight, layer.bias
        self.dim = layer.proj_dim
        self.branches = {p: [(a.detach().clone(), b.detach().clone(), coefficient(p, k, a, b))
                             for k, (a, b) in enumerate(per_task_pairs(layer, p))]
                         for p in layer.projections}

    def forward(self, x):
        out = F.linear(x, self.weight, self.bias)
        parts = list(out.split(self.dim, -1))
        for i, p in enumerate("qkv"):
            for a, b, c in self.branches.get(p, []):
                parts[i] = parts[i] + c * ((x @ a.t()) @ b.t())
        return torch.cat(parts, -1)


def branch_reference(model: nn.Module, coefficient=lambda p, k, a, b: 1.0) -> nn.Module:
    import copy

    memo = {id(m): BranchQKV(m, coefficient) for m in lora_layers(model)}
    for t in list(model.parameters()) + list(model.buffers()):
        memo.setdefault(id(t), t)
    return copy.deepcopy(model, memo)


def test_wrapping_keeps_the_backbone_state_dict_keys_and_function():
    plain = toy_vit()
    keys = set(plain.state_dict())
    x = torch.rand(3, 3, 16, 16)
    before = plain(x)
    layers = attach_lora(plain, ["q", "v"])
    assert len(layers) == 6 and all(isinstance(m.qkv, LoRAQKV) for m in plain.modules() if hasattr(m, "qkv"))
    assert keys <= set(plain.state_dict())  # the pretrained names are unchanged
    assert torch.equal(plain(x), before)  # no task yet: exactly the plain model
    for layer in layers:
        layer.add_task(4)
    assert torch.equal(plain(x), before)  # B starts at zero


def test_adapted_weight_is_w0_plus_the_sum_of_products_on_the_chosen_slices_only():
    layer = attach_lora(toy_vit(), ["k", "v"])[0]
    for r in (3, 2, 4):
        layer.add_task(r)
        randomise_current([layer])
    w = layer.adapted_weight()
    w0 = layer.weight
    q, k, v = w.split(D)
    assert torch.equal(q, w0[:D])  # Q untouched
    for name, got, base in (("k", k, w0[D:2 * D]), ("v", v, w0[2 * D:])):
        pairs = per_task_pairs(layer, name)
        assert [a.shape[0] for a, _ in pairs] == [3, 2, 4]
        expected = base + sum(b @ a for a, b in pairs)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_add_task_freezes_the_previous_pair_and_starts_a_zero_update():
    layer = attach_lora(toy_vit(), ["q", "v"])[0]
    layer.add_task(3)
    assert layer.current_A["q"].requires_grad and layer.current_B["q"].requires_grad
    assert torch.count_nonzero(layer.current_B["q"]) == 0
    bound = 1 / math.sqrt(D)  # nn.Linear's default init of A
    assert layer.current_A["q"].abs().max() <= bound
    randomise_current([layer])
    old_a = layer.current_A["q"].detach().clone()
    layer.add_task(3)
    assert torch.equal(layer.frozen_A("q"), old_a)  # moved into the frozen stack as is
    assert layer.frozen_task.tolist() == [0, 0, 0]
    assert "frozen_A_q" in dict(layer.named_buffers())  # frozen: buffers, never optimised
    layer.add_task(2, keep_previous=False)  # a dropped pair does not join the stack
    assert layer.frozen_task.tolist() == [0, 0, 0] and layer.num_tasks == 3


def test_merged_copy_is_a_plain_vit_that_equals_the_branch_sum():
    model = toy_vit().double()
    layers = attach_lora(model, ["q", "v"])
    for _ in range(3):
        for layer in layers:
            layer.add_task(4)
        randomise_current(layers)
    x = torch.rand(4, 3, 16, 16, dtype=torch.float64)
    merged = merged_copy(model)
    assert not lora_layers(merged)
    assert all(type(m.qkv) is nn.Linear for m in merged.modules() if hasattr(m, "qkv"))
    reference = branch_reference(model)
    # float64: re-associating W0 x + sum B(Ax) as (W0 + sum BA) x changes only rounding, ~1e-16.
    torch.testing.assert_close(merged(x), reference(x), rtol=0, atol=1e-10)
    torch.testing.assert_close(model(x), reference(x), rtol=0, atol=1e-10)
    # The copy shares every frozen tensor except the merged qkv weights.
    assert merged.patch_embed.proj.weight is model.patch_embed.proj.weight


def test_merged_copy_of_a_compiled_model_runs_its_own_modules():
    model = toy_vit()
    layers = attach_lora(model, ["q", "v"])
    for layer in layers:
        layer.add_task(2)
    model.blocks[0].compile()  # lazy: nothing is compiled until called
    merged = merged_copy(model)
    calls = []  # the copy's first block must run its own modules, not model.blocks[0]'s compiled forward
    layers[0].register_forward_hook(lambda *args: calls.append(1))
    merged(torch.rand(1, 3, 16, 16))
    assert not calls


def test_load_state_dict_sizes_the_frozen_stacks_from_the_checkpoint():
    source = attach_lora(toy_vit(), ["q", "v"])[0]
    for keep in (True, False, True):  # task 1's pair is dropped
        source.add_task(2, keep_previous=keep)
        randomise_current([source])
    source.add_task(2)
    target = attach_lora(toy_vit(), ["q", "v"])[0]
    for _ in range(4):  # a replay that does not know about the drop
        target.add_task(2)
    assert target.frozen_task.numel() == 6 and source.frozen_task.numel() == 4
    target.load_state_dict(source.state_dict())
    assert torch.equal(target.adapted_weight(), source.adapted_weight())
    assert target.frozen_task.tolist() == source.frozen_task.tolist()


def test_product_norms_and_direction_gram_match_explicit_matrices():
    torch.manual_seed(0)
    layers = attach_lora(toy_vit().double(), ["q", "v"])[:2]
    for r in (2, 3, 2):
        for layer in layers:
            layer.add_task(r)
        randomise_current(layers)
    layer = layers[0]
    a, b, tasks = layer.factors("q")
    explicit = torch.stack([torch.linalg.matrix_norm(bk @ ak) ** 2 for ak, bk in per_task_pairs(layer, "q")])
    torch.testing.assert_close(product_sq_norms(a, b, tasks, 3), explicit)

    scale = torch.tensor([0.5, 2.0, -1.0], dtype=torch.float64)
    gram = direction_gram(layers, lambda layer, p: (scale[layer.frozen_task], scale[layer.num_tasks - 1]), 3)
    vectors = torch.stack([
        torch.cat([(scale[k] * bk @ ak).flatten() for lay in layers for p in lay.projections
                   for k2, (ak, bk) in enumerate(per_task_pairs(lay, p)) if k2 == k])
        for k in range(3)])
    torch.testing.assert_close(gram, vectors @ vectors.t())


def test_input_second_moments_are_the_mean_outer_product_of_the_qkv_input():
    model = toy_vit()
    layers = attach_lora(model, ["k", "v"])
    seen = []
    handle = model.blocks[2].norm1.register_forward_hook(lambda m, i, o: seen.append(o.detach()))
    batches = [(torch.rand(5, 3, 16, 16), None), (torch.rand(3, 3, 16, 16), None)]
    moments = input_second_moments(model, layers, batches)
    handle.remove()
    x = torch.cat([s.reshape(-1, D) for s in seen]).double()
    # per-batch products are float32 (summed in float64): agreement to float32 rounding
    torch.testing.assert_close(moments[2], x.t() @ x / x.shape[0], rtol=1e-5, atol=1e-6)
    kept = [m.clone() for m in moments]
    model(torch.rand(2, 3, 16, 16))
    assert all(torch.equal(m, k) for m, k in zip(moments, kept))  # the hooks are gone: nothing more is recorded


def test_training_graph_does_not_grow_with_the_number_of_tasks():
    """The alpha-weighted sum of all old directions is one matmul whatever t: the autograd
    graph of a step has the same number of nodes at task 1 and at task 6."""
    def graph_size(num_tasks: int) -> int:
        model = toy_vit()
        layers = attach_lora(model, ["q", "v"])
        magnitudes = []
        for _ in range(num_tasks):
            magnitudes.append(nn.Parameter(torch.tensor(0.8)))
            for layer in layers:
                layer.add_task(3)
                layer.coefficients = lambda lay, p: (torch.stack(magnitudes)[lay.frozen_task],
                                                     torch.stack(magnitudes)[lay.num_tasks - 1])
            randomise_current(layers)
        loss = model(torch.rand(2, 3, 16, 16)).sum()
        seen, stack = set(), [loss.grad_fn]
        while stack:
            node = stack.pop()
            if node is None or node in seen:
                continue
            seen.add(node)
            stack.extend(n for n, _ in node.next_functions)
        # the stack of magnitudes has one AccumulateGrad leaf per task: count those apart
        leaves = sum(1 for n in seen if type(n).__name__ == "AccumulateGrad")
        return len(seen) - leaves

    assert graph_size(1) == graph_size(6)


def test_attach_lora_names_the_problem_on_a_model_without_fused_qkv():
    with pytest.raises(ValueError, match="fused `qkv`"):
        attach_lora(nn.Sequential(nn.Linear(4, 4)), ["q"])
    with pytest.raises(ValueError, match="projections"):
        attach_lora(toy_vit(), ["x"])
