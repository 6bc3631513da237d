"""WHERE runs execute on a cluster: the SLURM launcher (submitit job arrays or a plain sbatch
script), cluster profiles (``profiles/*.yaml``) and SLURM's accounting of the jobs (``sacct.py``,
which ``clbench status`` reads). See ``slurm/launcher.py``."""
