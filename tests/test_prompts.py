"""The shared prompt mechanism (methods/prompts.py) against direct computations.

The ViT is timm's own ``VisionTransformer`` with the synth backbone's shape (32 px, patch 8,
width 96, depth 6, 4 heads), randomly initialised: the mechanism does not need trained weights.
"""
import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from clbench.methods.prompts import (
    Prefix,
    check_vit,
    cosine_similarity,
    frozen_query,
    prefix_attention,
    prompted_forward,
    select_prompts,
)

D, HEADS = 96, 4


def make_vit(fused: bool = False, seed: int = 0) -> VisionTransformer:
    torch.manual_seed(seed)
    vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=D, depth=6, num_heads=HEADS, mlp_ratio=2.0,
                            num_classes=0, global_pool="token")
    for block in vit.blocks:
        block.attn.fused_attn = fused
    return vit.eval()


@pytest.fixture(scope="module")
def images():
    return torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("fused", [False, True])
def test_no_prompt_is_the_plain_backbone(images, fused):
    vit = make_vit(fused)
    out = prompted_forward(vit, images)
    torch.testing.assert_close(out.tokens, vit.forward_features(images))
    torch.testing.assert_close(out.cls, vit(images))
    assert out.num_prompts == 0 and out.patches.shape == (3, 16, D)


@pytest.mark.parametrize("fused", [False, True])
def test_prefix_attention_is_attention_over_prefix_then_tokens(fused):
    """Prefix K/V made from the projections of extra tokens z: the rows of x must come out as in
    plain multi-head attention over the sequence [z; x], computed here by hand."""
    attn = make_vit(fused).blocks[2].attn
    torch.manual_seed(3)
    x, z = torch.randn(2, 7, D), torch.randn(2, 5, D)
    _, kz, vz = attn.qkv(z).chunk(3, dim=-1)  # timm's qkv output is laid out [q | k | v]
    out = prefix_attention(attn, x, Prefix(kz, vz))

    seq = torch.cat([z, x], 1)
    q, k, v = (t.reshape(2, 12, HEADS, D // HEADS).transpose(1, 2) for t in attn.qkv(seq).chunk(3, dim=-1))
    weights = torch.softmax(q @ k.transpose(-2, -1) / (D // HEADS) ** 0.5, dim=-1)
    direct = attn.proj((weights @ v).transpose(1, 2).reshape(2, 12, D))[:, 5:]
    torch.testing.assert_close(out, direct, rtol=1e-5, atol=1e-5)


def test_prefixes_are_per_sample_and_keep_key_apart_from_value(images):
    """The DualPrompt/HiDe ports' reshape mixes K with V and sample b's prompt with sample b''s
    (docs/methods/dualprompt.md §The ports' prefix reshape). Here a sample's output depends on its
    own prefix only, and a prefix with key and value swapped gives a different output."""
    vit = make_vit()
    torch.manual_seed(4)
    key, value = torch.randn(3, 5, D), torch.randn(3, 5, D)
    out = prompted_forward(vit, images, prefixes={2: Prefix(key, value), 3: Prefix(key, value)}).cls
    for b in range(3):  # each sample alone, with its own prefix
        alone = prompted_forward(vit, images[b:b + 1],
                                 prefixes={2: Prefix(key[b:b + 1], value[b:b + 1]),
                                           3: Prefix(key[b:b + 1], value[b:b + 1])}).cls
        torch.testing.assert_close(out[b:b + 1], alone, rtol=1e-5, atol=1e-5)
    changed = key.clone()
    changed[0] += 1.0
    out2 = prompted_forward(vit, images, prefixes={2: Prefix(changed, value), 3: Prefix(changed, value)}).cls
    assert not torch.allclose(out2[0], out[0]) and torch.allclose(out2[1:], out[1:])
    swapped = prompted_forward(vit, images, prefixes={2: Prefix(value, key), 3: Prefix(value, key)}).cls
    assert not torch.allclose(swapped, out, atol=1e-3)


def test_shared_prefix_equals_the_same_prefix_per_sample(images):
    vit = make_vit()
    key, value = torch.randn(5, D), torch.randn(5, D)
    shared = prompted_forward(vit, images, prefixes={0: Prefix(key, value)}).cls
    per_sample = prompted_forward(vit, images, prefixes={0: Prefix(key.expand(3, -1, -1),
                                                                   value.expand(3, -1, -1))}).cls
    torch.testing.assert_close(shared, per_sample)
    both = Prefix.concat(Prefix(key[:2], value[:2]), Prefix(key[2:].expand(3, -1, -1), value[2:].expand(3, -1, -1)))
    torch.testing.assert_close(prompted_forward(vit, images, prefixes={0: both}).cls, shared, rtol=1e-5, atol=1e-5)


def test_input_prompts_sit_after_cls_with_the_cls_position(images):
    vit = make_vit()
    block_inputs = []  # what block 0 receives, one entry per forward
    vit.blocks[0].register_forward_pre_hook(lambda m, args: block_inputs.append(args[0]))
    vit.forward_features(images)  # timm's own forward, no prompts
    prompts = torch.randn(3, 4, D)
    out = prompted_forward(vit, images, prompt_tokens=prompts)
    assert out.tokens.shape == (3, 1 + 4 + 16, D) and out.prompts.shape == (3, 4, D)
    plain, x = block_inputs
    torch.testing.assert_close(x[:, :1], plain[:, :1])  # [CLS] first, unchanged
    torch.testing.assert_close(x[:, 1:5], prompts + vit.pos_embed[:, :1])  # prompts get [CLS]'s position
    torch.testing.assert_close(x[:, 5:], plain[:, 1:])  # then the patches
    prompted_forward(vit, images, prompt_tokens=prompts, prompt_pos="none")
    torch.testing.assert_close(block_inputs[-1][:, 1:5], prompts)


def test_gradients_reach_prompts_not_the_frozen_backbone(images):
    vit = make_vit()
    for p in vit.parameters():
        p.requires_grad_(False)
    prompts = torch.randn(4, D, requires_grad=True)
    key = torch.randn(5, D, requires_grad=True)
    value = torch.randn(5, D, requires_grad=True)
    out = prompted_forward(vit, images, prompt_tokens=prompts, prefixes={1: Prefix(key, value)})
    out.prompts.mean(1).sum().backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in (prompts, key, value))
    assert all(p.grad is None for p in vit.parameters())


def test_frozen_query_is_the_eval_cls_without_gradients(images):
    vit = make_vit()
    vit.train()
    vit.blocks[0].attn.attn_drop.p = 0.5  # would change the output in train mode
    q = frozen_query(vit, images)
    assert not q.requires_grad and q.shape == (3, D)
    vit.eval()
    torch.testing.assert_close(q, vit(images))
    vit.train()
    frozen_query(vit, images)
    assert all(m.training for m in vit.modules())  # modes restored


def test_prompted_forward_rejects_bad_layers_and_backbones(images):
    vit = make_vit()
    with pytest.raises(ValueError, match="blocks 0..5"):
        prompted_forward(vit, images, prefixes={6: Prefix(torch.zeros(2, D), torch.zeros(2, D))})
    with pytest.raises(ValueError, match="as many key as value"):
        Prefix(torch.zeros(2, D), torch.zeros(3, D))
    with pytest.raises(TypeError, match="class token"):
        check_vit(VisionTransformer(img_size=32, patch_size=8, embed_dim=D, depth=1, num_heads=HEADS,
                                    class_token=False, global_pool="avg"))


def test_batchwise_vote_within_groups_of_vote_batch_rows():
    torch.manual_seed(0)
    similarity = torch.randn(70, 10)
    chosen = select_prompts(similarity, 3, batchwise=True, vote_batch=32)
    for start in (0, 32, 64):  # the ports' vote, one group at a time: the 3 most chosen ids
        group = similarity[start:start + 32].topk(3, dim=1).indices.flatten().tolist()
        counts = sorted(set(group), key=lambda i: (-group.count(i), i))[:3]
        assert (chosen[start:start + 32] == torch.tensor(counts)).all(), start
    assert torch.equal(select_prompts(similarity, 3, True, vote_batch=70), select_prompts(similarity, 3, True))


def test_cosine_similarity_and_selection():
    q = torch.tensor([[1.0, 0.0], [0.0, 2.0], [0.0, 1.0]])
    keys = torch.tensor([[3.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    sim = cosine_similarity(q, keys)
    torch.testing.assert_close(sim, F.normalize(q, dim=1) @ F.normalize(keys, dim=1).t())
    assert select_prompts(sim, 1).flatten().tolist() == [0, 1, 1]
    # batchwise: the majority id serves everyone, so sample 0's choice depends on the others
    assert select_prompts(sim, 1, batchwise=True).flatten().tolist() == [1, 1, 1]
    assert select_prompts(sim[:1], 1, batchwise=True).flatten().tolist() == [0]
    with pytest.raises(ValueError, match="top_k"):
        select_prompts(sim, 4)
