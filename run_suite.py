#!/usr/bin/env python
"""The one entry point: plan a sweep, run it here or on SLURM, and report.

    python run_suite.py                                   # the offline synthetic suite
    python run_suite.py --bench imr --tasks 5,10,20 --data-root /data
    python run_suite.py report | status | collect | speed

See README.md, or ``python run_suite.py --help``.
"""
import sys

from harness.cli import main

if __name__ == "__main__":
    sys.exit(main())
