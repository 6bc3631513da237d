"""Sequential full fine-tuning on ``synth`` behaves as the issue asks of a continual-learning
benchmark: it learns each task, then forgets, and ends far below joint training."""
import pytest
from helpers import synth_result


@pytest.mark.slow
def test_full_ft_learns_then_forgets_on_synth(synth_results):
    sequential = synth_result("full_ft", synth_results, num_tasks=5)
    joint = synth_result("full_ft", synth_results, num_tasks=1)  # all 200 classes as one task
    after_first = sequential.tasks[0].accuracy  # 40 classes seen: chance 2.5%
    final = sequential.metrics["acc"]  # 200 classes seen: chance 0.5%
    figures = dict(after_first=after_first, final=final, joint=joint.metrics["acc"])
    assert after_first > 25.0, figures  # it learns the first task
    assert final < 0.5 * after_first, figures  # then forgets
    assert final < joint.metrics["acc"] - 10.0, figures  # and ends clearly below joint training
