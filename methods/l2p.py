"""L2P, Learning to Prompt (Wang et al., CVPR 2022), as its PyTorch port and PILOT's run it.

A pool of ``pool_size`` prompts (``prompt_length`` tokens each), each with a learnable key. The
frozen backbone's final [CLS] feature is the query; the ``top_k`` prompts whose keys are most
cosine-similar are inserted after [CLS] at the input (prompt-tuning, with copies of the [CLS]
positional embedding), and the head reads the mean of the outputs at the prompt positions.
Loss: cross-entropy over the current task's classes minus ``pull_coefficient`` times the summed
cosine between the query and the chosen keys, per image. Prompts and keys are shared by all
tasks; only the head rows of the current task train besides them.

Sources, recipe provenance and departures: ``docs/methods/l2p.md`` (``JH-LEE-KR/l2p-pytorch``, and
SD-LoRA's PILOT config, the recipe's default). Deviation from both, on purpose: the ports choose
prompts **batchwise** at test too (the majority vote of the batch serves every image), which makes
an image's prediction depend on the rest of its batch and leaks labels on class-sorted test data.
Here the test selection is per image by default; ``test_batchwise_selection: true`` restores the
ports' behaviour (and is written into the result file), voting over groups of ``test_vote_batch``
images (PILOT's test batch is 32, its test set class-sorted: ``data.test_order: class_sorted``; the
protocol's evaluation batch of 256 is a multiple of 32, so the groups are the ports' batches).
Training keeps the ports' batchwise vote (``train_batchwise_selection``).

``prompt_mode: prefix`` is CODA-Prompt's "L2P++" (docs/methods/l2p.md §L2P++ (prefix mode)): the
chosen prompts become a prefix of block 0 instead of input tokens (each prompt's first half its key
tokens, the second half its value tokens) and the head reads the final [CLS]. CODA runs it with
pool 30, length 20, top-5 per image and its own recipe. Two parts of CODA's L2P are not reproduced:
its pull term ``(1.0 - cos_sim[:, k_idx]).sum()`` (GT-RIPL/CODA-Prompt models/zoo.py:267) indexes
the ``[B, pool]`` cosines with the ``[B, k]`` chosen ids, a ``[B, B, k]`` block (every image's
cosine with every image's chosen keys), summed without dividing by B; and its prompts and keys
start U(0, 1) (``tensor_prompt``, :342-351). Here ``prompt_mode: prefix`` keeps this module's pull
term (``pull_coefficient`` x each image's summed cosine with its own chosen keys, averaged over the
batch) and the ports' U(-1, 1). SD-LoRA's Table 5 counts 0.48 M learnable parameters and 70.14
GFLOPs for L2P, which fit this variant (30 x 20 x 768 prompts + 30 keys = 0.48 M; no extra input
tokens) and not the input-prompted one (0.05 M; 25 more tokens in the second pass).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from clbench.config import one_of
from clbench.errors import ConfigError
from clbench.methods.base import HEAD_INITS, Stage, Task, masked_cross_entropy, register_method
from clbench.methods.prompts import Prefix, PromptMethod, cosine_similarity, prompted_forward, select_prompts

PROMPT_MODES = ("input", "prefix")


@register_method("l2p", title="L2P", paper_row=1)
class L2P(PromptMethod):
    @dataclass
    class Config:
        pool_size: int = 10  # prompts in the pool, shared by all tasks
        prompt_length: int = 5  # tokens per prompt
        top_k: int = 5  # prompts per image: top_k * prompt_length input tokens
        pull_coefficient: float = 0.1  # weight of the query-key cosine in the loss
        train_batchwise_selection: bool = True  # the ports' batch majority vote while training
        test_batchwise_selection: bool = False  # the same at test: ports' default, leaks labels
        test_vote_batch: int | None = None  # the test vote's group of images (PILOT: its test batch, 32)
        prompt_mode: str = one_of("input", PROMPT_MODES)  # input (L2P) | prefix (CODA's L2P++: block 0, half key, half value)
        head_init: str = one_of("trunc_normal", HEAD_INITS)  # the ports' timm ViT head; see init_head_rows

        def validate(self, num_tasks: int | None = None) -> None:
            if not 1 <= self.top_k <= self.pool_size:
                raise ConfigError(f"method.top_k={self.top_k} must be between 1 and method.pool_size={self.pool_size}")
            if self.test_vote_batch is not None and self.test_vote_batch < 1:
                raise ConfigError(f"method.test_vote_batch={self.test_vote_batch} must be at least 1 (or null)")
            if self.prompt_length < 1:
                raise ConfigError(f"method.prompt_length must be at least 1, got {self.prompt_length}")
            if self.prompt_mode == "prefix" and self.prompt_length % 2:
                raise ConfigError(f"method.prompt_mode=prefix splits a prompt into key and value halves; "
                                  f"method.prompt_length={self.prompt_length} must be even")

    def __init__(self, backbone: nn.Module, config: Config, num_classes: int, num_tasks: int):
        super().__init__(backbone, config, num_classes, num_tasks)
        d = self.embed_dim
        # The ports' 'uniform' initialiser for prompts and keys: U(-1, 1).
        self.prompts = nn.Parameter(torch.empty(config.pool_size, config.prompt_length, d).uniform_(-1, 1))
        self.keys = nn.Parameter(torch.empty(config.pool_size, d).uniform_(-1, 1))

    def _forward(self, x: torch.Tensor, batchwise: bool,
                 vote_batch: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits over the classes grown so far, and the summed query-key cosine per image."""
        similarity = cosine_similarity(self.query(x), self.keys)  # the query carries no gradient
        chosen = select_prompts(similarity.detach(), self.config.top_k, batchwise, vote_batch)  # [B, k]
        prompts = self.prompts[chosen]  # [B, k, length, D]
        pull = similarity.gather(1, chosen).sum() / x.shape[0]
        if self.config.prompt_mode == "prefix":
            half = self.config.prompt_length // 2
            prefix = Prefix(prompts[:, :, :half].flatten(1, 2), prompts[:, :, half:].flatten(1, 2))
            return self.head(prompted_forward(self.backbone, x, prefixes={0: prefix}).cls), pull
        out = prompted_forward(self.backbone, x, prompt_tokens=prompts.flatten(1, 2), prompt_pos="cls")
        return self.head(out.prompts.mean(1)), pull

    def training_step(self, x: torch.Tensor, y: torch.Tensor, task: Task, stage: Stage) -> torch.Tensor:
        logits, pull = self._forward(x, self.config.train_batchwise_selection)
        return masked_cross_entropy(logits, y, task, "current") - self.config.pull_coefficient * pull

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self._forward(x, self.config.test_batchwise_selection, self.config.test_vote_batch)[0]
