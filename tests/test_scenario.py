"""Class orders and task splits."""
import numpy as np
import pytest
import torch

from clbench.benchmarks.scenario import Scenario, class_order, task_sizes


def test_class_order_matches_pilot_and_sdlora_logs():
    # Orders verified against SD-LoRA's logs (docs/methods/README.md §Class order and seeds).
    assert class_order(200, 1995)[:3] == [146, 198, 169]
    assert class_order(200, 1993)[:3] == [168, 136, 51]
    assert class_order(100, 1994)[:3] == [72, 6, 33]
    assert class_order(5, None) == [0, 1, 2, 3, 4]


def test_class_order_leaves_global_numpy_rng_alone():
    np.random.seed(0)
    expected = np.random.rand()
    np.random.seed(0)
    class_order(200, 7)
    assert np.random.rand() == expected


def test_class_sorted_test_subsets_run_class_by_class_in_dataset_order_within_a_class():
    class Labelled(torch.utils.data.Dataset):
        def __init__(self, targets):
            self.targets = targets

        def __len__(self):
            return len(self.targets)

        def __getitem__(self, i):
            return i, self.targets[i]  # the "image" is its index in the dataset

    targets = [3, 1, 0, 3, 2, 1, 0, 2, 3, 0]
    scenario = Scenario.build(Labelled(targets), Labelled(targets), 4, 2, order_seed=None)
    plain = [scenario.test_subset(0)[i] for i in range(len(scenario.test_subset(0)))]
    assert plain == [(1, 1), (2, 0), (5, 1), (6, 0), (9, 0)]  # the dataset's order
    subset = scenario.test_subset(0, class_sorted=True)
    assert [subset[i] for i in range(len(subset))] == [(2, 0), (6, 0), (9, 0), (1, 1), (5, 1)]


def test_task_sizes():
    assert task_sizes(200, 10) == [20] * 10
    assert task_sizes(345, 5) == [69] * 5
    assert task_sizes(100, 6, initial=50, increment=10) == [50, 10, 10, 10, 10, 10]
    with pytest.raises(ValueError, match="equal tasks"):
        task_sizes(200, 7)
    with pytest.raises(ValueError, match="exceeds"):
        task_sizes(20, 3, initial=10, increment=10)


class Labels(torch.utils.data.Dataset):
    def __init__(self, targets):
        self.targets = np.asarray(targets)

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return torch.tensor(float(i)), int(self.targets[i])


def test_scenario_remaps_labels_to_contiguous_task_ranges():
    targets = np.repeat(np.arange(6), 3)  # 6 classes, 3 samples each
    sc = Scenario.build(Labels(targets), Labels(targets), num_classes=6, num_tasks=3, order_seed=3)
    assert sc.sizes == [2, 2, 2]
    seen = []
    for t in range(3):
        sub = sc.train_subset(t)
        labels = sorted({y for _, y in sub})
        assert labels == list(sc.task_range(t))  # harness labels of task t are [2t, 2t+2)
        originals = sorted({int(targets[int(x)]) for x, _ in sub})
        assert originals == sorted(sc.original_classes(t))  # the samples are the right classes
        seen += originals
    assert sorted(seen) == list(range(6))
