"""``python -m clbench``: the same command line as ``clbench`` and ``run_suite.py``."""
import sys

from clbench.cli import main

sys.exit(main())
