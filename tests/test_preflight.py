"""``clbench preflight``: the plan's checks and its forecast against a SLURM profile
(``slurm/profiles/local.yaml``: 30 minutes a run, no GPU). Reading a profile needs no running
cluster, so neither do these tests."""
from __future__ import annotations

import json
from pathlib import Path

from clbench.cli import main


def speed_file(path: Path, run_s: float, peak_mib: float = 100.0) -> Path:
    """What ``clbench speed --bench toy --tasks 3 --methods full_ft --json FILE`` writes (the keys
    preflight reads)."""
    path.write_text(json.dumps({
        "setting": "toy", "bench": "toy", "num_tasks": 3, "device": "cpu", "backbone": {},
        "methods": [{"method": "full_ft", "projected_run_s": run_s, "error": None,
                     "tasks": [{"train_peak_mib": peak_mib, "infer_peak_mib": peak_mib / 2}]}]}))
    return path


PLAN = ["--bench", "toy", "--methods", "full_ft", "--seeds", "0,1", "--profile", "local"]


def test_preflight_reports_each_runs_fit_against_the_local_profile(tmp_path, capsys):
    figures = speed_file(tmp_path / "speed.json", run_s=600)
    assert main(["preflight", *PLAN, "--speed", str(figures), "--out", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    assert "ok   backbone vit_toy_patch4_16 at 16px" in out and "ok   data of toy" in out
    assert "forecast against profile local" in out and "time 30 min" in out
    assert "ok   toy/N3/full_ft/seed0: 0.17 h of 0.50 h" in out
    assert "sweep: 0.33 h over 2 of 2 run(s) with figures" in out and "0 run(s) do not fit" in out
    assert not (tmp_path / "r").exists()  # a preflight writes nothing


def test_preflight_says_which_runs_do_not_fit_and_a_slurm_launch_refuses_them(tmp_path, capsys):
    figures = speed_file(tmp_path / "speed.json", run_s=3600)
    assert main(["preflight", *PLAN, "--speed", str(figures), "--out", str(tmp_path / "r")]) == 1
    assert "FAIL toy/N3/full_ft/seed1: 1.00 h of 0.50 h" in capsys.readouterr().out
    argv = [*PLAN, "--launcher", "slurm", "--speed", str(figures), "--out", str(tmp_path / "r")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "toy/N3/full_ft/seed0: forecast 1.00 h (limit 0.50 h)" in err and "--ignore-forecast" in err
    assert not (tmp_path / "r" / "slurm").exists()


def test_preflight_without_figures_still_checks_and_says_what_is_missing(tmp_path, capsys):
    assert main(["preflight", *PLAN, "--out", str(tmp_path / "r")]) == 0
    assert "no speed figures" in capsys.readouterr().out
