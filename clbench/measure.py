"""How one call is measured: its time, in turns with the calls it is compared with (``Timing``,
``median_ratio``), and its peak memory (``peak_memory_mib``: CUDA's allocator peak, or on the CPU
the peak of live tensor bytes that ``LiveTensorBytes`` traces through a dispatch mode).
``clbench speed`` measures with these.

A run's CPU memory per task (``protocol.TaskMemory``) is the same figure, live tensor bytes,
taken where it costs little: ``SteadyStepPeak`` traces one batch of each pass over a task's data
(a training stage's second step, a method's own passes). Tracing every step of a run is too slow
to leave on: the dispatch mode makes a synth training step 1.5-2.4 times as long (about 10 us of
Python per operation).
"""
from __future__ import annotations

import contextlib
import functools
import statistics
import time
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook
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

    ``reads=False``: storages an operation only reads (or views, or writes in place) are not
    counted unless listed: only ``existing`` and what operations allocate. A run's figure wants
    that: a dataset held as one tensor (synth's images, read a sample at a time) is data the
    process holds, not what the method needs, and with DataLoader workers it is read elsewhere.
    """

    def __init__(self, existing: Iterable[torch.Tensor], reads: bool = True):
        super().__init__()
        self.reads = reads
        self.known: set[int] = set()
        self.live = self.peak = 0
        self._finalizers: list[weakref.finalize] = []
        for t in existing:
            self._track(t)

    def _track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key, nbytes = storage.data_ptr(), storage.nbytes()
        if nbytes and key not in self.known:
            self.known.add(key)
            self.live += nbytes
            self.peak = max(self.peak, self.live)
            # gradients set to None are freed mid-step
            self._finalizers.append(weakref.finalize(storage, self._freed, key, nbytes))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.reads:
            # inputs too: weights the step reads but nobody listed (a merged inference copy) are alive
            for t in tree_leaves((args, kwargs, out)):
                if isinstance(t, torch.Tensor):
                    self._track(t)
            return out
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):  # a new storage, not a view of an input nor the input written in place
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self._track(t)
        return out

    def _freed(self, key: int, nbytes: int) -> None:
        self.known.discard(key)
        self.live -= nbytes

    def __exit__(self, *exc: Any) -> None:
        super().__exit__(*exc)
        # the figures stay as they were at the exit; storages that outlive the mode (parameters)
        # no longer call back into it, nor keep it alive
        for f in self._finalizers:
            f.detach()
        self._finalizers.clear()


def storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views and shared tensors count once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        storage = t.untyped_storage()
        seen.setdefault(storage.data_ptr(), storage.nbytes())
    return sum(seen.values())


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


_END = object()


def optimizer_state(optimizers: Iterable[torch.optim.Optimizer]) -> list[torch.Tensor]:
    """The tensors the optimizers keep per parameter (Adam's moments and step counts)."""
    return [v for opt in optimizers for state in opt.state.values() for v in state.values()
            if isinstance(v, torch.Tensor)]


class SteadyStepPeak:
    """The peak of live tensor bytes over one batch of the first pass over each loader that
    ``loaders(make_loader)`` makes: the second batch (the first if the loader has one). While it
    is out, a ``LiveTensorBytes`` mode traces whatever its consumer does (the protocol's training
    step: the batch moved and normalised, forward, backward, the optimizer's step; a method's pass
    for statistics). It counts the tensors ``state()`` lists (a method's parameters, buffers and
    gradients), the state of the optimizers that stepped during the first batch, and every tensor
    an operation allocates (the batch as the model sees it, activations, gradients), not tensors
    that exist elsewhere and are only read (a dataset held in memory). ``peak`` is the most bytes
    alive at once in any traced batch.

    The second batch, because a training stage's second step is its steady state: its
    optimizer was built for the stage and made its state in the first step, and that state is
    alive through every later step; later steps and epochs repeat it on batches of the same size.
    Later passes of a loader (epochs) are not traced, nor a pass that starts while another is
    traced. A loader is otherwise the one ``make_loader`` made: the same batches, its length,
    its attributes.
    """

    def __init__(self, state: Callable[[], Iterable[torch.Tensor]]):
        self.state = state
        self.peak = 0
        self.traced_batches = 0
        self.active = False

    def loaders(self, make_loader: Callable[..., Any]) -> Callable[..., Any]:
        """``make_loader``, its loaders tracing one batch of their first pass."""
        @functools.wraps(make_loader)
        def make(*args: Any, **kwargs: Any) -> _FirstPassTraced:
            return _FirstPassTraced(make_loader(*args, **kwargs), self)
        return make

    @contextlib.contextmanager
    def tracing(self, optimizers: Iterable[torch.optim.Optimizer] = ()) -> Iterator[None]:
        tracker = LiveTensorBytes([*self.state(), *optimizer_state(optimizers)], reads=False)
        self.active = True
        try:
            with tracker:
                yield
        finally:
            self.active = False
            self.peak = max(self.peak, tracker.peak)

    def batches_of(self, loader: Iterable) -> Iterator[Any]:
        """The loader's batches, the second one traced (the first if it has one). Its iterator is
        made before tracing starts: DataLoader workers start there, and a worker forked inside
        the trace would carry the mode into its process."""
        try:
            traced = 1 if len(loader) > 1 else 0  # type: ignore[arg-type]
        except TypeError:  # no length: the second batch, if there is one
            traced = 1
        it = iter(loader)
        optimizers: weakref.WeakSet[torch.optim.Optimizer] = weakref.WeakSet()
        if traced:  # the optimizers that step on the first batch: their state is alive from then on
            hook = register_optimizer_step_pre_hook(lambda opt, a, k: optimizers.add(opt))
            try:
                batch = next(it, _END)
                if batch is _END:
                    return
                yield batch
            finally:
                hook.remove()
        # The mode stays on while the consumer works on the batch (until it asks for the next
        # one). A consumer that stops early closes this generator, which ends the trace.
        with self.tracing(optimizers):
            batch = next(it, _END)
            if batch is _END:
                return
            self.traced_batches += 1
            yield batch
        yield from it


class _FirstPassTraced:
    """A loader whose first pass goes through ``SteadyStepPeak.batches_of``."""

    def __init__(self, loader: Any, peak: SteadyStepPeak):
        self.loader, self._peak, self._passes = loader, peak, 0

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str) -> Any:  # only for what this wrapper does not have itself
        if name == "loader":
            raise AttributeError(name)
        return getattr(self.loader, name)

    def __iter__(self) -> Iterator[Any]:
        self._passes += 1
        if self._passes > 1 or self._peak.active:
            return iter(self.loader)
        return self._peak.batches_of(self.loader)
