"""The ``CLMethod`` contract (``clbench/methods/base.py``), checked on every registered method.

The methods come from the registry, so a new method file is covered as soon as it registers
(plugins and the test-only methods other test modules register are left out). Each method
lives one short run on the toy benchmark (``helpers.py``: a tiny untrained ViT, 12 classes in
2 tasks, 1 epoch of 3 batches; a recipe with ``train.epochs: 0`` keeps it), driven through the
public steps of a run: ``Run.prepare``, ``Run.task``, ``Run.learn``, ``Run.evaluate``. At every
task boundary it records what the method did; the tests below compare that with a direct
computation:

* ``grow`` is deterministic and structure only: two fresh methods of the same seed, grown
  through the same tasks with no data reachable, have equal state dicts;
* ``predict`` of an image does not depend on the rest of its batch: the test batch, each
  image alone and the batch permuted give the same logits;
* the logits are ``[B, num_seen]`` after every task, and ``Run.evaluate`` counts their argmax;
* ``state_dict`` round-trips at a task boundary, as a resumed run uses it: a fresh method grown
  through the finished tasks and loaded from a checkpoint's bytes has the same state, predicts
  the same logits and reports the same costs;
* the cost report is filled: ``trainable_params`` is what ``learn`` counted, at least every
  element that training changed and at most every element that may train; ``stored_params``
  covers every parameter that is new or changed since the method was built; ``backbone_passes``
  is the number of ViT forwards that ``predict`` runs; the FLOPs the protocol measures cover
  that many plain backbone passes; ``dropped_tasks`` is optional (``None``: the method never
  drops a task);
* ``learn`` trains exactly when the method's stages have epochs: a training-free method
  (SimpleCIL) returns 0 and its parameters stay those it was grown with (what ``end_task``
  computes lives in buffers), any other method changes some parameter.

Every method runs with its recipe's defaults for the toy benchmark, plus ``TOY_METHOD_ARGS``.
Prediction by a vote over the evaluation batch (L2P's and DualPrompt's
``test_batchwise_selection: true``, the official ports' behaviour) depends on the batch by
design; it is not a default, it is not run here, and ``test_prompt_methods.py`` checks that
it does depend on the batch.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
from typing import Any, Iterator

import pytest
import torch
from helpers import TOY_METHOD_ARGS
from timm.layers import PatchEmbed
from torch.utils.data import ConcatDataset

from clbench.backbones import create_backbone
from clbench.config import RunConfig
from clbench.methods import METHODS, CLMethod, CostReport, Task
from clbench.protocol import Run, count_flops
from clbench.recipes import resolve_config
from clbench.record import RunResult

# Every method registered by clbench's own methods/ (not a plugin's, not a test's).
CONTRACT_METHODS = sorted(name for name, cls in METHODS.items() if cls.__module__.startswith("clbench.methods."))
NUM_TASKS = 2
CLOSE = {"rtol": 1e-5, "atol": 1e-5}  # float32 logits of one image, computed in batches of other sizes


def contract_config(method: str) -> RunConfig:
    """The method's toy recipe at one epoch per task (a training-free recipe keeps its 0)."""
    recipe = resolve_config("toy", NUM_TASKS, method, seed=0, device="cpu")
    train = {"epochs": 1} if recipe.train.epochs > 0 else {}
    overrides = {"train": train, "method": TOY_METHOD_ARGS.get(method, {})}
    return resolve_config("toy", NUM_TASKS, method, seed=0, overrides=overrides, device="cpu")


def without_data(task: Task) -> Task:
    """``task`` as a resumed run grows it: the same classes and recipe, no data reachable."""
    def no_data(**kwargs: Any):
        raise AssertionError("grow is structure only: it must not read the task's data")

    return dataclasses.replace(task, make_loader=no_data)


def fresh_method(config: RunConfig, out, tasks_done: int) -> CLMethod:
    """A method built as a run builds it, grown (structure only) through ``tasks_done`` tasks."""
    run = Run(config, out, progress=False)
    run.prepare()
    for t in range(tasks_done):
        run.method.grow(without_data(run.task(t)))
    return run.method.eval()


def through_a_checkpoint(state: dict[str, Any]) -> dict[str, Any]:
    """``state`` written and read back as a checkpoint holds it (``torch.save``/``torch.load``)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, map_location="cpu", weights_only=False)


def assert_same_state(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert list(a) == list(b)
    for name in a:
        if isinstance(a[name], torch.Tensor):
            assert (a[name].shape, a[name].dtype) == (b[name].shape, b[name].dtype), name
            assert torch.equal(a[name], b[name]), name
        else:  # extra state (get_extra_state)
            assert a[name] == b[name], name


def parameters(method: CLMethod) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in method.named_parameters()}


def changed_elements(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor], names) -> int:
    """Elements of the parameters ``names`` that differ between two snapshots (a parameter
    missing from ``before``, or of another shape, counts whole)."""
    total = 0
    for name in names:
        old, new = before.get(name), after[name]
        total += new.numel() if old is None or old.shape != new.shape else int((old != new).sum())
    return total


@torch.no_grad()
def vit_forwards(method: CLMethod, x: torch.Tensor) -> int:
    """How many ViT forwards ``method.predict(x)`` runs (each starts with a patch embedding; a
    global hook also sees a copy of the backbone the method keeps outside its modules)."""
    calls = [0]

    def count(module, args, output):
        calls[0] += isinstance(module, PatchEmbed)

    handle = torch.nn.modules.module.register_module_forward_hook(count)
    try:
        method.predict(x)
    finally:
        handle.remove()
    return calls[0]


@dataclasses.dataclass
class Boundary:
    """The method at the end of one task, as the run left it."""

    task: Task
    trainable: int  # what Run.learn returned
    params_grown: dict[str, torch.Tensor]  # the parameters once grow(task) returned
    params_started: dict[str, torch.Tensor]  # ... once begin_task(task) returned: before training
    params_after: dict[str, torch.Tensor]  # ... once Run.learn returned (after end_task)
    requires_grad: set[str]  # the parameters that require a gradient after learning
    state: dict[str, Any]  # the state dict, through a checkpoint's bytes
    x: torch.Tensor  # every test image of the classes seen so far, as the run feeds them
    y: torch.Tensor  # their harness labels
    logits: torch.Tensor  # predict(x), one batch
    alone: torch.Tensor  # predict of each image on its own
    permuted: torch.Tensor  # predict of the batch in another order, put back in order
    counts: tuple[list[int], list[int]]  # Run.evaluate(t)
    cost: CostReport
    forwards: int  # ViT forwards of one predict call
    flops: int  # the protocol's measure: torch's FLOP counter over predict of one image
    trains: bool  # some stage of the task has epochs


@dataclasses.dataclass
class Life:
    method: str
    config: RunConfig
    built: dict[str, torch.Tensor]  # the parameters as the run built the method, before any task
    grown: dict[str, torch.Tensor]  # those of a fresh method of the same seed grown for the first task
    boundaries: list[Boundary]
    result: RunResult  # Run.execute of the same configuration
    executed_state: dict[str, Any]  # its method's state at the end


def images_seen(run: Run, t: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every test image of the classes seen after task ``t``, in the run's order, with its label.
    Read without a DataLoader: an iterator over one draws its seed from the global RNG, and this
    run must draw what ``Run.execute`` draws."""
    test = ConcatDataset([run.scenario.test_subset(i) for i in range(t + 1)])
    images, labels = zip(*(test[i] for i in range(len(test))))
    return run.inputs(torch.stack(images)), torch.tensor(labels)


@contextlib.contextmanager
def snapshots_after(method: CLMethod, *hooks: str) -> Iterator[dict[str, dict[str, torch.Tensor]]]:
    """Inside the block, each call of the lifecycle ``hooks`` of ``method`` (``grow``,
    ``begin_task``) leaves a snapshot of the parameters as that hook left them."""
    taken: dict[str, dict[str, torch.Tensor]] = {}

    def spy(hook: str):
        original = getattr(method, hook)

        def call(task: Task) -> None:
            original(task)
            taken[hook] = parameters(method)
        return call

    for hook in hooks:
        setattr(method, hook, spy(hook))  # an instance attribute shadows the class's hook
    try:
        yield taken
    finally:
        for hook in hooks:
            delattr(method, hook)


def live(method: str, out) -> Life:
    config = contract_config(method)
    grown = parameters(fresh_method(config, out / "grown", 1))  # before the run: both start from the seed
    run = Run(config, out, progress=False)
    run.prepare()
    built = parameters(run.method)
    boundaries = []
    for t in range(run.scenario.num_tasks):
        task = run.task(t)
        model = run.method
        with snapshots_after(model, "grow", "begin_task") as taken:
            trainable = run.learn(task)
        trains = any((s.epochs if s.epochs is not None else task.train.epochs) > 0 for s in model.stages(task))
        x, y = images_seen(run, t)
        with torch.no_grad():
            logits = model.predict(x)
            alone = torch.cat([model.predict(x[i: i + 1]) for i in range(len(x))])
            order = torch.randperm(len(x), generator=torch.Generator().manual_seed(t))
            permuted = torch.empty_like(logits)
            permuted[order] = model.predict(x[order])
        forwards = vit_forwards(model, x)
        flops = count_flops(lambda: model.predict(x[:1]))
        boundaries.append(Boundary(
            task=task, trainable=trainable, params_grown=taken["grow"], params_started=taken["begin_task"],
            params_after=parameters(model),
            requires_grad={n for n, p in model.named_parameters() if p.requires_grad},
            state=through_a_checkpoint(model.state_dict()), x=x, y=y, logits=logits, alone=alone,
            permuted=permuted, counts=run.evaluate(t), cost=model.cost_report(task, trainable),
            forwards=forwards, flops=flops, trains=trains))
    executed = Run(config, out / "executed", progress=False)
    result = executed.execute()
    return Life(method, config, built, grown, boundaries, result, through_a_checkpoint(executed.method.state_dict()))


@pytest.fixture(scope="module", params=CONTRACT_METHODS)
def life(request, tmp_path_factory) -> Life:
    """One method's run on the toy benchmark, recorded at every task boundary (one thread: the
    toy's tensors are tiny, and the cores are shared)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield live(request.param, tmp_path_factory.mktemp(request.param))
    finally:
        torch.set_num_threads(threads)


def test_registry_holds_every_method_of_the_paper():
    # the paper's nine and SimpleCIL: a method dropped from the registry would drop out of the contract too
    assert {"full_ft", "l2p", "dualprompt", "coda_prompt", "hide_prompt", "inflora", "sdlora", "sdlora_rr",
            "sdlora_kd", "simplecil"} <= set(CONTRACT_METHODS)


def test_grow_is_deterministic_and_structure_only(life, tmp_path):
    a = fresh_method(life.config, tmp_path / "a", NUM_TASKS)
    b = fresh_method(life.config, tmp_path / "b", NUM_TASKS)
    assert_same_state(a.state_dict(), b.state_dict())
    assert a.tasks_seen == b.tasks_seen == NUM_TASKS
    # the run's own first grow, with the data reachable, made the same parameters
    first = life.boundaries[0].params_grown
    assert list(first) == list(life.grown) and all(torch.equal(first[n], life.grown[n]) for n in first)


def test_predict_does_not_depend_on_the_rest_of_the_batch(life):
    for b in life.boundaries:
        torch.testing.assert_close(b.alone, b.logits, **CLOSE, msg=f"task {b.task.index}: one image alone")
        torch.testing.assert_close(b.permuted, b.logits, **CLOSE, msg=f"task {b.task.index}: batch permuted")


def test_logits_cover_the_classes_seen_and_evaluate_counts_their_argmax(life):
    for b in life.boundaries:
        task = b.task
        assert b.logits.shape == (len(b.x), task.num_seen)
        assert b.logits.dtype == torch.float32 and bool(b.logits.isfinite().all())
        assert set(b.y.tolist()) == set(range(task.num_seen))  # the batch holds every class seen
        hit = b.logits.argmax(1) == b.y
        bounds = torch.tensor([seen.task.num_seen for seen in life.boundaries[: task.index + 1]])
        owner = torch.bucketize(b.y, bounds, right=True)  # the task each test image belongs to
        correct = [int(hit[owner == i].sum()) for i in range(task.index + 1)]
        total = [int((owner == i).sum()) for i in range(task.index + 1)]
        assert b.counts == (correct, total)


def test_the_public_steps_are_what_a_run_executes(life):
    matrix = life.result.accuracy_matrix
    for b in life.boundaries:
        t = b.task.index
        assert (matrix["correct"][t][: t + 1], matrix["total"][t][: t + 1]) == b.counts
    assert_same_state(life.executed_state, life.boundaries[-1].state)


def test_state_dict_round_trips_at_every_task_boundary(life, tmp_path):
    for b in life.boundaries:
        resumed = fresh_method(life.config, tmp_path / f"after{b.task.index}", b.task.index + 1)
        resumed.load_state_dict(b.state)
        assert_same_state(through_a_checkpoint(resumed.state_dict()), b.state)
        with torch.no_grad():
            assert torch.equal(resumed.predict(b.x), b.logits), f"task {b.task.index}: other logits after resuming"
        assert resumed.cost_report(b.task, b.trainable) == b.cost


def test_cost_report_is_filled_and_counts_what_the_method_does(life):
    plain = create_backbone(life.config.backbone)[0].eval()
    for b in life.boundaries:
        cost = b.cost
        recorded = life.result.tasks[b.task.index].cost  # what Run.execute wrote into the result
        assert recorded == {**cost.to_dict(), "flops_per_image": b.flops}  # the protocol measures the FLOPs
        for name, value in recorded.items():
            if name == "dropped_tasks":  # optional: None for a method that never drops a task
                assert value is None or (isinstance(value, int) and 0 <= value <= b.task.index + 1)
            else:
                assert isinstance(value, int) and value >= 0, (name, value)
        assert cost.trainable_params == b.trainable
        # at least the elements that training changed, at most every element that may train
        changed = changed_elements(b.params_started, b.params_after, b.requires_grad)
        may_train = sum(b.params_after[n].numel() for n in b.requires_grad)
        assert changed <= b.trainable <= may_train, (changed, b.trainable, may_train)
        # stored: at least every parameter element that is new or differs from the built method
        assert cost.stored_params >= changed_elements(life.built, b.params_after, b.params_after)
        assert cost.backbone_passes == b.forwards >= 1
        with torch.no_grad():
            one_pass = count_flops(lambda: plain(b.x[:1]))
        assert b.flops >= cost.backbone_passes * one_pass > 0


def test_learn_trains_exactly_when_the_stages_have_epochs(life):
    for b in life.boundaries:
        if b.trains:
            changed = changed_elements(b.params_started, b.params_after, b.params_after)
            assert b.trainable > 0 and changed > 0, f"task {b.task.index}: nothing trained"
        else:  # what end_task computes (SimpleCIL's prototypes) lives in buffers
            changed = changed_elements(b.params_grown, b.params_after, b.params_after)
            assert b.trainable == 0 and b.cost.trainable_params == 0
            assert changed == 0, f"task {b.task.index}: a training-free method changed {changed} parameter elements"
