"""SLURM's accounting: the state of submitted jobs (``sacct``), for ``clbench status`` and the
launcher's wait."""
from __future__ import annotations

import shutil
import subprocess
import sys

from submitit.slurm.slurm import SlurmInfoWatcher

# sacct states of a job that may still run (submitit's list plus the rarer transient ones).
QUEUED_STATES = {"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "PREEMPTED", "SUSPENDED",
                 "RESV_DEL_HOLD", "READY"}
RUNNING_STATES = {"RUNNING", "COMPLETING", "CONFIGURING", "STAGE_OUT", "SIGNALING", "RESIZING"}

_sacct_warned = False


def slurm_job_states(job_ids: list[str | None]) -> dict[str, str]:
    """``{job_id: sacct state}`` for these jobs (array elements as ``<array>_<index>``), in one
    ``sacct`` call; ``{}`` where there is no ``sacct`` or it fails, or no job was submitted."""
    global _sacct_warned
    arrays = sorted({j.split("_")[0] for j in job_ids if j})
    if not arrays or shutil.which("sacct") is None:
        return {}
    command = ["sacct", "-o", "JobID,State", "--parsable2"] + [a for j in arrays for a in ("-j", j)]
    try:
        output = subprocess.run(command, capture_output=True, text=True, timeout=60, check=True).stdout
    except (OSError, subprocess.SubprocessError) as err:
        if not _sacct_warned:
            print(f"[slurm] warning: sacct failed ({err}); job states may be stale", file=sys.stderr)
            _sacct_warned = True
        return {}
    info = SlurmInfoWatcher().read_info(output)  # its parser expands pending ranges ("12_[3-7%2]")
    return {job: fields["State"].split()[0] for job, fields in info.items() if fields.get("State")}
