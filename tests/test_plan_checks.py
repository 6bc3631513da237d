"""Plan-time validation: each bad plan fails once, with one message, before any run starts.

The checks that need no torch (names, tasks, seeds, recipes, whether data and weight files are
there at all) answer before torch is imported (checked here in a fresh process, as a user would
start it); those that need torch (backbone, cached weights, the data's layout) run once for the
whole plan after the imports, before any run or submission.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import huggingface_hub
import pytest
import timm
import torchvision
import yaml
from helpers import CUB_CLASSES, WNIDS, class_tree, domainnet_tree, fake_cifar100

from clbench import catalog, request
from clbench.benchmarks import BENCHMARKS
from clbench.benchmarks import datasets as D
from clbench.cli import main
from clbench.methods import METHODS
from clbench.preflight import backbone_problem
from clbench.protocol import Run
from clbench.recipes import resolve_config

# The command line in a fresh process; afterwards it says on stdout whether torch was imported.
TORCH_FREE = ("import sys\nfrom clbench.cli import main\ncode = main(sys.argv[1:])\n"
              "print('torch imported' if 'torch' in sys.modules else 'no torch')\nsys.exit(code)")


def run_cli(*argv: str, env: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess, bool]:
    """The command line run as a user starts it, and whether it answered before importing torch."""
    done = subprocess.run([sys.executable, "-c", TORCH_FREE, *argv], capture_output=True, text=True,
                          timeout=300, env=env)
    return done, "no torch" in done.stdout


@pytest.mark.parametrize("argv, message", [
    (["--tasks", "0"], "the number of tasks must be positive"),
    (["--tasks", "7"], "synth with 7 tasks: 200 classes do not split into 7 equal tasks"),
    (["--bench", "imr", "--tasks", "7"], "imr with 7 tasks: 200 classes do not split into 7 equal tasks"),
    (["--seeds", "-1"], "seed(s) -1 out of range"),
    (["--seeds", "4294967296"], "seed(s) 4294967296 out of range"),
    (["--methods", "sdlroa"], "unknown method 'sdlroa' (did you mean 'sdlora'?)"),
    (["reprot"], "unknown sub-command 'reprot' (did you mean 'report'?)"),
], ids=["tasks 0", "tasks 7 on synth", "tasks 7 on imr", "seed -1", "seed 2**32",
        "method typo", "sub-command typo"])
def test_a_bad_plan_fails_at_once_with_one_message(tmp_path, argv, message):
    done, torch_free = run_cli(*argv, "--out", str(tmp_path)) if argv[0] != "reprot" else run_cli(*argv)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr
    assert "Traceback" not in done.stderr and done.stderr.count("error:") == 1
    assert not (tmp_path / "runs").exists()
    assert torch_free, "the check imported torch first"


def offline_env(tmp_path) -> dict[str, str]:
    """The environment of a machine without the hub: offline, with an empty Hugging Face cache."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "empty_hf_cache")}


@pytest.mark.parametrize("argv, message, torch_free", [
    (["--backbone", "vit_small_patch16_224", "--pretrained-path", "{file}"],
     "backbone 'vit_small_patch16_224' does not take the benchmark's 32px images", False),
    (["--bench", "imr", "--tasks", "10", "--data-root", "{presplit}"],
     "could not load pretrained weights for 'vit_base_patch16_224.augreg2_in21k_ft_in1k' (offline", False),
    (["--bench", "ima", "--tasks", "10", "--pretrained-path", "{file}", "--data-root", "{empty}"],
     "ImageNet-A (ima): no usable data in", True),
    (["--pretrained-path", "{empty}/model.safetensors"], "backbone.pretrained_path '{empty}/model.safetensors' does not exist",
     True),
], ids=["backbone vs image size", "weights missing offline", "data missing", "pretrained path missing"])
def test_backbone_weights_and_data_of_builtin_benchmarks_fail_at_once(tmp_path, argv, message, torch_free):
    """Missing data folders and weight files are found before torch is imported; a backbone that
    does not take the images, and weights not in the cache offline, once timm says so: either way
    one message, from a fresh process, before any run."""
    weights = tmp_path / "weights.safetensors"
    weights.write_bytes(b"")
    (tmp_path / "empty").mkdir()
    class_tree(tmp_path / "imagenet-r" / "train", WNIDS, 1)
    class_tree(tmp_path / "imagenet-r" / "test", WNIDS, 1)
    fill = {"file": str(weights), "empty": str(tmp_path / "empty"), "presplit": str(tmp_path)}
    argv = [a.format(**fill) for a in argv]
    done, answered_torch_free = run_cli(*argv, "--methods", "sdlora", "--out", str(tmp_path / "r"),
                                        env=offline_env(tmp_path))
    assert done.returncode == 2, done.stderr
    assert message.format(**fill) in done.stderr
    assert "Traceback" not in done.stderr and done.stderr.count("error:") == 1
    assert not (tmp_path / "r").exists()
    assert answered_torch_free == torch_free


def test_backbone_facts_come_from_timm(monkeypatch):
    """The backbone check asks timm: a model takes its own input size and no other."""
    for name, size in (("vit_base_patch16_224.augreg2_in21k_ft_in1k", 224), ("vit_tiny_patch16_224", 224)):
        assert backbone_problem(name, size) is None
        assert backbone_problem(name, 32) is not None
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", "/nonexistent/hf_cache")
    assert catalog.hub_cached_file("timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k") is None


def _layouts(root):
    """Every accepted layout of the built-in benchmarks, tiny: (benchmark, data root, loader call)."""
    imr = root / "imr_presplit" / "imagenet-r"
    class_tree(imr / "train", WNIDS, 2)
    class_tree(imr / "test", WNIDS, 1)
    raw = root / "imr_raw" / "imagenet-r"
    class_tree(raw, WNIDS, 5)
    lists = root / "imr_lists"  # the data root is the ImageNet-R folder itself
    rel = [p.relative_to(lists).as_posix() for p in class_tree(lists, WNIDS, 2)]
    (lists / "splits").mkdir()
    for side, chosen in (("train", rel[0::2]), ("test", rel[1::2])):
        doc = {"data": chosen, "targets": [WNIDS.index(r.split("/")[0]) for r in chosen]}
        (lists / "splits" / f"imagenet-r_{side}.yaml").write_text(yaml.safe_dump(doc))
    ima = root / "ima" / "imagenet-a"
    class_tree(ima / "train", WNIDS, 1)
    class_tree(ima / "test", WNIDS, 1)
    dn = root / "dn" / "domainnet"
    domainnet_tree(dn)
    c100 = root / "c100"
    fake_cifar100(c100 / "cifar100", per_class=1)
    cub = root / "cub_presplit" / "cub"
    class_tree(cub / "train", CUB_CLASSES, 1)
    class_tree(cub / "test", CUB_CLASSES, 1)
    original = root / "cub_original" / "cub" / "CUB_200_2011"
    rel = [p.relative_to(original / "images").as_posix() for p in class_tree(original / "images", CUB_CLASSES, 2)]
    (original / "images.txt").write_text("".join(f"{i} {r}\n" for i, r in enumerate(rel, 1)))
    (original / "image_class_labels.txt").write_text("".join(f"{i} {(i - 1) // 2 + 1}\n" for i in range(1, 7)))
    (original / "train_test_split.txt").write_text("".join(f"{i} {i % 2}\n" for i in range(1, 7)))
    return [("imr", imr.parent, D.load_imagenet_r, 3), ("imr", raw.parent, D.load_imagenet_r, 3),
            ("imr", lists, D.load_imagenet_r, 3), ("ima", ima.parent, D.load_imagenet_a, 3),
            ("dn", dn.parent, D.load_domainnet, 3), ("c100", c100, D.load_cifar100, 100),
            ("c100", c100 / "cifar100" / "cifar-100-python", D.load_cifar100, 100),
            ("cub", cub.parent, D.load_cub, 3), ("cub", original.parent.parent, D.load_cub, 3),
            ("cub", original, D.load_cub, 3)]


def test_the_torch_free_data_check_passes_every_accepted_layout(tmp_path, monkeypatch):
    """``data_presence_problem`` runs before the loaders: it must never refuse data they accept,
    and it refuses a missing or empty folder, or one that holds nothing of any layout."""
    # the fake CIFAR files cannot have the official md5s; trust their existence instead
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda path, md5=None: os.path.isfile(path))
    for bench, root, load, num_classes in _layouts(tmp_path / "layouts"):
        facts = BENCHMARKS[bench]
        where = catalog.data_dir(facts.folder, root)
        train, _ = load(where, lambda x: x, lambda x: x, tmp_path / "splits", num_classes=num_classes)
        assert len(train) > 0
        assert catalog.data_presence_problem(facts, root) is None, (bench, root)
    (tmp_path / "empty").mkdir()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("")
    for bench, facts in BENCHMARKS.items():
        if facts.markers is None:
            continue
        for root, why in ((tmp_path / "missing", "the folder does not exist"), (tmp_path / "empty", "it is empty"),
                          (tmp_path / "other", "nothing in it belongs to an accepted layout")):
            problem = catalog.data_presence_problem(facts, root)
            assert problem is not None and why in problem and "Accepted layouts" in problem, (bench, root)


def test_an_unreachable_hub_is_found_by_one_bounded_attempt_and_named(monkeypatch):
    catalog.hub_reachable.cache_clear()
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    for proxy in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(proxy, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.invalid")  # .invalid never resolves (RFC 2606)
    attempts = []
    connect = socket.create_connection

    def counted_connect(address, timeout=None, *args, **kwargs):
        attempts.append((address, timeout))
        return connect(address, timeout, *args, **kwargs)

    monkeypatch.setattr(socket, "create_connection", counted_connect)
    try:
        assert catalog.hub_reachable() is False
        # one connection attempt with a timeout of seconds, not a download's minute of retries
        assert len(attempts) == 1 and attempts[0][0] == ("hub.invalid", 443) and 0 < attempts[0][1] <= 5
        assert "not reachable" in catalog.no_hub_reason()
        assert len(attempts) == 1  # the answer is kept for the rest of the process
        monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")  # a proxy: only a download can tell
        catalog.hub_reachable.cache_clear()
        assert catalog.hub_reachable() is True
    finally:
        catalog.hub_reachable.cache_clear()


def test_every_problem_is_listed_in_the_one_message(tmp_path):
    done, _ = run_cli("--tasks", "0,7", "--seeds", "-1", "--methods", "sdlroa", "--out", str(tmp_path))
    assert done.returncode == 2
    assert "the plan has 4 problems" in done.stderr
    for part in ("must be positive", "7 equal tasks", "out of range", "did you mean 'sdlora'"):
        assert part in done.stderr


def test_an_unknown_benchmark_is_named_with_the_closest(tmp_path, capsys):
    # not among the built-in names: the full registry decides (it may hold benchmarks registered
    # at run time), so this one pays for the imports first
    assert main(["--bench", "imnr", "--out", str(tmp_path)]) == 2
    assert "unknown benchmark 'imnr' (did you mean 'imr'?)" in capsys.readouterr().err


def test_an_explicit_initial_size_and_increment_make_a_split_valid():
    assert request.check_request(["synth"], [7], ["full_ft"], [0], {"data": {"initial_classes": 12,
                                                                             "increment": 8}}) == []


def test_repeated_seeds_are_planned_once_with_a_warning(tmp_path, capsys):
    assert main(["--bench", "toy", "--methods", "full_ft", "--seeds", "0,0,1", "--dry-run",
                 "--out", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    assert "seed(s) 0 given more than once" in captured.err
    assert "2 runs planned" in captured.out


def test_a_benchmark_registered_at_run_time_is_checked_like_a_builtin_one(tmp_path, capsys):
    assert "toy" in BENCHMARKS  # tests/helpers.py registers it (conftest.py imports it)
    assert main(["--bench", "toy", "--tasks", "5", "--methods", "full_ft", "--out", str(tmp_path)]) == 2
    assert "toy with 5 tasks: 12 classes do not split into 5 equal tasks" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_the_method_names_read_without_torch_are_the_registered_methods():
    """``request.builtin_method_names`` reads the ``@register_method`` decorators of methods/
    without importing it: exactly the methods that importing it registers, each with a recipe."""
    builtin = {name for name, cls in METHODS.items() if cls.__module__.startswith("clbench.methods.")}
    assert sorted(request.builtin_method_names()) == sorted(builtin)
    assert all(catalog.has_recipe(name) for name in builtin)
    assert set(request.method_names()) == set(METHODS)  # with those registered at run time


def test_a_method_without_a_recipe_is_refused_at_plan_time(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(METHODS, "no_recipe", METHODS["full_ft"])
    assert main(["--bench", "toy", "--methods", "no_recipe", "--dry-run", "--out", str(tmp_path)]) == 2
    assert "method 'no_recipe' has no recipe: write benchmarks/recipes/no_recipe.yaml" in capsys.readouterr().err


def _failing_main(argv: list[str]) -> None:
    assert main(argv) == 2


@pytest.fixture
def built_backbones(monkeypatch) -> list[str]:
    """The backbones timm builds while the test runs, other than weightless ``meta`` models (the
    plan checks' kind): building one, with its memory and weights, is a run's work, not a check's."""
    built: list[str] = []
    create_model = timm.create_model

    def recorded(name, *args, **kwargs):
        model = create_model(name, *args, **kwargs)
        if any(p.device.type != "meta" for p in model.parameters()):
            built.append(name)
        return model

    monkeypatch.setattr(timm, "create_model", recorded)
    return built


def test_a_backbone_that_does_not_take_the_image_size_fails_before_any_run(tmp_path, capsys, monkeypatch,
                                                                          built_backbones):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _failing_main(["--bench", "synth", "--tasks", "5", "--backbone", "vit_small_patch16_224",
                           "--pretrained-path", str(tmp_path), "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert "backbone 'vit_small_patch16_224' does not take the benchmark's 32px images" in err
    assert err.count("error:") == 1 and "Traceback" not in err
    assert not (tmp_path / "r" / "runs").exists()
    assert built_backbones == []


def test_missing_pretrained_weights_offline_fail_once_without_retries(tmp_path, capsys, monkeypatch,
                                                                      built_backbones):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty_hf_cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))
    _failing_main(["--bench", "toy", "--methods", "full_ft", "--seeds", "0,1",
                           "--set", "backbone.pretrained=true", "--set", "backbone.name=vit_tiny_patch16_224",
                           "--set", "data.image_size=224", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert "could not load pretrained weights for 'vit_tiny_patch16_224'" in err and "--pretrained-path" in err
    assert "Retrying" not in err and err.count("error:") == 1
    assert "2 run(s)" in err  # one check for both seeds
    assert built_backbones == []


def test_missing_data_fails_before_any_run_or_submission(tmp_path, capsys, monkeypatch, built_backbones):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for launcher in ("local", "slurm"):
        _failing_main(["--bench", "cub", "--tasks", "10", "--methods", "full_ft", "--seeds", "0",
                               "--pretrained-path", str(tmp_path), "--backbone", "vit_tiny_patch16_224",
                               "--data-root", str(tmp_path / "nodata"), "--launcher", launcher,
                               "--out", str(tmp_path / "r")])
        err = capsys.readouterr().err
        assert "CUB-200 (cub): no usable data" in err and "Accepted layouts" in err
        assert not (tmp_path / "r" / "runs").exists() and not (tmp_path / "r" / "slurm").exists()
    assert built_backbones == []


def test_the_dry_run_shows_the_checks(tmp_path, capsys):
    assert main(["--bench", "toy", "--methods", "full_ft", "--seeds", "0", "--dry-run", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "ok   backbone vit_toy_patch4_16 at 16px" in out and "ok   data of toy" in out
    assert not (tmp_path / "splits").exists()


def test_a_set_key_typo_names_the_closest_key(tmp_path, capsys):
    assert main(["--bench", "toy", "--methods", "full_ft", "--seeds", "0", "--set", "train.epoch=3",
                 "--dry-run", "--out", str(tmp_path)]) == 2
    assert "unknown key 'train.epoch' (did you mean 'epochs'?)" in capsys.readouterr().err


def test_help_lists_the_methods_benchmarks_and_sub_commands_without_torch():
    done = subprocess.run([sys.executable, "-c", "import sys\nfrom clbench.cli import main\ntry:\n    main(['--help'])\n"
                           "except SystemExit:\n    pass\nassert 'torch' not in sys.modules\n"
                           "from clbench.benchmarks import BENCHMARKS\nprint('REGISTERED', *BENCHMARKS)"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    usage, _, registered = done.stdout.rpartition("REGISTERED")
    assert "synth" in registered.split()  # a fresh process's benchmarks, not those the tests registered
    for name in [*request.builtin_method_names(), *registered.split(), "preflight", "status", "collect", "speed"]:
        assert name in usage


def test_progress_bars_only_on_a_terminal(tmp_path, monkeypatch):
    cfg = resolve_config("toy", 3, "full_ft", 0, device="cpu")
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    assert Run(cfg, tmp_path, progress=True).progress is False  # a log file: one line per task
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert Run(cfg, tmp_path, progress=True).progress is True


@pytest.mark.parametrize("joint, expected", [
    ("auto", []), ("none", []), ("all", ["full_ft", "sdlora"]), ("sdlora", ["sdlora"]),
])
def test_joint_reference_runs_are_planned_once_per_seed(tmp_path, capsys, joint, expected):
    """``--joint``: the methods also trained on every class at once (one task), after the sweep's
    own runs; ``--tasks 1`` and ``--joint`` together plan each such run once."""
    for tasks in ("3", "1,3"):
        assert main(["--bench", "toy", "--tasks", tasks, "--methods", "full_ft,sdlora", "--seeds", "0,1",
                     "--joint", joint, "--dry-run", "--out", str(tmp_path)]) == 0
        planned = [line.split()[1] for line in capsys.readouterr().out.splitlines() if line.startswith("todo")]
        one_task = sorted({key.split("/")[2] for key in planned if "/N1/" in key})
        assert one_task == (["full_ft", "sdlora"] if tasks == "1,3" else expected)
        assert len(planned) == len(set(planned)) == 2 * (2 + len(one_task))


def test_the_whole_comparison_comes_with_joint_full_fine_tuning(tmp_path, capsys):
    assert main(["--bench", "toy", "--seeds", "0", "--dry-run", "--out", str(tmp_path)]) == 0
    planned = [line.split()[1] for line in capsys.readouterr().out.splitlines() if line.startswith("todo")]
    assert [key for key in planned if "/N1/" in key] == ["toy/N1/full_ft/seed0"] and planned[-1] == "toy/N1/full_ft/seed0"


@pytest.mark.parametrize("argv, message", [
    (["--methods", "l2p", "--set", "method.top_k=20"], "method.top_k=20 must be between 1 and method.pool_size=10"),
    (["--set", "data.val_fraction=1.5", "--eval-on", "val"], "data.val_fraction must be between 0 and 1"),
    (["--eval-on", "val", "--set", "data.image_cache=true"], "data.eval_on=val with data.image_cache=true"),
    (["--methods", "coda_prompt", "--set", "method.num_components=3"], "method.num_components=3 gives no component"),
    (["--methods", "hide_prompt", "--set", "method.pool_size=4"], "pool_size=4 holds fewer prompts than the 10 tasks"),
], ids=["l2p top_k", "val_fraction", "val with image cache", "coda components per task", "hide pool"])
def test_a_bad_combination_of_keys_fails_the_plan(tmp_path, capsys, argv, message):
    """Each configuration section validates its keys' relations when the run is resolved: the
    plan refuses the combination (also under --dry-run and preflight), once, writing nothing."""
    for extra in (["--dry-run"], []):
        assert main(["--bench", "synth", *argv, *extra, "--out", str(tmp_path / "r")]) == 2
        out, err = capsys.readouterr()
        assert message in err and err.count("error:") == 1 and "Traceback" not in err
        assert "runs planned" not in out
        assert not (tmp_path / "r").exists()
    assert main(["preflight", "--bench", "synth", *argv, "--out", str(tmp_path / "r")]) == 2
    assert message in capsys.readouterr().err


def test_a_dry_run_prints_the_plan_and_each_recipe_before_the_missing_data(tmp_path, capsys, monkeypatch):
    """A plan whose data is not here (a login node, a laptop) still shows every run's recipe."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["--bench", "cub", "--methods", "sdlora", "--seeds", "0", "--dry-run", "--pretrained-path",
                 str(tmp_path), "--data-root", str(tmp_path / "nodata"), "--out", str(tmp_path / "r")]) == 2
    out, err = capsys.readouterr()
    assert "todo  cub/N10/sdlora" in out and "epochs=" in out and "1 runs planned" in out
    assert "FAIL data of cub" in out
    assert "CUB-200 (cub): no usable data" in err and err.count("error:") == 1
    assert not (tmp_path / "r").exists()
