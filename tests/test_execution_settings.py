"""Execution settings change no number, also for the methods whose prediction of an image is not
the image's alone (a test-time prompt vote) or whose statistics pass reads the data in batches
(HiDe-Prompt): ``train.num_workers``, ``train.eval_batch_size`` and torch's thread count give
byte-identical accuracy matrices on the ``toy`` benchmark (conftest.py), through the real protocol."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import TOY_CLASSES, ToyImages

from clbench.benchmarks.base import BENCHMARKS, Benchmark, register_benchmark
from clbench.protocol import Run
from clbench.recipes import resolve_config

# Every method with a vote or class statistics, as it votes (PILOT's test-time vote, class-sorted
# test data, groups of 8 of the toy's 16 test images per task) or keeps statistics (HiDe, with
# 3 "processes" of 6 so that the DistributedSampler's padding is exercised: 32 images a task,
# 8 a class, neither a multiple of 3).
VOTE = {"data": {"test_order": "class_sorted"}, "train": {"epochs": 2}}
METHODS = {
    "l2p": {**VOTE, "method": {"test_batchwise_selection": True, "test_vote_batch": 8}},
    "dualprompt": {**VOTE, "method": {"test_batchwise_selection": True, "test_vote_batch": 8}},
    "hide_prompt": {"train": {"epochs": 2, "batch_size": 18, "micro_batch_size": 6},
                    "method": {"tii_epochs": 2, "tii_align_epochs": 2, "tap_epochs": 2, "kmeans_n_init": 1,
                               "num_centroids": 2, "prompt_layers": [0, 1], "prompt_length": 2}},
}
# (workers, evaluation batch, threads): the evaluation batch is one batch, then smaller than a
# vote group, then one that cuts through groups. (Two threads once: on loaded cores they are slow.)
SETTINGS = [(0, 256, 1), (2, 5, 1), (0, 20, 2)]


def _deep_merge(base: dict, extra: dict) -> dict:
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for section, values in extra.items():
        out.setdefault(section, {}).update(values)
    return out


def run_matrix(out, method: str, overrides: dict, workers: int = 0, eval_batch: int = 256, threads: int = 1,
               bench: str = "toy"):
    """The run's accuracy matrix (as JSON) and its key, under the given execution settings."""
    settings = {"train": {"num_workers": workers, "eval_batch_size": eval_batch}}
    cfg = resolve_config(bench, 3, method, 0, overrides=_deep_merge(overrides, settings), device="cpu")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        result = Run(cfg, out, progress=False).execute()
    finally:
        torch.set_num_threads(before)
    return json.dumps(result.accuracy_matrix), cfg.key


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:This DataLoader will create")
@pytest.mark.parametrize("method", sorted(METHODS))
def test_workers_evaluation_batch_and_threads_change_no_number(method, tmp_path):
    runs = {setting: run_matrix(tmp_path / "-".join(map(str, setting)), method, METHODS[method], *setting)
            for setting in SETTINGS}
    assert len({key for _, key in runs.values()}) == 1  # one run identity
    assert len({matrix for matrix, _ in runs.values()}) == 1, runs
    correct, total = json.loads(runs[SETTINGS[0]][0]).values()
    assert sum(total[-1]) == 4 * TOY_CLASSES


def _load_many_tests(data_dir, train_tf, test_tf, splits_dir):
    return ToyImages(8, 0, train_tf), ToyImages(20, 1, test_tf)


if "toy_many_tests" not in BENCHMARKS:  # 240 test images: evaluation batches of 100 cut vote groups
    register_benchmark(Benchmark(
        name="toy_many_tests", title="Toy, 20 test images a class", num_classes=TOY_CLASSES, default_tasks=[3],
        load=_load_many_tests, folder="toy", image_size=16, train_transform=BENCHMARKS["toy"].train_transform,
        test_transform=BENCHMARKS["toy"].test_transform, defaults=BENCHMARKS["toy"].defaults))


def test_l2p_votes_over_its_groups_of_32_at_evaluation_batches_100_and_256(tmp_path):
    """PILOT's setting (the recipe's test_vote_batch 32, class-sorted test data): the same matrix
    at the protocol's evaluation batch of 256 (a multiple of 32) and at 100 (which, were it the
    vote's group, would cut the groups at 100, 200 and vote over 4-image remainders)."""
    pilot = {"data": {"test_order": "class_sorted"}, "train": {"epochs": 2},
             "method": {"test_batchwise_selection": True}}
    at_256 = run_matrix(tmp_path / "256", "l2p", pilot, eval_batch=256, bench="toy_many_tests")
    at_100 = run_matrix(tmp_path / "100", "l2p", pilot, eval_batch=100, bench="toy_many_tests")
    assert at_100 == at_256
    assert sum(json.loads(at_256[0])["total"][-1]) == 20 * TOY_CLASSES
