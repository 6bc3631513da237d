#!/usr/bin/env python
"""The one entry point: plan a sweep, run it here or on SLURM, and report.

    python run_suite.py                                   # the offline synthetic suite
    python run_suite.py --bench imr --tasks 5,10,20 --data-root /data
    python run_suite.py report | status | collect | speed | preflight

The same command line is installed as ``clbench`` and as ``python -m clbench``; see README.md.
"""
import sys

try:
    from clbench.cli import main
except ImportError as err:  # methods/, benchmarks/ and slurm/ are only found through the install
    sys.exit(f"error: clbench is not installed ({err}); run `pip install -e .` in this folder first")

if __name__ == "__main__":
    sys.exit(main())
