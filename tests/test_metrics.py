"""Metrics on hand-computed accuracy matrices (numbers worked out on paper in the comments)."""
import math

import pytest

from clbench.metrics import (
    accuracy_curve,
    forgetting_consecutive,
    forgetting_max,
    per_task_accuracy,
    summarize,
    task_averaged_curve,
)

# Three tasks with unbalanced test sets: task 0 has 10 images, task 1 has 30, task 2 has 60.
CORRECT = [[9, 0, 0],
           [6, 27, 0],
           [5, 21, 54]]
TOTAL = [[10, 0, 0],
         [10, 30, 0],
         [10, 30, 60]]


def test_sample_weighted_curve_acc_and_aaa():
    # after t0: 9/10 = 90; after t1: 33/40 = 82.5; after t2: 80/100 = 80
    assert accuracy_curve(CORRECT, TOTAL).tolist() == pytest.approx([90.0, 82.5, 80.0])
    m = summarize(CORRECT, TOTAL)
    assert m["acc"] == pytest.approx(80.0)
    assert m["aaa"] == pytest.approx((90 + 82.5 + 80) / 3)


def test_task_averaged_curve_differs_on_unbalanced_tasks():
    # after t1: (60 + 90)/2 = 75; after t2: (50 + 70 + 90)/3 = 70
    assert task_averaged_curve(CORRECT, TOTAL).tolist() == pytest.approx([90.0, 75.0, 70.0])
    m = summarize(CORRECT, TOTAL)
    assert m["acc_task_avg"] == pytest.approx(70.0)
    assert m["aaa_task_avg"] == pytest.approx((90 + 75 + 70) / 3)


def test_per_task_accuracy_is_nan_above_the_diagonal():
    a = per_task_accuracy(CORRECT, TOTAL)
    assert a[1, 0] == pytest.approx(60.0) and math.isnan(a[0, 1])


def test_forgetting_max():
    # task 0: max(90, 60) - 50 = 40; task 1: max(90) - 70 = 20 -> mean 30
    assert forgetting_max(CORRECT, TOTAL) == pytest.approx(30.0)


def test_forgetting_consecutive_coda_form():
    # t=1: (1/1)(90-60) = 30; t=2: (1/2)((60-50) + (90-70)) = 15 -> mean 22.5
    assert forgetting_consecutive(CORRECT, TOTAL) == pytest.approx(22.5)


def test_forgetting_max_differs_from_consecutive_when_accuracy_recovers():
    # task 0: 100 -> 50 -> 80: max-based 20, consecutive (50 + (-30 + 0)/2)/2 = 17.5
    correct = [[10, 0, 0], [5, 10, 0], [8, 10, 10]]
    total = [[10, 0, 0], [10, 10, 0], [10, 10, 10]]
    assert forgetting_max(correct, total) == pytest.approx((20 + 0) / 2)
    assert forgetting_consecutive(correct, total) == pytest.approx((50 + (-30 + 0) / 2) / 2)


def test_single_task_and_partial_matrices():
    assert summarize([[3]], [[4]])["acc"] == pytest.approx(75.0)
    assert summarize([[3]], [[4]])["forgetting_max"] == 0.0
    # a partial matrix (2 of 3 tasks finished) is valid: rows are tasks done so far
    assert accuracy_curve(CORRECT[:2], TOTAL[:2]).tolist() == pytest.approx([90.0, 82.5])


def test_rejects_inconsistent_counts():
    with pytest.raises(ValueError):
        summarize([[5]], [[4]])
