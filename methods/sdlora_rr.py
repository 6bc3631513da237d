"""SD-LoRA-RR: SD-LoRA with ranks that shrink as tasks accumulate (paper Eq. 6).

Later tasks need smaller updates (the paper's Sec. 3.4 finding), so the rank of task t's new
pair follows a schedule: r = 10 for tasks 1-4, 8 for tasks 5-8, 6 from task 9 on. The released
code has this only as a commented-out block (``models/sdlora.py:75-85``) with a 0-indexed task
counter, ``_cur_task < 4 -> 10, < 8 -> 8, else 6``, i.e. mu = 4, nu = 8; we follow it (the
paper's 1-indexed "t = mu" would reduce one task earlier; docs/methods/sdlora.md §Rank
reduction (SD-LoRA-RR)). Everything
else is SD-LoRA; old pairs of different ranks live in the same stacked factors.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from clbench.methods.base import register_method
from clbench.methods.sdlora import SDLoRA


@register_method("sdlora_rr", title="SD-LoRA-RR", paper_row=7, magnitudes="magnitudes")
class SDLoRARankReduction(SDLoRA):
    @dataclass
    class Config(SDLoRA.Config):
        # [first task (0-indexed), rank]: the official commented code's mu = 4, nu = 8 schedule
        rank_schedule: list[list[int]] = field(default_factory=lambda: [[0, 10], [4, 8], [8, 6]])
