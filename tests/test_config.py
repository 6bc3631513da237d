"""Recipe layering and validation: unknown keys are errors that list the valid ones."""
import dataclasses
import json

import pytest

from clbench import catalog
from clbench.benchmarks import BENCHMARKS
from clbench.catalog import load_recipe
from clbench.config import RunConfig, TrainConfig, parse_set, without_execution_settings
from clbench.errors import ConfigError
from clbench.methods import get_method
from clbench.recipes import resolve_config

FT = get_method("full_ft").Config


@pytest.fixture
def resolve(monkeypatch):
    """``resolve(overrides, defaults=...)``: full_ft on toy N=3, toy's defaults replaced."""
    def resolve(overrides=None, bench="toy", n=3, defaults=None):
        if defaults is not None:
            monkeypatch.setitem(BENCHMARKS, bench, dataclasses.replace(BENCHMARKS[bench], defaults=defaults))
        return resolve_config(bench, n, "full_ft", seed=1, overrides=overrides)
    return resolve


def test_layers_recipe_then_benchmark_then_cli(resolve):
    cfg = resolve(defaults={"train": {"epochs": 7, "batch_size": 16}})
    assert cfg.train.optimizer == "adam"  # recipe default
    assert cfg.train.epochs == 7  # benchmark default beats recipe default
    cfg = resolve(defaults={"train": {"epochs": 7}}, overrides=parse_set(["train.epochs=2"]))
    assert cfg.train.epochs == 2 and cfg.tag.startswith("cfg")  # the command line wins, and is tagged
    assert resolve().tag == ""


def test_synth_section_of_recipe_applies(resolve):
    recipe = load_recipe("full_ft")
    default, synth = recipe["default"]["train"], recipe["synth"]["train"]
    assert (synth["epochs"], synth["lr"]) != (default["epochs"], default["lr"])  # else this tests nothing
    cfg = resolve(bench="synth", n=5)
    assert cfg.train.epochs == synth["epochs"] and cfg.train.lr == pytest.approx(synth["lr"])


def test_class_order_seed_is_its_own_knob(resolve):
    assert resolve().class_order_seed == 1  # default: follows the training seed, as PILOT
    cfg = resolve_config("toy", 3, "full_ft", seed=1, class_order_seed=1993)
    assert (cfg.seed, cfg.class_order_seed) == (1, 1993)


@pytest.mark.parametrize("item, fragment", [
    ("train.lr_typo=1", "unknown key 'train.lr_typo'"),
    ("method.rank=8", "unknown key 'method.rank'"),
    ("optim.lr=1", "unknown section 'optim'"),
    ("train.epochs=abc", "expected an integer"),
    ("train.lr", "expects key=value"),
    ("data.test_order=sorted", "data.test_order 'sorted' is unknown; use one of dataset, class_sorted"),
    ("train.schedule=cos", "train.schedule 'cos' is unknown; use one of constant, multistep"),
])
def test_bad_overrides_name_the_problem(resolve, item, fragment):
    with pytest.raises(ConfigError, match=fragment):
        resolve(parse_set([item]))


def test_unknown_key_lists_valid_keys(resolve):
    with pytest.raises(ConfigError) as err:
        resolve(parse_set(["train.lr_typo=1"]))
    assert "batch_size" in str(err.value) and "first_task_lr" in str(err.value)


def test_first_task_overrides():
    t = TrainConfig(epochs=20, lr=0.01, first_task_lr=0.1, milestones=[10], first_task_milestones=[3])
    assert (t.for_task(0).epochs, t.for_task(0).lr, t.for_task(0).milestones) == (20, 0.1, [3])
    assert (t.for_task(1).epochs, t.for_task(1).lr, t.for_task(1).milestones) == (20, 0.01, [10])


def test_yaml_values_are_typed(resolve):
    cfg = resolve(parse_set(["train.lr=1e-3", "train.grad_clip=1", "method.mask_old_logits=true"]))
    assert cfg.train.lr == pytest.approx(1e-3) and cfg.train.grad_clip == 1.0
    assert cfg.method_args == {"mask_old_logits": True, "head_init": "torch_linear"}


def test_a_variant_recipe_extends_its_base():
    base, rr = load_recipe("sdlora"), load_recipe("sdlora_rr")
    assert "extends" not in rr and set(rr) == set(base)
    assert rr["imr"] == base["imr"] and rr["default"]["train"] == base["default"]["train"]
    assert rr["default"]["method"]["rank_schedule"] == [[0, 10], [4, 8], [8, 6]]
    assert base["default"]["method"]["rank_schedule"] == [[0, 10]]  # the base is not changed


def test_an_extends_cycle_is_named(tmp_path, monkeypatch):
    (tmp_path / "a.yaml").write_text("extends: b\n")
    (tmp_path / "b.yaml").write_text("extends: a\n")
    monkeypatch.setattr(catalog, "RECIPE_DIR", tmp_path)
    with pytest.raises(ConfigError, match="a -> b -> a"):
        load_recipe("a")


def test_a_retired_key_at_its_old_value_reads_as_absent():
    """Result files and checkpoints written before ``train.first_task_epochs`` was dropped hold
    it (always null): they load, and their runs keep their identity."""
    new = RunConfig("synth", 5, "full_ft").to_dict()
    old = json.loads(json.dumps(new))
    old["train"]["first_task_epochs"] = None
    assert RunConfig.from_dict(old).to_dict() == new
    assert without_execution_settings(old) == without_execution_settings(new)
    old["train"]["first_task_epochs"] = 3  # it changed the numbers: not the same run
    assert without_execution_settings(old) != without_execution_settings(new)
