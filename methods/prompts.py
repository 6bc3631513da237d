"""The one prompt mechanism for timm ViTs, shared by L2P, DualPrompt, CODA-Prompt and HiDe-Prompt.

Two ways to prompt a frozen ``timm`` ``VisionTransformer``, both run by :func:`prompted_forward`:

* **prompt-tuning** (L2P): ``prompt_tokens`` ``[B, P, D]`` are inserted after the [CLS] token at
  the input, giving the sequence ``[CLS, prompts, patches]``. L2P gives them copies of the
  [CLS] positional embedding (``prompt_pos="cls"``), as its port's ``resize_pos_embed`` does.
* **prefix-tuning** (DualPrompt, CODA-Prompt, HiDe-Prompt): at chosen layers, a key prefix and
  a value prefix ``[B, L, D]`` are prepended to that layer's keys and values, per head (``D`` is
  split into heads exactly as the layer's own keys are). The query count is unchanged, so the
  token outputs keep their positions.

:func:`frozen_query` runs the same backbone with no prompt, in eval mode and without gradients:
the query of every prompt method. There is one backbone in memory; the official ports hold a
second, identical copy (``original_model``) for this.

The backbone is never modified: blocks without a prefix are called as they are, and a block with
one is run through :func:`prefix_attention`, which reuses that block's own modules (``norm1``,
``attn.qkv``, ``attn.proj``, ...). Prefixes are given per sample and per layer as separate key and
value tensors, so the DualPrompt/HiDe ports' reshape without a permute (it mixes K with V and one
sample's prompt with another's when ``B > 1``; docs/methods/dualprompt.md §The ports' prefix
reshape) cannot happen here; this module implements the intended, correct prefix attention.

The module also holds the pieces the three key-query methods share: cosine matching of the
query against learnable keys, top-k prompt selection (per sample, or the ports' batchwise
majority vote), and :class:`PromptMethod`, their common base (frozen backbone, expanding head,
two backbone passes per image in the cost report).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import ClassVar, Iterator, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from clbench.errors import ConfigError
from clbench.methods.base import CLMethod, ExpandingLinear, Task

__all__ = ["Prefix", "PromptedTokens", "check_vit", "prefix_attention", "prompted_forward",
           "frozen_query", "cosine_similarity", "select_prompts", "PromptMethod"]

_BLOCK_PARTS = ("norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2")
_ATTN_PARTS = ("qkv", "proj", "num_heads", "head_dim")


@dataclass(frozen=True)
class Prefix:
    """The key and value prefix of one attention layer.

    ``key`` and ``value`` are ``[B, L, D]`` (one prefix per sample) or ``[L, D]`` (shared by the
    batch), with ``D`` the model width; the layer splits ``D`` into heads as it splits its keys.
    """

    key: torch.Tensor
    value: torch.Tensor

    def __post_init__(self) -> None:
        if self.key.shape != self.value.shape:
            raise ValueError(f"a prefix needs as many key as value tokens of the same width; got key "
                             f"{tuple(self.key.shape)} and value {tuple(self.value.shape)}")
        if self.key.dim() not in (2, 3):
            raise ValueError(f"a prefix is [L, D] or [B, L, D]; got {tuple(self.key.shape)}")

    @property
    def length(self) -> int:
        return self.key.shape[-2]

    def batched(self, batch_size: int) -> "Prefix":
        """This prefix as ``[B, L, D]`` (a shared prefix is broadcast, not copied)."""
        if self.key.dim() == 3:
            if self.key.shape[0] != batch_size:
                raise ValueError(f"prefix is for a batch of {self.key.shape[0]}, the input has {batch_size}")
            return self
        return Prefix(self.key.expand(batch_size, -1, -1), self.value.expand(batch_size, -1, -1))

    @staticmethod
    def concat(*prefixes: "Prefix | None") -> "Prefix | None":
        """Several prefixes of one layer as one (e.g. a shared and a selected prompt)."""
        given = [p for p in prefixes if p is not None]
        if len(given) <= 1:
            return given[0] if given else None
        b = max(p.key.shape[0] if p.key.dim() == 3 else 1 for p in given)
        given = [p.batched(b) for p in given]
        return Prefix(torch.cat([p.key for p in given], 1), torch.cat([p.value for p in given], 1))


@dataclass
class PromptedTokens:
    """The final-normed token outputs of a prompted pass, ``[B, N, D]``, and where things are."""

    tokens: torch.Tensor
    num_prefix_tokens: int  # [CLS] (and register tokens) at the front
    num_prompts: int  # input prompt tokens right after them

    @property
    def cls(self) -> torch.Tensor:
        """The final [CLS] feature ``[B, D]`` (DualPrompt's, CODA's and HiDe's head input)."""
        return self.tokens[:, 0]

    @property
    def prompts(self) -> torch.Tensor:
        """Outputs at the input prompt positions ``[B, P, D]`` (L2P's head input is their mean)."""
        start = self.num_prefix_tokens
        return self.tokens[:, start: start + self.num_prompts]

    @property
    def patches(self) -> torch.Tensor:
        return self.tokens[:, self.num_prefix_tokens + self.num_prompts:]


def check_vit(vit: nn.Module) -> None:
    """Raise a clear error unless ``vit`` is a timm ViT this module can prompt."""
    problems = []
    for name in ("patch_embed", "_pos_embed", "patch_drop", "norm_pre", "blocks", "norm"):
        if not hasattr(vit, name):
            problems.append(f"no '{name}'")
    if getattr(vit, "cls_token", None) is None:
        problems.append("no [CLS] token (the query and the prompted feature are the final [CLS])")
    for i, block in enumerate(getattr(vit, "blocks", [])):
        missing = [p for p in _BLOCK_PARTS if not hasattr(block, p)]
        missing += [f"attn.{p}" for p in _ATTN_PARTS if not hasattr(getattr(block, "attn", None), p)]
        if missing:
            problems.append(f"block {i} is a {type(block).__name__} without {', '.join(missing)}")
            break
    if problems:
        raise TypeError(f"prompt methods need a timm VisionTransformer with pre-norm Blocks and a class "
                        f"token (e.g. vit_base_patch16_224); this backbone has {'; '.join(problems)}. "
                        f"Choose such a backbone with --backbone.")


def _heads(t: torch.Tensor, num_heads: int, head_dim: int) -> torch.Tensor:
    """``[B, L, H*d]`` -> ``[B, H, L, d]``."""
    b, n, _ = t.shape
    return t.reshape(b, n, num_heads, head_dim).transpose(1, 2)


def prefix_attention(attn: nn.Module, x: torch.Tensor, prefix: Prefix) -> torch.Tensor:
    """timm ``Attention.forward`` with ``prefix`` prepended to the keys and values of every head.

    ``x`` is the normed input of the layer ``[B, N, D]``; returns ``[B, N, D]``. The prefix
    enters after the layer's key norm (identity in ViT-B), as the official ports concatenate
    it after the qkv projection.
    """
    b, n, _ = x.shape
    h, d = attn.num_heads, attn.head_dim
    prefix = prefix.batched(b)
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
    q, k, v = attn.qkv(x).reshape(b, n, 3, h, d).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    k = torch.cat([_heads(prefix.key.to(k.dtype), h, d), k], dim=2)
    v = torch.cat([_heads(prefix.value.to(v.dtype), h, d), v], dim=2)
    if getattr(attn, "fused_attn", False):
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=attn.attn_drop.p if attn.training else 0.0)
    else:
        weights = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        out = attn.attn_drop(weights) @ v
    out = attn.norm(out.transpose(1, 2).reshape(b, n, h * d))
    if gate is not None:
        out = out * gate
    return attn.proj_drop(attn.proj(out))


def _block_with_prefix(block: nn.Module, x: torch.Tensor, prefix: Prefix) -> torch.Tensor:
    """timm's pre-norm ``Block.forward`` with :func:`prefix_attention` in place of ``attn``."""
    x = x + block.drop_path1(block.ls1(prefix_attention(block.attn, block.norm1(x), prefix)))
    return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))


def prompted_forward(vit: nn.Module, x: torch.Tensor, *, prompt_tokens: torch.Tensor | None = None,
                     prompt_pos: str = "cls", prefixes: Mapping[int, Prefix] | None = None) -> PromptedTokens:
    """Run ``vit`` on images ``x`` with input prompts and/or per-layer prefixes.

    ``prompt_tokens``: ``[B, P, D]`` or ``[P, D]``, inserted after the [CLS] (and register)
    tokens, after the positional embedding was added; ``prompt_pos="cls"`` adds the [CLS]
    positional embedding to them (L2P), ``"none"`` adds nothing.
    ``prefixes``: ``{layer index: Prefix}`` for the layers to prefix-tune.
    With neither, the result equals ``vit.forward_features(x)``. Gradients flow to the prompts;
    whether they reach the backbone is up to its ``requires_grad`` flags.
    """
    prefixes = dict(prefixes or {})
    bad = [i for i in prefixes if not 0 <= i < len(vit.blocks)]
    if bad:
        raise ValueError(f"prefix layers {bad} do not exist: the backbone has blocks 0..{len(vit.blocks) - 1}")
    tokens = vit._pos_embed(vit.patch_embed(x))
    num_prefix_tokens = getattr(vit, "num_prefix_tokens", 1)
    num_prompts = 0
    if prompt_tokens is not None:
        if prompt_tokens.dim() == 2:
            prompt_tokens = prompt_tokens.unsqueeze(0).expand(tokens.shape[0], -1, -1)
        if prompt_pos == "cls":
            if getattr(vit, "no_embed_class", False) or vit.pos_embed is None:
                raise ValueError("prompt_pos='cls' needs a positional embedding for [CLS]; this ViT has "
                                 "none (no_embed_class); use prompt_pos='none'")
            prompt_tokens = prompt_tokens + vit.pos_embed[:, :1]
        elif prompt_pos != "none":
            raise ValueError(f"prompt_pos must be 'cls' or 'none', got '{prompt_pos}'")
        num_prompts = prompt_tokens.shape[1]
        tokens = torch.cat([tokens[:, :num_prefix_tokens], prompt_tokens.to(tokens.dtype),
                            tokens[:, num_prefix_tokens:]], dim=1)
    tokens = vit.norm_pre(vit.patch_drop(tokens))
    for i, block in enumerate(vit.blocks):
        tokens = _block_with_prefix(block, tokens, prefixes[i]) if i in prefixes else block(tokens)
    return PromptedTokens(vit.norm(tokens), num_prefix_tokens, num_prompts)


@contextlib.contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    """Every submodule in eval mode inside the block, each restored to its own mode after."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def frozen_query(vit: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The final-normed [CLS] feature ``[B, D]`` of the unprompted backbone: eval mode, no
    gradients. The query of L2P, DualPrompt, CODA-Prompt (and HiDe's uninstructed feature)."""
    with torch.no_grad(), _eval_mode(vit):
        return vit.forward_features(x)[:, 0]


# ------------------------------------------------------------------------------ key matching


def cosine_similarity(query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """``[B, D] x [M, D] -> [B, M]`` cosines, each side normalised with the ports'
    ``x * rsqrt(max(sum x^2, 1e-12))``."""
    q = query * torch.rsqrt(query.pow(2).sum(-1, keepdim=True).clamp_min(1e-12))
    k = keys * torch.rsqrt(keys.pow(2).sum(-1, keepdim=True).clamp_min(1e-12))
    return q @ k.t()


def select_prompts(similarity: torch.Tensor, top_k: int, batchwise: bool = False,
                   vote_batch: int | None = None) -> torch.Tensor:
    """Indices ``[B, top_k]`` of the prompts each sample uses.

    Per sample (default): its own ``top_k`` most similar keys. ``batchwise=True`` is the
    L2P/DualPrompt ports' majority vote: the ``top_k`` ids chosen most often over the batch
    (ties to the lower id) serve every sample, so one image's prompt depends on the others.
    ``vote_batch`` votes within consecutive groups of that many rows instead of the whole
    batch: the ports' vote over their own (smaller) test batches.
    """
    pool = similarity.shape[1]
    if not 1 <= top_k <= pool:
        raise ValueError(f"top_k={top_k} must be between 1 and the pool size {pool}")
    idx = similarity.topk(top_k, dim=1).indices
    if not batchwise:
        return idx
    if vote_batch is not None and vote_batch < similarity.shape[0]:
        return torch.cat([select_prompts(part, top_k, True) for part in similarity.split(vote_batch)])
    votes = torch.bincount(idx.flatten(), minlength=pool)
    # stable sort on -votes keeps the lower id first among equals
    majority = torch.sort(-votes, stable=True).indices[:top_k]
    return majority.unsqueeze(0).expand(similarity.shape[0], -1)


# ------------------------------------------------------------------------------ the shared base


class PromptMethod(CLMethod):
    """Base of the query-then-prompt methods: frozen backbone, an expanding linear head on the
    prompted feature, two backbone passes per image (query, then prompted)."""

    # The loss masks every other task's logits, so only this task's head rows get a gradient.
    freeze_old_head_rows: ClassVar[bool] = True

    def __init__(self, backbone: nn.Module, config, num_classes: int, num_tasks: int):
        super().__init__(backbone, config, num_classes, num_tasks)
        check_vit(backbone)
        self.freeze_backbone()
        self.head = ExpandingLinear(self.feature_dim, init=config.head_init)  # each Config names its own

    @property
    def embed_dim(self) -> int:
        return self.backbone.embed_dim

    def check_layers(self, name: str, layers: list[int], required: bool = False) -> None:
        """``method.<name>`` must list distinct block indices of this backbone (at least one
        when ``required``)."""
        depth = len(self.backbone.blocks)
        if (any(not 0 <= i < depth for i in layers) or len(set(layers)) != len(layers)
                or (required and not layers)):
            raise ConfigError(f"method.{name}={layers} must be distinct block indices in 0..{depth - 1} "
                             f"(this backbone has {depth} blocks); e.g. [0, 1, 2, 3, 4]")

    def grow(self, task: Task) -> None:
        super().grow(task)
        self.head.grow(task.num_new, freeze_old=self.freeze_old_head_rows)

    def query(self, x: torch.Tensor) -> torch.Tensor:
        return frozen_query(self.backbone, x)

    def backbone_passes(self) -> int:
        return 2
