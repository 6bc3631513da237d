"""What the command line can know without importing torch: the built-in benchmarks' facts, the
method names (every method has a recipe file), and the checks a sweep's request can pass or fail
on those facts alone.

``benchmarks/datasets.py`` and ``benchmarks/synth.py`` register their benchmarks from
``BUILTIN_BENCHMARKS``, so the class counts and default task counts have one source. The checks
here run before the registries are imported (about 5 s of torch, torchvision, timm and sklearn),
so a bad plan fails at once; names not found here (a benchmark registered at run time, like the
tests' ``toy``) are left to the same checks run again on the full registry.
"""
from __future__ import annotations

import argparse
import fnmatch
import functools
import importlib
import importlib.util
import os
import socket
import sys
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Collection, Mapping, Protocol, Sequence

import yaml

from clbench.config import LOGGERS, BackboneConfig, deep_merge, expand_grid, parse_set
from clbench.errors import ConfigError, did_you_mean
from clbench.task import task_sizes

SEED_MAX = 2**32 - 1  # numpy's and torch's seeds are unsigned 32-bit integers


@dataclass(frozen=True)
class BenchmarkFacts:
    """A benchmark's torch-free facts: what a plan is checked against, and what its error
    messages say about it (folder, accepted layouts, where the data is published)."""

    name: str  # short name used on the command line
    title: str  # as the paper's tables write it
    num_classes: int
    default_tasks: list[int]
    image_size: int = 224
    folder: str = ""  # default sub-folder of the data root
    layouts: str = ""  # tree diagram of the accepted layouts
    source: str = ""  # where the data is published; shown when it is missing
    # Entries of the benchmark's folder of which at least one is there in every accepted layout
    # (fnmatch patterns; a trailing "/" matches a folder): the torch-free check that data is
    # there at all. None: no data on disk (generated).
    markers: tuple[str, ...] | None = None
    backbone: str | None = None  # the benchmark's own backbone (a configuration layer before the recipe's)

    def fields(self) -> dict[str, Any]:
        """These facts as ``Benchmark`` keyword arguments."""
        return {"name": self.name, "title": self.title, "num_classes": self.num_classes,
                "default_tasks": list(self.default_tasks), "image_size": self.image_size,
                "folder": self.folder, "source": self.source}


BUILTIN_BENCHMARKS: dict[str, BenchmarkFacts] = {b.name: b for b in (
    BenchmarkFacts(
        "imr", "ImageNet-R", 200, [5, 10, 20], folder="imagenet-r", markers=("*/", "*train.*", "*test.*"),
        layouts="""\
  (1) pre-split archive (PILOT/APER; what SD-LoRA reads)
        imagenet-r/train/<wnid>/*.jpg      200 class folders, e.g. n01443537
        imagenet-r/test/<wnid>/*.jpg       the same 200
  (2) split lists (CODA-Prompt style) next to the images
        imagenet-r/imagenet-r_train.yaml   {data: [paths], targets: [ints]}, or *_train.txt
        imagenet-r/imagenet-r_test.yaml    lines '<path> <label>'; may also sit in imagenet-r/splits/
        imagenet-r/<wnid>/*.jpg
  (3) the raw release: split 80/20 once, written to the splits folder, reused afterwards
        imagenet-r/<wnid>/*.jpg            200 class folders""",
        source="https://github.com/hendrycks/imagenet-r (raw release), or the pre-split archive linked "
               "from the LAMDA-PILOT README (https://github.com/sun-hailong/LAMDA-PILOT)"),
    BenchmarkFacts(
        "ima", "ImageNet-A", 200, [10], folder="imagenet-a", markers=("train/", "test/"),
        layouts="""\
  pre-split archive (PILOT/APER; what SD-LoRA and InfLoRA read)
        imagenet-a/train/<wnid>/*.jpg      200 class folders, e.g. n01498041
        imagenet-a/test/<wnid>/*.jpg       the same 200""",
        source="https://github.com/hendrycks/natural-adv-examples (raw release); the train/test split "
               "SD-LoRA uses is the pre-split archive linked from the LAMDA-PILOT README "
               "(https://github.com/sun-hailong/LAMDA-PILOT)"),
    BenchmarkFacts(
        "dn", "DomainNet", 345, [5], folder="domainnet", markers=("*train.*", "*test.*", "splits/"),
        layouts="""\
  images of the six domains, plus split lists (concatenated per side; YAML wins over txt)
        domainnet/clipart/<class>/*.jpg    … infograph/ painting/ quickdraw/ real/ sketch/
        domainnet/domainnet_train.yaml     CODA-Prompt/InfLoRA: {data: [paths], targets: [ints]};
        domainnet/domainnet_test.yaml      a path prefix such as data/domainnet/ is dropped
      or
        domainnet/clipart_train.txt        DomainNet's own lists: '<domain>/<class>/<file>.jpg <label>'
        domainnet/clipart_test.txt         … one pair per domain
  lists may also sit in domainnet/splits/; labels are 0..344""",
        source="http://ai.bu.edu/M3SDA/ (images and <domain>_{train,test}.txt lists); the split used by "
               "CODA-Prompt and InfLoRA is dataloaders/splits/domainnet_{train,test}.yaml in "
               "https://github.com/GT-RIPL/CODA-Prompt or https://github.com/liangyanshuo/InfLoRA"),
    BenchmarkFacts(
        "c100", "CIFAR-100", 100, [10], folder="cifar100", markers=("cifar-100-python/", "train"),
        layouts="""\
  torchvision's extracted archive (cifar-100-python.tar.gz)
        cifar100/cifar-100-python/{train,test,meta}   or <data root>/cifar-100-python/""",
        source="https://www.cs.toronto.edu/~kriz/cifar.html, or torchvision.datasets.CIFAR100(DIR, "
               "download=True) on a machine with internet, then copy DIR"),
    BenchmarkFacts(
        "cub", "CUB-200", 200, [10], folder="cub", markers=("train/", "test/", "CUB_200_2011/", "images.txt"),
        layouts="""\
  (1) pre-split archive (APER/PILOT)
        cub/train/<class>/*.jpg            200 class folders, e.g. 001.Black_footed_Albatross
        cub/test/<class>/*.jpg             the same 200
  (2) the original release (CUB_200_2011.tgz extracted into cub/, or cub/ being that folder)
        cub/CUB_200_2011/images.txt, image_class_labels.txt, train_test_split.txt
        cub/CUB_200_2011/images/<class>/*.jpg""",
        source="https://www.vision.caltech.edu/datasets/cub_200_2011/ (original release); the pre-split "
               "archive is linked from the LAMDA-PILOT README (https://github.com/sun-hailong/LAMDA-PILOT)"),
    # 200 classes, as ImageNet-R: 5, 10 or 20 tasks; the default suite runs N=10 (README)
    BenchmarkFacts("synth", "Synthetic", 200, [10], image_size=32, folder="synth",
                   source="built in: generated offline by benchmarks/synth.py", backbone="vit_synth_patch8_32"),
)}


@dataclass(frozen=True)
class BackboneFacts:
    """A timm backbone's torch-free facts (checked against timm by ``tests/test_plan_checks.py``)."""

    name: str  # as a recipe or --backbone names it (an untagged name means timm's default tag)
    image_size: int  # the one input size the model takes
    hf_hub_id: str | None  # where timm downloads its pretrained weights; None: a registered builder


BUILTIN_BACKBONES: dict[str, BackboneFacts] = {b.name: b for b in (
    # SD-LoRA's (the default), InfLoRA's and L2P/DualPrompt/HiDe-Prompt's ViT-B/16 checkpoints
    BackboneFacts("vit_base_patch16_224.augreg2_in21k_ft_in1k", 224, "timm/vit_base_patch16_224.augreg2_in21k_ft_in1k"),
    BackboneFacts("vit_base_patch16_224.augreg_in21k", 224, "timm/vit_base_patch16_224.augreg_in21k"),
    BackboneFacts("vit_base_patch16_224.orig_in21k", 224, "timm/vit_base_patch16_224.orig_in21k"),
    BackboneFacts("vit_base_patch16_224", 224, "timm/vit_base_patch16_224.augreg2_in21k_ft_in1k"),
    BackboneFacts("vit_small_patch16_224", 224, "timm/vit_small_patch16_224.augreg_in21k_ft_in1k"),
    BackboneFacts("vit_tiny_patch16_224", 224, "timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k"),
    BackboneFacts("vit_large_patch16_224", 224, "timm/vit_large_patch16_224.augreg_in21k_ft_in1k"),
    BackboneFacts("vit_synth_patch8_32", 32, None),  # synth's own, pretrained by benchmarks/synth.py
)}

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


def data_presence_problem(facts: BenchmarkFacts, root: str | os.PathLike | None) -> str | None:
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


class HasBenchmarkFacts(Protocol):
    """``BenchmarkFacts`` or a registered ``Benchmark``: what the checks read."""

    name: str
    num_classes: int
    default_tasks: list[int]


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


def method_names() -> list[str]:
    """Every method's name: each has a recipe ``<method>.yaml`` (``benchmarks/recipes/``, or a
    plugin's folder)."""
    return sorted({p.stem for d in _recipe_dirs() for p in d.glob("*.yaml")})


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


def _section(method: str | None, bench: HasBenchmarkFacts, num_tasks: int, overrides: Mapping[str, Any],
             section: str) -> dict[str, Any]:
    """One section of a run's configuration as the layers of ``clbench.recipes.resolve_config``
    give it (recipe default, the benchmark's own backbone, recipe ``<bench>`` and ``<bench>@<N>``,
    ``--set``), without the dataclass defaults; ``method=None``: ``--set`` alone."""
    # no recipe for an unknown method: resolving the run says so
    recipe = load_recipe(method) if method and _recipe_path(method) else {}
    own_backbone = getattr(bench, "backbone", None)  # a registered Benchmark has it in its defaults
    own = {"backbone": {"name": own_backbone}} if own_backbone else {}
    merged: dict[str, Any] = {}
    for layer in (recipe.get("default", {}), own, recipe.get(bench.name, {}),
                  recipe.get(f"{bench.name}@{num_tasks}", {}), overrides):
        merged.update((layer or {}).get(section, {}) or {})
    return merged


def _data_section(methods: list[str], bench: HasBenchmarkFacts, num_tasks: int,
                  overrides: Mapping[str, Any]) -> dict[str | None, tuple[Any, Any]]:
    """``data.initial_classes``/``data.increment`` per method (``None`` where nothing sets them)."""
    data: dict[str | None, tuple[Any, Any]] = {}
    for m in methods or [None]:
        merged = _section(m, bench, num_tasks, overrides, "data")
        data[m] = (merged.get("initial_classes"), merged.get("increment"))
    return data


def check_request(benches: list[str], tasks: list[int] | None, methods: list[str] | None, seeds: list[int],
                  overrides: Mapping[str, Any] | None, benchmarks: Mapping[str, HasBenchmarkFacts],
                  known_methods: Collection[str], complete: bool) -> list[str]:
    """Every problem of a sweep's request that these facts show, one message each.

    ``benchmarks``/``known_methods``: the names to check against; with ``complete=False`` a
    benchmark not among them is not a problem here (it may be registered at run time; the full
    registry is checked later)."""
    problems: list[str] = []
    method_list = list(methods) if methods else sorted(known_methods)
    unknown_methods = [m for m in method_list if m not in known_methods]
    problems += [unknown_name("method", m, known_methods) for m in unknown_methods]
    method_list = [m for m in method_list if m in known_methods]
    if not benches:
        problems.append("--bench names no benchmark")
    if tasks is not None and not tasks:
        problems.append("--tasks names no number of tasks")
    if methods is not None and not methods:
        problems.append("--methods names no method (or 'all')")
    if not seeds:
        problems.append("--seeds names no seed")
    bad_seeds = [s for s in seeds if not 0 <= s <= SEED_MAX]
    if bad_seeds:
        problems.append(f"seed(s) {', '.join(map(str, bad_seeds))} out of range: a seed is an integer "
                        f"from 0 to 2**32 - 1")
    for n in [n for n in tasks or [] if n <= 0]:
        problems.append(f"--tasks {n}: the number of tasks must be positive")
    for bench in benches:
        if bench.startswith(FOLDER_PREFIX) and bench not in benchmarks:
            try:
                facts = folder_facts(bench)
            except ConfigError as err:
                problems.append(str(err))
                continue
        elif bench not in benchmarks:
            if complete:
                problems.append(unknown_name("benchmark", bench, benchmarks))
            continue
        else:
            facts = benchmarks[bench]
        for n in [n for n in tasks or facts.default_tasks if n > 0]:
            splits: dict[tuple[Any, Any], list[str | None]] = {}
            for m, sizes in _data_section(method_list, facts, n, overrides or {}).items():
                splits.setdefault(sizes, []).append(m)
            for (initial, increment), who in splits.items():
                try:
                    task_sizes(facts.num_classes, n, initial, increment)
                except ConfigError as err:
                    whose = "" if len(who) >= len(method_list) else f" ({', '.join(map(str, who))})"
                    problems.append(f"{bench} with {n} tasks{whose}: {err}")
    return problems


def check_resources(benches: list[str], tasks: list[int] | None, methods: list[str] | None,
                    overrides: Mapping[str, Any] | None, data_root: str | None) -> list[str]:
    """What the built-in facts show about a request's backbones, weights and data, each distinct
    setting once: a backbone of ``BUILTIN_BACKBONES`` against the benchmark's image size, a
    ``pretrained_path`` that does not exist, a hub checkpoint not in the cache when the hub
    cannot be asked (offline or unreachable), a built-in benchmark's folder without data
    (``data_presence_problem``). Whatever these facts do not know (another timm model, the
    layout's details) is checked again with torch (``clbench.preflight``)."""
    default = BackboneConfig()
    backbones: dict[tuple[str, int], None] = {}
    weights: dict[tuple[str, bool, str | None], None] = {}
    data: dict[str, None] = {}
    for bench in benches:
        facts = BUILTIN_BENCHMARKS.get(bench)
        if facts is None:
            continue  # registered at run time: left to the checks with torch
        data[bench] = None
        for n in tasks or facts.default_tasks:
            for m in methods or method_names():
                b = _section(m, facts, n, overrides or {}, "backbone")
                size = _section(m, facts, n, overrides or {}, "data").get("image_size") or facts.image_size
                name = b.get("name", default.name)
                backbones[(name, size)] = None
                weights[(name, b.get("pretrained", default.pretrained), b.get("pretrained_path"))] = None
    problems = []
    for name, size in backbones:
        known = BUILTIN_BACKBONES.get(name)
        if known is not None and known.image_size != size:
            problems.append(backbone_size_message(name, size, f"it takes {known.image_size}px images"))
    for name, pretrained, path in weights:
        known = BUILTIN_BACKBONES.get(name)
        if not pretrained:
            continue
        if path:
            if not Path(path).expanduser().exists():
                problems.append(f"backbone.pretrained_path '{Path(path).expanduser()}' does not exist")
        elif known is not None and known.hf_hub_id is not None and hub_cached_file(known.hf_hub_id) is None:
            why = no_hub_reason()
            if why:
                problems.append(missing_weights_message(name, why))
    for bench in data:
        problem = data_presence_problem(BUILTIN_BENCHMARKS[bench], data_root)
        if problem:
            problems.append(problem)
    return problems


def requested_methods(args: argparse.Namespace) -> list[str] | None:
    """``--methods`` as a list, or None for ``all``."""
    if args.methods == "all":
        return None
    return [m.strip() for m in args.methods.split(",") if m.strip()]


def joint_methods(args: argparse.Namespace, planned: list[str]) -> list[str]:
    """The methods whose joint-training run (every class at once, one task) ``--joint`` asks
    for: ``auto`` joint full fine-tuning, the usual upper bound, when the whole comparison is
    planned (``--methods all``) and none otherwise; ``all`` every planned method; ``none``; or a
    comma-separated list."""
    spec = getattr(args, "joint", "none").strip()
    if spec == "none":
        return []
    if spec == "auto":
        return ["full_ft"] if getattr(args, "methods", "all") == "all" and "full_ft" in planned else []
    if spec == "all":
        return list(planned)
    return [m.strip() for m in spec.split(",") if m.strip()]


def request_layers(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The override layers the sweep options describe: one per point of the ``--set`` grid
    (``key=v1,v2`` lists multiply), each with ``--backbone``, ``--pretrained-path`` and
    ``--eval-on`` applied."""
    layers = []
    for point in expand_grid(args.overrides):
        overrides = parse_set(point)
        if args.backbone:
            overrides.setdefault("backbone", {})["name"] = args.backbone
        if args.pretrained_path:
            overrides.setdefault("backbone", {})["pretrained_path"] = args.pretrained_path
        if getattr(args, "eval_on", None) and args.eval_on != "test":
            overrides.setdefault("data", {})["eval_on"] = args.eval_on
        layers.append(overrides)
    return layers


def check_args(args: argparse.Namespace, benchmarks: Mapping[str, HasBenchmarkFacts],
               known_methods: Collection[str], complete: bool) -> list[str]:
    """``check_request`` for the sweep options (``clbench.options.add_sweep_arguments``)."""
    problems = [f"--{name} {getattr(args, name)}: must be at least 1" for name in ("jobs", "threads")
                if isinstance(getattr(args, name, None), int) and getattr(args, name) < 1]
    problems += [f"--joint: {unknown_name('method', m, known_methods)}"
                 for m in joint_methods(args, []) if m not in known_methods]
    problems += [f"--log {name}: unknown; use {', '.join(LOGGERS)}" for name in getattr(args, "log", None) or []
                 if name not in LOGGERS]
    try:
        points = expand_grid(args.overrides)
    except ConfigError as err:
        return problems + [str(err)]
    for point in points:  # every point of a --set grid is a plan of its own
        for problem in check_request(args.bench, args.tasks, requested_methods(args), args.seeds, parse_set(point),
                                     benchmarks, known_methods, complete):
            if problem not in problems:
                problems.append(problem)
    return problems


def check_args_resources(args: argparse.Namespace) -> list[str]:
    """``check_resources`` for the sweep options, every point of a ``--set`` grid."""
    problems: list[str] = []
    for layer in request_layers(args):
        problems += [p for p in check_resources(args.bench, args.tasks, requested_methods(args), layer, args.data_root)
                     if p not in problems]
    return problems


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


def folder_facts(name: str) -> BenchmarkFacts:
    """The facts of ``folder:PATH`` from the folder itself: one class per class folder; by
    default as many tasks as the first of 10, 5, 4, 2 that divides the classes (else one);
    images at 224 pixels, the ViTs' size (``--set data.image_size=N`` for another)."""
    path = Path(name[len(FOLDER_PREFIX):]).expanduser()
    if not path.is_dir():
        raise ConfigError(f"--bench {name}: {path} is not a folder; give a folder with train/<class>/* and "
                          f"test/<class>/*, or one of class folders <class>/*")
    where, classes = folder_layout(path)
    if len(classes) < 2:
        raise ConfigError(f"--bench {name}: found {len(classes)} class folder(s) in {where}; a benchmark needs at "
                          f"least 2 (a folder per class, its images inside)")
    tasks = next((n for n in (10, 5, 4, 2) if len(classes) % n == 0 and n < len(classes)), 1)
    return BenchmarkFacts(name, path.name, len(classes), [tasks])


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
