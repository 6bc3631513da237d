"""WHERE runs execute on a cluster: the SLURM launcher (submitit job arrays or a plain sbatch
script), cluster profiles (``profiles/*.yaml``) and the ``status``/``collect`` sub-commands.
See ``slurm/launcher.py``."""
