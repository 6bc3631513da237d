"""How one call is measured: its time, in turns with the calls it is compared with (``Timing``,
``median_ratio``), and its peak memory (``peak_memory_mib``: CUDA's allocator peak, or on the CPU
the peak of live tensor bytes that ``LiveTensorBytes`` traces through a dispatch mode).
``clbench speed`` measures with these.
"""
from __future__ import annotations

import statistics
import time
import weakref
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


@dataclass
class Timing:
    """How a measurement is run."""

    device: torch.device
    warmup: int
    steps: int

    def times(self, *fns: Callable[[], Any]) -> list[list[float]]:
        """Seconds per call of each function, called in turns (``fns[0], fns[1], fns[0], ...``)
        ``steps`` times each after ``warmup`` turns. On CUDA, events between the calls time the
        device without waiting for it inside the loop."""
        for _ in range(self.warmup):
            for fn in fns:
                fn()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            events = [[torch.cuda.Event(enable_timing=True) for _ in range(2)] for _ in range(self.steps * len(fns))]
            for i in range(self.steps):
                for j, fn in enumerate(fns):
                    start, end = events[i * len(fns) + j]
                    start.record()
                    fn()
                    end.record()
            torch.cuda.synchronize(self.device)
            flat = [s.elapsed_time(e) / 1000 for s, e in events]
        else:
            flat = []
            for _ in range(self.steps):
                for fn in fns:
                    t0 = time.perf_counter()
                    fn()
                    flat.append(time.perf_counter() - t0)
        return [flat[j::len(fns)] for j in range(len(fns))]


def median_ratio(a: list[float], b: list[float]) -> float:
    """Median over paired steps of ``b / a``: how much faster A is than B (rate of A / rate of B)."""
    return statistics.median(tb / ta for ta, tb in zip(a, b))


class LiveTensorBytes(TorchDispatchMode):
    """Peak bytes of tensor storage alive while the mode is active, on any device.

    Storages that exist when the mode starts (``existing``: parameters, gradients, optimizer
    state, the input), every storage an operation reads and every storage it creates count from
    then until they are freed; ``peak`` is the most that was alive at once.
    """

    def __init__(self, existing: list[torch.Tensor]):
        super().__init__()
        self.known: set[int] = set()
        self.live = self.peak = 0
        for t in existing:
            self._track(t)

    def _track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key, nbytes = storage.data_ptr(), storage.nbytes()
        if nbytes and key not in self.known:
            self.known.add(key)
            self.live += nbytes
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._freed, key, nbytes)  # gradients set to None are freed mid-step

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        # inputs too: weights the step reads but nobody listed (a merged inference copy) are alive
        for t in tree_leaves((args, kwargs, out)):
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out

    def _freed(self, key: int, nbytes: int) -> None:
        self.known.discard(key)
        self.live -= nbytes


def peak_memory_mib(device: torch.device, fn: Callable[[], Any], existing: Callable[[], list[torch.Tensor]]) -> float:
    """Peak memory of one call of ``fn``: CUDA's allocator peak, or traced tensor bytes on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) / 2**20
    with LiveTensorBytes(existing()) as tracker:
        fn()
    return tracker.peak / 2**20
