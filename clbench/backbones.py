"""Pretrained ViT backbones, created by name through timm.

Weights come, in order of preference, from ``backbone.pretrained_path`` (a local file), from a
builder registered for the model name (the synthetic benchmark pretrains its own small ViT and
caches it), or from the timm / Hugging Face cache. Offline, a missing checkpoint gives one
error that names the model and both ways to provide it.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable

import timm
import torch
import torch.nn as nn
from timm.models import get_pretrained_cfg

from clbench.catalog import WEIGHT_FILES, hub_cached_file, missing_weights_message, no_hub_reason
from clbench.config import BackboneConfig
from clbench.errors import PretrainedWeightsError

# model name -> function returning the path of a weights file it built (or found cached).
PRETRAINED_BUILDERS: dict[str, Callable[[], Path]] = {}


def register_pretrained_builder(model_name: str, builder: Callable[[], Path]) -> None:
    PRETRAINED_BUILDERS[model_name] = builder


def _load_state(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "backbone"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    return state


def file_digest(path: Path, nbytes: int = 1 << 20) -> str:
    """A short content id of a weights file (first MiB and size), for the result file."""
    h = hashlib.sha1()
    with open(path, "rb") as f:
        h.update(f.read(nbytes))
    h.update(str(path.stat().st_size).encode())
    return h.hexdigest()[:12]


def create_backbone(cfg: BackboneConfig) -> tuple[nn.Module, str]:
    """The backbone (``num_classes=0``: forward returns the pooled feature) and an identifier of
    the weights it was loaded with, for the result file."""
    name = cfg.name
    base_name = name.split(".")[0]
    if not cfg.pretrained:
        return timm.create_model(name, pretrained=False, num_classes=0), f"{name} (random init)"

    path = Path(cfg.pretrained_path).expanduser() if cfg.pretrained_path else None
    if path is None and (name in PRETRAINED_BUILDERS or base_name in PRETRAINED_BUILDERS):
        path = PRETRAINED_BUILDERS.get(name, PRETRAINED_BUILDERS.get(base_name))()
    if path is not None:
        if not path.exists():
            raise PretrainedWeightsError(f"backbone.pretrained_path '{path}' does not exist")
        model = timm.create_model(name, pretrained=False, num_classes=0)
        state = _load_state(path)
        state = {k: v for k, v in state.items() if not k.startswith(("head.", "fc."))}
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing:
            raise PretrainedWeightsError(
                f"{path} does not fit {name}: {len(missing)} missing keys (e.g. {missing[:3]}); "
                f"is it a checkpoint of that architecture?")
        return model, f"{name} from {path} (sha1:{file_digest(path)})"

    why = no_hub_reason() if find_cached_weights(name) is None else None
    if why:  # fail now: timm would retry the hub for a minute
        raise PretrainedWeightsError(missing_weights_message(name, why))
    try:
        model = timm.create_model(name, pretrained=True, num_classes=0)
    except Exception as err:  # network, hub or cache errors all end here
        raise PretrainedWeightsError(missing_weights_message(name, f"{type(err).__name__}: {err}")) from err
    return model, f"{name} (timm pretrained)"


def find_cached_weights(name: str) -> Path | None:
    """The cached file timm would load for ``name``'s pretrained weights (the Hugging Face hub's
    cache, or torch hub's for a URL checkpoint), or None; never touches the network."""
    cfg = get_pretrained_cfg(name)
    if cfg is None:
        return None
    if cfg.hf_hub_id:
        found = hub_cached_file(cfg.hf_hub_id, (cfg.hf_hub_filename, *WEIGHT_FILES))
        if found is not None:
            return found
    if cfg.url:
        path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(cfg.url.split("?")[0])
        if path.exists():
            return path
    return None


def weights_problem(cfg: BackboneConfig) -> str | None:
    """Why the pretrained weights of ``cfg`` cannot be had without the network when offline, or
    None: weights that need none, a local file that exists, a registered builder, a cached
    checkpoint, or (online) a download that may still come."""
    if not cfg.pretrained:
        return None
    if cfg.pretrained_path:
        path = Path(cfg.pretrained_path).expanduser()
        return None if path.exists() else f"backbone.pretrained_path '{path}' does not exist"
    if cfg.name in PRETRAINED_BUILDERS or cfg.name.split(".")[0] in PRETRAINED_BUILDERS:
        return None
    why = no_hub_reason() if find_cached_weights(cfg.name) is None else None
    return None if why is None else missing_weights_message(cfg.name, why)


def normalization(model: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean/std the checkpoint expects (used only when ``backbone.normalize`` is on)."""
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    return tuple(cfg.get("mean", (0.5, 0.5, 0.5))), tuple(cfg.get("std", (0.5, 0.5, 0.5)))
