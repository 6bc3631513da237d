"""The SD-LoRA paper's reported numbers, Tables 2-6 (data only; no code): a package only so that
they install with clbench, as ``clbench.paper``, read by ``clbench.report.reference``."""
