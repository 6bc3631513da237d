"""What the command line can know without importing torch: where data and pretrained weights
are, the recipes and how a run's configuration is layered from them (``merged_layers``, the one
resolver: ``clbench.recipes.resolve_config`` builds a run from it, ``clbench.request`` checks a
request against it), plugins, and the messages that say what is missing and how to provide it.
The registrations themselves (benchmarks, methods) are their packages'.
"""
from __future__ import annotations

import fnmatch
import functools
import importlib
import importlib.util
import json
import os
import socket
import sys
import urllib.parse
from pathlib import Path
from typing import Any, Collection, Mapping, Sequence

import yaml

from clbench.config import SECTIONS, deep_merge
from clbench.errors import ConfigError, did_you_mean

SEED_MAX = 2**32 - 1  # numpy's and torch's seeds are unsigned 32-bit integers


WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin", "open_clip_model.safetensors")


def data_dir(folder: str, root: str | os.PathLike | None) -> Path:
    """A benchmark's folder: ``root/folder`` when that exists, else ``root`` itself (``root``:
    ``--data-root``, else ``$CLBENCH_DATA``, else ``./data``)."""
    root = Path(root or os.environ.get("CLBENCH_DATA", "data")).expanduser()
    return root / folder if (root / folder).exists() else root


def missing_data_message(facts: Any, where: Path, why: str) -> str:
    """The one message for 'no usable data here': what was looked at, what is accepted, where to
    get it. ``facts``: anything with ``name``, ``title``, ``folder``, ``layouts`` and ``source``."""
    place = str(where)
    if where.name != facts.folder and not (where / facts.folder).exists():
        place += f" (the data root itself: it has no {facts.folder}/ folder)"
    return (f"{facts.title} ({facts.name}): no usable data in {place}: {why}.\n"
            f"Accepted layouts:\n{facts.layouts}\n"
            f"Where to get it: {facts.source}\n"
            f"Point the harness at the folder that holds {facts.folder}/ with --data-root DIR or "
            f"$CLBENCH_DATA=DIR (default: ./data).")


def data_presence_problem(facts: Any, root: str | os.PathLike | None) -> str | None:
    """Why ``facts``'s data cannot be in ``root`` in any accepted layout (its folder is missing, or
    holds none of the entries every layout has), or None. The benchmark's loader checks the rest
    (the layout itself, the class count) once torch is imported."""
    if facts.markers is None:
        return None
    where = data_dir(facts.folder, root)
    if not where.is_dir():
        return missing_data_message(facts, where, "the folder does not exist")
    try:
        entries = [(e.name, e.is_dir()) for e in os.scandir(where) if not e.name.startswith(".")]
    except OSError as err:
        return missing_data_message(facts, where, f"it cannot be read ({err.strerror})")
    for pattern in facts.markers:
        want_dir, pattern = pattern.endswith("/"), pattern.rstrip("/")
        if any(fnmatch.fnmatch(name, pattern) and (is_dir or not want_dir) for name, is_dir in entries):
            return None
    shown = ", ".join(m for m in facts.markers)
    return missing_data_message(facts, where, f"nothing in it belongs to an accepted layout (none of {shown})"
                                if entries else "it is empty")


def offline() -> bool:
    """Whether the Hugging Face hub must not be asked (``HF_HUB_OFFLINE`` set to a true value)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


@functools.cache
def hub_reachable(timeout_s: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers a TCP connection within ``timeout_s`` (True behind a
    proxy, which a direct connection cannot tell): a quick check instead of a minute of retries."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    url = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname, url.port or (80 if url.scheme == "http" else 443)),
                                 timeout=timeout_s).close()
    except OSError:
        return False
    return True


def hub_cached_file(hf_hub_id: str, file_names: Collection[str | None] = WEIGHT_FILES) -> Path | None:
    """The first of ``file_names`` of the hub repository ``hf_hub_id`` (``repo[@revision]``) in
    the Hugging Face cache, or None; never touches the network."""
    from huggingface_hub import try_to_load_from_cache  # torch-free, 0.2 s: only when a checkpoint is looked up

    repo, _, revision = hf_hub_id.partition("@")
    for file_name in filter(None, file_names):
        found = try_to_load_from_cache(repo, file_name, revision=revision or None)
        if isinstance(found, str):
            return Path(found)
    return None


def missing_weights_message(name: str, why: str) -> str:
    """What to do when ``name``'s pretrained weights cannot be loaded: both ways to provide them."""
    base_name = name.split(".")[0]
    return (f"could not load pretrained weights for '{name}' ({why}).\n"
            f"Provide them in one of two ways:\n"
            f"  1. put them in the timm / Hugging Face cache on a machine with internet:\n"
            f"       python -c \"import timm; timm.create_model('{name}', pretrained=True)\"\n"
            f"     (cache: {os.environ.get('HF_HOME', '~/.cache/huggingface')}; copy it over and set "
            f"HF_HUB_OFFLINE=1), or\n"
            f"  2. pass a local weights file (.safetensors, .pth or .bin):\n"
            f"       --pretrained-path /path/to/{base_name}.safetensors")


def no_hub_reason() -> str | None:
    """Why the hub cannot be asked for a checkpoint (offline, or not reachable), or None."""
    if offline():
        return "offline (HF_HUB_OFFLINE), not in the cache"
    if not hub_reachable():
        return "the Hugging Face hub is not reachable from here, and it is not in the cache"
    return None


def backbone_size_message(name: str, image_size: int, detail: str) -> str:
    return (f"backbone '{name}' does not take the benchmark's {image_size}px images ({detail}); "
            f"choose a backbone made for {image_size}px or set data.image_size")


# The recipes are data of the benchmarks package; found without importing it (that imports torch).
RECIPE_DIR = Path(importlib.util.find_spec("clbench.benchmarks").submodule_search_locations[0]) / "recipes"
# Further folders of recipes, added by plugins (``add_recipe_dir``); searched after RECIPE_DIR.
PLUGIN_RECIPE_DIRS: list[Path] = []


def _recipe_dirs() -> list[Path]:
    return [RECIPE_DIR, *PLUGIN_RECIPE_DIRS]


def add_recipe_dir(folder: str | Path) -> None:
    """Make the ``<method>.yaml`` recipes in ``folder`` known: what a plugin that registers a
    method calls (``clbench --plugins``), so its method plans like a built-in one."""
    folder = Path(folder).resolve()
    if folder not in PLUGIN_RECIPE_DIRS:
        PLUGIN_RECIPE_DIRS.append(folder)


def _recipe_path(method: str) -> Path | None:
    return next((d / f"{method}.yaml" for d in _recipe_dirs() if (d / f"{method}.yaml").exists()), None)


def load_recipe(method: str, _chain: tuple[str, ...] = ()) -> dict[str, Any]:
    """A method's recipe. ``extends: <method>`` starts from that method's recipe and merges this
    file's sections over it (a variant states only what differs from its base)."""
    path = _recipe_path(method)
    if path is None:
        raise ConfigError(f"no recipe for method '{method}': expected {RECIPE_DIR / f'{method}.yaml'}"
                          + (" or one in a plugin's recipe folder" if PLUGIN_RECIPE_DIRS else ""))
    with open(path) as f:
        recipe = yaml.safe_load(f) or {}
    if not isinstance(recipe, dict):
        raise ConfigError(f"{path}: a recipe is a mapping of sections (default, <bench>, <bench>@<N>)")
    base = recipe.pop("extends", None)
    if base is None:
        return recipe
    if base in (method, *_chain):
        raise ConfigError(f"{path}: 'extends: {base}' makes a cycle ({' -> '.join((*_chain, method, base))})")
    return deep_merge(load_recipe(base, (*_chain, method)), recipe)


def has_recipe(method: str) -> bool:
    return _recipe_path(method) is not None


def merged_layers(method: str, benchmark: Any, num_tasks: int, overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    """A run's configuration as its layers give it, later layers winning (the dataclass defaults
    are not in it): the recipe's ``default:`` section, the benchmark's own ``defaults`` (synth's
    backbone), the recipe's ``<bench>:`` then ``<bench>@<N>:`` sections, then ``overrides`` (the
    command line's ``--set``, ``--backbone``, ...). ``benchmark``: a registered ``Benchmark``.
    A section other than backbone, train, data and method is a ``ConfigError``."""
    recipe = load_recipe(method)
    layers = [recipe.get("default", {}), benchmark.defaults, recipe.get(benchmark.name, {}),
              recipe.get(f"{benchmark.name}@{num_tasks}", {}), overrides or {}]
    merged: dict[str, Any] = {}
    for i, layer in enumerate(layers):
        for section in layer or {}:
            if section not in SECTIONS:
                raise ConfigError(
                    f"unknown section '{section}'{did_you_mean(section, SECTIONS)} in the configuration of {method} "
                    f"on {benchmark.name} (layer {i}); valid sections: {', '.join(SECTIONS)}")
        deep_merge(merged, json.loads(json.dumps(layer or {})))  # a deep copy, as plain JSON data
    return merged


def unknown_name(kind: str, name: str, choices: Collection[str]) -> str:
    """The message for an unknown method or benchmark: the closest name and every valid one."""
    return f"unknown {kind} '{name}'{did_you_mean(name, choices)}; known: {', '.join(sorted(choices))}"


def unique_seeds(seeds: list[int]) -> tuple[list[int], list[int]]:
    """The seeds in their order without repeats, and the repeated ones."""
    kept: list[int] = []
    repeated: list[int] = []
    for s in seeds:
        (repeated if s in kept else kept).append(s)
    return kept, repeated


# ----------------------------------------------------------------------------- your own data

FOLDER_PREFIX = "folder:"  # --bench folder:PATH, a benchmark made from a folder of class folders


def folder_layout(path: Path) -> tuple[Path, list[str]]:
    """A folder benchmark's class folders: those of ``path/train`` when ``path`` has ``train/``
    and ``test/``, else ``path``'s own sub-folders (split once; ``benchmarks.datasets.load_folder``)."""
    where = path / "train" if (path / "train").is_dir() and (path / "test").is_dir() else path
    try:
        classes = sorted(e.name for e in os.scandir(where) if e.is_dir() and not e.name.startswith("."))
    except OSError:
        classes = []
    return where, classes


def absolute_benchmark(name: str) -> str:
    """``folder:PATH`` with PATH absolute (a worker elsewhere reads the same folder); other names as given."""
    if not name.startswith(FOLDER_PREFIX):
        return name
    return FOLDER_PREFIX + str(Path(name[len(FOLDER_PREFIX):]).expanduser().resolve())


# ----------------------------------------------------------------------------- plugins

_PLUGIN_FILES: dict[str, Any] = {}  # a .py plugin imported from its path, by resolved path


def import_plugins(names: Sequence[str]) -> None:
    """Import each plugin: a module name on ``sys.path`` or a ``.py`` file. A plugin registers
    methods (``@register_method`` and ``add_recipe_dir``) or benchmarks (``register_benchmark``)
    when imported; importing one twice does nothing."""
    for name in names:
        if name.endswith(".py"):
            path = str(Path(name).expanduser().resolve())
            if path in _PLUGIN_FILES:
                continue
            if not Path(path).is_file():
                raise ConfigError(f"--plugins {name}: no such file")
            spec = importlib.util.spec_from_file_location(f"clbench_plugin_{Path(path).stem}", path)
            module = importlib.util.module_from_spec(spec)
            _PLUGIN_FILES[path] = module
            sys.modules[spec.name] = module
            spec.loader.exec_module(module)
        else:
            try:
                importlib.import_module(name)
            except ModuleNotFoundError as err:
                if err.name != name.split(".")[0] and err.name != name:
                    raise
                raise ConfigError(f"--plugins {name}: no module of that name on the path (install it, add its "
                                  f"folder to PYTHONPATH, or give its .py file)") from err
