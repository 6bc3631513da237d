"""Each method's head starts as its official code's head does (``methods.base.init_head_rows``),
checked against the official constructors themselves, seeded alike."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from timm.models.vision_transformer import init_weights_vit_timm

from clbench.errors import ConfigError
from clbench.methods.base import ExpandingLinear
from clbench.recipes import resolve_config

D, N = 48, 7


def grown(init: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    head = ExpandingLinear(D, init=init)
    torch.manual_seed(seed)
    head.grow(N)
    return head.weights[0].detach(), head.biases[0].detach()


def test_torch_linear_is_nn_linears_own_initialisation():
    torch.manual_seed(0)
    official = nn.Linear(D, N)  # CODA's `last`, InfLoRA's classifier_pool
    weight, bias = grown("torch_linear")
    assert torch.equal(weight, official.weight.detach()) and torch.equal(bias, official.bias.detach())


def test_trunc_normal_is_timms_vit_head_initialisation():
    official = nn.Linear(D, N)
    torch.manual_seed(0)
    init_weights_vit_timm(official)  # the L2P, DualPrompt and HiDe-Prompt ViTs' head
    weight, bias = grown("trunc_normal")
    assert torch.equal(weight, official.weight.detach()) and torch.equal(bias, torch.zeros(N))


def test_kaiming_linear_is_pilots_simple_linear():
    torch.manual_seed(0)
    weight = torch.empty(N, D)
    nn.init.kaiming_uniform_(weight, nonlinearity="linear")  # SD-LoRA's SimpleLinear.reset_parameters
    got_weight, got_bias = grown("kaiming_linear")
    assert torch.equal(got_weight, weight) and torch.equal(got_bias, torch.zeros(N))


@pytest.mark.parametrize("method, init", [
    ("l2p", "trunc_normal"), ("dualprompt", "trunc_normal"), ("hide_prompt", "trunc_normal"),
    ("coda_prompt", "torch_linear"), ("inflora", "torch_linear"), ("full_ft", "torch_linear"),
    ("sdlora", "kaiming_linear"), ("sdlora_rr", "kaiming_linear"), ("sdlora_kd", "kaiming_linear")])
def test_each_recipe_names_its_official_head(method, init):
    for bench in ("imr", "c100", "synth"):
        assert resolve_config(bench, 10, method, 0).method_args["head_init"] == init


def test_an_unknown_head_init_names_the_valid_ones():
    with pytest.raises(ConfigError, match="method.head_init 'xavier'.*trunc_normal"):
        ExpandingLinear(D, init="xavier")
