"""The GPU training path, checked: which operations of a training step would make the host wait
for a CUDA device, whether the optimizer state lives on the device, and whether attention takes
PyTorch's fused kernels. ``clbench speed`` prints these facts per method; on a CPU run the host
syncs are predicted from the operations a step runs (``SyncingOps``), on CUDA they are caught by
``torch.cuda.set_sync_debug_mode('error')``.
"""
from __future__ import annotations

import contextlib
import os
import sys
from typing import Any, Callable, Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map

# Operations whose CUDA kernels make the host wait for the device (their result's size or value
# is needed on the host), and what usually calls them.
SYNCING_OPS = {
    "aten::_local_scalar_dense": ".item(), float(), int() or bool() of a tensor",
    "aten::nonzero": "nonzero or torch.where(cond)",
    "aten::bincount": "bincount",
    "aten::_unique2": "unique", "aten::unique_dim": "unique", "aten::unique_consecutive": "unique_consecutive",
    "aten::masked_select": "masked_select",
    "aten::repeat_interleave": "repeat_interleave with tensor repeats",
    "aten::equal": "torch.equal", "aten::is_nonzero": "a tensor used as a Python bool",
}


# Tensors made from Python numbers or literals (``x[m] = 0``, ``torch.tensor(0.5)``): they are
# built on the host in a CUDA run too, so reading them back costs no wait.
HOST_FACTORIES = ("aten::lift_fresh", "aten::lift_fresh_copy", "aten::scalar_tensor")


@contextlib.contextmanager
def _stderr_muted() -> Iterator[None]:
    """Silence file descriptor 2 (the profiler's C++ start-up lines) for the block."""
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def operators_called(func, args: tuple, kwargs: dict) -> set[str]:
    """Every ATen operator the installed torch runs for ``func(*args, **kwargs)`` (the nested
    ones included: what a dispatch mode does not see), on clones of its tensor arguments."""
    clones = tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, (args, kwargs))
    with _stderr_muted(), torch.autograd.profiler.profile(use_kineto=False) as prof:
        func(*clones[0], **clones[1])
    return {e.name for e in prof.function_events}


class SyncingOps(TorchDispatchMode):
    """Records the operations of a call that would synchronise the host with a CUDA device:
    the CPU stand-in for ``torch.cuda.set_sync_debug_mode('error')``. Host-to-device copies of
    CPU tensors are not seen (on a CPU run everything is on the CPU).

    Boolean-mask assignment (``x[mask] = v``, ``aten::index_put_``) is decided by the installed
    torch itself: it is run once per kind of call under torch's profiler, and it waits if torch
    turns the mask into indices (``aten::nonzero``, whose output size the host must read). ATen
    instead takes ``masked_fill_`` (no wait) when the value has one element and is on the host
    (``canDispatchToMaskedFill`` in ``aten/src/ATen/native/TensorAdvancedIndexing.cpp``), so a
    value that would live on the device in a CUDA run (anything but ``host_tensors`` and tensors
    made from Python numbers) is counted as a wait without asking.
    """

    def __init__(self, host_tensors: list[torch.Tensor] = ()):
        super().__init__()
        self.found: dict[str, int] = {}
        # tensors that stay on the host in a CUDA run too (Adam's step counts): reading them is free
        self.host = {t.untyped_storage().data_ptr() for t in host_tensors}
        self._mask_assignment: dict[tuple, bool] = {}

    def _on_host(self, t: torch.Tensor) -> bool:
        return t.untyped_storage().data_ptr() in self.host

    def _mask_assignment_waits(self, func, args: tuple, kwargs: dict) -> bool:
        value = args[2] if len(args) > 2 else kwargs.get("values")
        if not (isinstance(value, torch.Tensor) and value.numel() == 1 and self._on_host(value)):
            return True  # torch's masked_fill_ path needs a one-element value on the host
        indices = [None if i is None else (i.dtype, i.dim()) for i in args[1]]
        kind = (func._schema.name, args[0].dim(), tuple(indices), value.dim())
        if kind not in self._mask_assignment:
            self._mask_assignment[kind] = "aten::nonzero" in operators_called(func, args, kwargs)
        return self._mask_assignment[kind]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name
        why = SYNCING_OPS.get(name)
        if why and all(self._on_host(t) for t in tree_leaves(args) if isinstance(t, torch.Tensor)):
            why = None
        boolean_index = name in ("aten::index", "aten::index_put", "aten::index_put_") and any(
            isinstance(t, torch.Tensor) and t.dtype in (torch.bool, torch.uint8) for t in tree_leaves(args[1:2]))
        if boolean_index and name == "aten::index":
            why = "boolean-mask indexing"  # the output's size is the mask's count
        elif boolean_index and self._mask_assignment_waits(func, args, kwargs):
            why = "boolean-mask assignment with a value that is not a host scalar"
        out = func(*args, **kwargs)
        if name in HOST_FACTORIES and isinstance(out, torch.Tensor):
            self.host.add(out.untyped_storage().data_ptr())
        if why is not None:
            key = f"{name} ({why})"
            self.found[key] = self.found.get(key, 0) + 1
        return out


def _capturable(optimizer: torch.optim.Optimizer) -> bool:
    """Whether the optimizer keeps its step counts on the device (else on the host, by design)."""
    return any(g.get("capturable") or g.get("fused") for g in optimizer.param_groups)


def gpu_path_checks(trainer: Any, device: torch.device) -> list[str]:
    """Facts about the GPU training path: optimizer state placement, and host syncs inside the
    step (measured on CUDA, predicted from the operations elsewhere). ``trainer``: anything with
    ``stages``, a list of ``(stage, epochs, optimizer, step)`` (``clbench.speed.Trainer``)."""
    checks = []
    places = {v.device.type for _, _, opt, _ in trainer.stages for s in opt.state.values()
              for v in s.values() if isinstance(v, torch.Tensor) and v.dim() > 0}
    if places and places != {device.type}:
        checks.append(f"optimizer state on {sorted(places)}, not only on {device.type}")
    if device.type != "cuda":
        for stage, _, optimizer, step in trainer.stages:
            step()  # the optimizer's state exists from here on
            scalars = [v for state in optimizer.state.values() for v in state.values()
                       if isinstance(v, torch.Tensor) and v.dim() == 0 and not _capturable(optimizer)]
            with SyncingOps(scalars) as ops:
                step()
            if ops.found:
                found = ", ".join(f"{k} x{n}" for k, n in sorted(ops.found.items()))
                checks.append(f"stage '{stage.name}': its step would wait for a CUDA device: {found}")
        if trainer.stages and not any("would wait" in c for c in checks):
            checks.append("training step: no operation that would wait for a CUDA device (checked on CPU)")
    else:
        for stage, _, _, step in trainer.stages:
            torch.cuda.synchronize(device)
            torch.cuda.set_sync_debug_mode("error")
            try:
                step()
            except RuntimeError as err:
                checks.append(f"stage '{stage.name}': its step waits for the device: {str(err).splitlines()[0][:160]}")
            finally:
                torch.cuda.set_sync_debug_mode("default")
        if trainer.stages and not any("waits for the device" in c for c in checks):
            checks.append("training step: no host sync")
    return checks


def fused_attention(model: torch.nn.Module) -> str:
    """How many attention layers take PyTorch's fused scaled_dot_product_attention path."""
    flags = [m.fused_attn for m in model.modules() if hasattr(m, "fused_attn")]
    return f"{sum(flags)}/{len(flags)} attention layers use F.scaled_dot_product_attention" if flags \
        else "no timm attention layers found"


def fused_attention_kernel(model: torch.nn.Module, x: torch.Tensor,
                           autocast: Callable[[], contextlib.AbstractContextManager]) -> str:
    """Whether a fused kernel (flash or memory-efficient attention) runs the attention of one
    forward of ``model`` on ``x`` at the run's precision: the forward is run with only those
    backends allowed, so torch raises if it would fall back to the unfused math kernel. CPU has
    a flash kernel too, so the check runs there as well."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if not any(getattr(m, "fused_attn", False) for m in model.modules()):
        return "fused attention kernel: not used (no layer calls F.scaled_dot_product_attention)"
    try:
        with torch.no_grad(), autocast(), sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
            model(x)
    except RuntimeError as err:
        return f"fused attention kernel: none accepts these inputs, the math kernel runs ({str(err).splitlines()[0][:120]})"
    return "fused attention kernel: flash or memory-efficient attention runs"
