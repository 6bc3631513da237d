"""Continual-learning metrics as pure functions of an accuracy matrix of raw counts.

``correct[t][i]`` and ``total[t][i]`` count the test images of task ``i`` (its classes) that are
classified correctly, and in all, after training task ``t``; entries with ``i > t`` are 0.
Tasks are 0-indexed. Percentages are returned in [0, 100].

Definitions (which official code computes which: docs/methods/README.md §Metrics):

- ``acc_curve[t]``: sample-weighted accuracy over every class seen after task ``t`` (PILOT,
  SD-LoRA, InfLoRA: "CNN top1 curve").
- ``acc`` = ``acc_curve[-1]`` (SD-LoRA's Acc); ``aaa`` = mean of ``acc_curve`` (SD-LoRA's AAA).
- ``acc_task_avg`` / ``aaa_task_avg``: the same, but accuracy after task ``t`` is the mean of the
  per-task accuracies ``a[i][t]`` over ``i <= t`` (what L2P, DualPrompt, CODA-Prompt and
  HiDe-Prompt print as "Acc@1"; differs on unbalanced data such as ImageNet-R).
- ``forgetting_max``: mean over ``i < T-1`` of ``max_{i <= t < T-1} a[i][t] - a[i][T-1]``
  (L2P/DualPrompt/HiDe, PILOT).
- ``forgetting_consecutive``: CODA-Prompt's ``1/(T-1) Σ_{t=1}^{T-1} 1/t Σ_{i<t} (a[i][t-1] - a[i][t])``.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

Matrix = Sequence[Sequence[int]]


def _as_arrays(correct: Matrix, total: Matrix) -> tuple[np.ndarray, np.ndarray]:
    c, n = np.asarray(correct, dtype=np.float64), np.asarray(total, dtype=np.float64)
    if c.shape != n.shape or c.ndim != 2 or c.shape[0] > c.shape[1]:
        raise ValueError(f"accuracy matrix must be T'×T with T' <= T, got {c.shape} and {n.shape}")
    if (c > n).any():
        raise ValueError("a correct count exceeds its total")
    return c, n


def per_task_accuracy(correct: Matrix, total: Matrix) -> np.ndarray:
    """``a[t][i]`` in percent (row t = after task t, column i = task i); NaN where ``i > t``."""
    c, n = _as_arrays(correct, total)
    a = np.full(c.shape, np.nan)
    for t in range(c.shape[0]):
        a[t, : t + 1] = 100.0 * c[t, : t + 1] / np.maximum(n[t, : t + 1], 1)
    return a


def accuracy_curve(correct: Matrix, total: Matrix) -> np.ndarray:
    """Sample-weighted accuracy over all seen classes after each task."""
    c, n = _as_arrays(correct, total)
    return np.array([100.0 * c[t, : t + 1].sum() / max(n[t, : t + 1].sum(), 1) for t in range(c.shape[0])])


def task_averaged_curve(correct: Matrix, total: Matrix) -> np.ndarray:
    """Mean over seen tasks of per-task accuracy, after each task."""
    a = per_task_accuracy(correct, total)
    return np.array([a[t, : t + 1].mean() for t in range(a.shape[0])])


def forgetting_max(correct: Matrix, total: Matrix) -> float:
    a = per_task_accuracy(correct, total)
    last = a.shape[0] - 1
    if last < 1:
        return 0.0
    return float(np.mean([a[i:last, i].max() - a[last, i] for i in range(last)]))


def forgetting_consecutive(correct: Matrix, total: Matrix) -> float:
    a = per_task_accuracy(correct, total)
    steps = a.shape[0]
    if steps < 2:
        return 0.0
    drops = [np.mean([a[t - 1, i] - a[t, i] for i in range(t)]) for t in range(1, steps)]
    return float(np.mean(drops))


def summarize(correct: Matrix, total: Matrix) -> dict[str, float]:
    """Every metric of the harness, from the counts alone."""
    curve = accuracy_curve(correct, total)
    task_avg = task_averaged_curve(correct, total)
    return {
        "acc": float(curve[-1]),
        "aaa": float(curve.mean()),
        "acc_task_avg": float(task_avg[-1]),
        "aaa_task_avg": float(task_avg.mean()),
        "forgetting_max": forgetting_max(correct, total),
        "forgetting_consecutive": forgetting_consecutive(correct, total),
        "acc_curve": [float(v) for v in curve],
        "acc_task_avg_curve": [float(v) for v in task_avg],
    }
