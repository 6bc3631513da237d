"""Result files -> the paper's tables, a comparison with the paper's numbers, a measured cost
table and figures: ``aggregate`` (runs -> mean and spread over seeds), ``table`` (Markdown and
LaTeX), ``figures``, ``reference`` (the paper's numbers) and ``command`` (``clbench report``).
Reads result files only, and imports no torch."""
