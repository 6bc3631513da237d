"""clbench: the reference harness for continual learning with pre-trained ViTs (SD-LoRA, ICLR
2025, and its baselines).

One import name. The engine lives in this folder; the repository's ``methods/``,
``benchmarks/`` and ``slurm/`` folders are installed as ``clbench.methods``,
``clbench.benchmarks`` and ``clbench.slurm`` (``pyproject.toml``'s package-dir), and
``results/paper/`` as ``clbench.paper`` (the paper's numbers, data only).

Dependencies run one way (``tests/test_layering.py`` enforces it and lists every module): the
core (``config``, ``errors``, ``files``, ``record``, ``task``, ``metrics``, ``backbones``,
``options``, ``catalog``) at the bottom; ``methods`` and ``benchmarks`` above it; the engine
(``loading``, ``recipes``, ``protocol``, ``sweep``, ``speed``, ...) above those; the SLURM
launcher, the report and the command line (``cli``) on top. Importing this package imports
nothing else.
"""
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("clbench")
except PackageNotFoundError:  # a source tree that is not installed
    __version__ = "0+unknown"
