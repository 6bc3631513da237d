"""Shared fixtures and collection hooks. Shared helpers (the test-only ``toy`` benchmark, result
file factories, reference computations) are in ``helpers.py``; importing it here registers the
toy benchmark for every test."""
from __future__ import annotations

import os

import helpers  # noqa: F401  (registers the toy benchmark and its ViT)
import pytest
import torch

# Sweeps in the tests run in their own process, one run after the other, unless a test asks for
# --jobs: the benchmarks and models the tests register (helpers.py) do not exist in a spawned worker.
os.environ.setdefault("CLBENCH_JOBS", "1")


@pytest.fixture(scope="session")
def synth_results(tmp_path_factory):
    """A results root shared by the learning-on-synth tests (full_ft's runs are reused)."""
    return tmp_path_factory.mktemp("synth_results")


@pytest.fixture
def one_thread():
    """One torch thread for the test: the toy models' tensors are tiny, one thread is faster than
    two, does not collapse when other processes load the cores, and is what a SLURM job with
    ``cpus_per_task: 1`` runs with."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def results_root(tmp_path, monkeypatch):
    root = tmp_path / "results"
    monkeypatch.setenv("CLBENCH_RESULTS", str(root))
    return root


@pytest.hookimpl(tryfirst=True)  # before -m selects a lane
def pytest_collection_modifyitems(config, items):
    """Skip what needs a GPU or a SLURM cluster where there is none; the SLURM tests (real jobs,
    requeues) belong to the slow lane, which `.ci/run` runs after starting a cluster."""
    import shutil

    has_gpu = torch.cuda.is_available()
    has_slurm = all(shutil.which(tool) for tool in ("sbatch", "sacct", "srun"))
    for item in items:
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))
        if "slurm" in item.keywords:
            item.add_marker(pytest.mark.slow)
            if not has_slurm:
                item.add_marker(pytest.mark.skip(reason="needs a SLURM cluster (sbatch, sacct, srun)"))


torch.set_num_threads(min(2, os.cpu_count() or 1))

