"""``clbench probe``: the regime figures of a benchmark, checked against a direct computation
(SimpleCIL's final Acc is the NCM probe's) and against themselves (per-rendition figures
average to the overall one)."""
from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import synth_result

from clbench.benchmarks import BENCHMARKS
from clbench.cli import main
from clbench.probe import run_probe

pytestmark = pytest.mark.skipif("synth" not in BENCHMARKS, reason="the synth benchmark is not registered")


def test_probe_of_synth_agrees_with_simplecil_and_its_renditions_add_up(synth_results):
    probes, about = run_probe("synth", seed=0, device="cpu", overrides={"train": {"epochs": 1}})
    ncm, linear, joint = probes
    assert [p.name for p in probes] == ["NCM (cosine, frozen)", "linear probe (frozen)", "joint fine-tuning"]
    # SimpleCIL after the last task knows every class: its final Acc is the NCM probe's
    assert ncm.acc == pytest.approx(synth_result("simplecil", synth_results, num_tasks=5).metrics["acc"], abs=1e-9)
    test = BENCHMARKS["synth"].load(None, None, None, None)[1]
    counts = np.bincount(test.groups, minlength=len(test.group_names))
    for p in probes:
        assert set(p.groups) == {test.group_names[g] for g in np.unique(test.groups)}  # no photos
        weighted = sum(p.groups[name] * counts[g] for g, name in enumerate(test.group_names) if counts[g]) / counts.sum()
        assert weighted == pytest.approx(p.acc, abs=1e-9)
        assert 100 / 200 < p.acc <= 100
    assert about["joint_recipe"]["epochs"] == 1 and about["test_images"] == counts.sum()
    assert linear.acc != ncm.acc and joint.acc != ncm.acc  # three classifiers, not one figure thrice


def test_probe_command_prints_the_table_and_writes_json(tmp_path, capsys):
    out = tmp_path / "probe.json"
    assert main(["probe", "--no-joint", "--device", "cpu", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| NCM (cosine, frozen) |" in printed and "| all | sketch | inverted | faded | cartoon | noisy |" in printed
    data = json.loads(out.read_text())
    assert data["bench"] == "synth" and [p["name"] for p in data["probes"]] == ["NCM (cosine, frozen)",
                                                                              "linear probe (frozen)"]


def test_probe_reads_the_data_root_it_is_given(tmp_path, capsys):
    # --data-root as the sweep's: the message names the folder looked in, not ./data
    assert main(["probe", "--bench", "imr", "--data-root", str(tmp_path), "--no-joint", "--device", "cpu"]) == 2
    error = capsys.readouterr().err
    assert "no usable data in " + str(tmp_path) in error
