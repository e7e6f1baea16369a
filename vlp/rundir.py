"""One run directory per run, the same on every rank and node and across requeues (Hydra glue).

`conf/hydra/default.yaml` names the run directory `runs/${vlp.run_name:}`. The name comes from
what every process of one run shares, whoever launched it:

1. `VLP_RUN_NAME`, when set (a name of your choosing; export it before launching);
2. in a SLURM batch job, the job (and array task) id, plus the step id under `srun`: `slurm-1234`,
   `slurm-1234.0`. A requeued job keeps its id, so it finds its own run directory again;
3. under torchrun with a rendezvous id (`--rdzv-id`, or the one `--standalone` draws):
   `torchrun-<id>`;
4. otherwise the start time, `DATE/TIME`; under torchrun without a rendezvous id the ranks agree
   on the time of the first rank to ask, through the store torchrun's agent already serves.

Lightning's own DDP spawner passes `hydra.run.dir` to the processes it starts, so they use the
directory of the process that launched them.
"""
import logging
import os
import shutil
import time
from datetime import timedelta
from pathlib import Path
from typing import Optional

from omegaconf import OmegaConf

log = logging.getLogger(__name__)

STAMP_FORMAT = "%Y-%m-%d/%H-%M-%S"


def run_name() -> str:
    """The name of this run's directory under `runs/`, the same in every process of the run."""
    if explicit := os.environ.get("VLP_RUN_NAME"):
        return explicit
    if slurm := slurm_batch_job():
        step = os.environ.get("SLURM_STEP_ID")
        return f"slurm-{slurm}" + (f".{step}" if step else "")
    elastic = os.environ.get("TORCHELASTIC_RUN_ID")
    if elastic and elastic != "none":
        return f"torchrun-{elastic}"
    return _agreed_start_time()


def slurm_batch_job() -> Optional[str]:
    """The SLURM job (array jobs: `job_task`) this process runs in; None outside SLURM and in an
    interactive allocation (`salloc`, `srun --pty bash`), where commands are not one run."""
    if os.environ.get("SLURM_JOB_NAME") in ("bash", "interactive"):  # as Lightning's SLURMEnvironment
        return None
    if array_job := os.environ.get("SLURM_ARRAY_JOB_ID"):
        return f"{array_job}_{os.environ.get('SLURM_ARRAY_TASK_ID', '0')}"
    return os.environ.get("SLURM_JOB_ID")


def _agreed_start_time() -> str:
    """This process's start time, or under torchrun the start time of the rank that asked its agent first."""
    stamp = time.strftime(STAMP_FORMAT)
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return stamp
    from torch.distributed import TCPStore  # only under torchrun

    store = TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                     timeout=timedelta(seconds=60))
    # the first rank to ask sets the name; the store outlives worker restarts, so they keep it too
    return store.compare_set("vlp/run_name", "", stamp).decode()


def register_run_name_resolver() -> None:
    """Registers `${vlp.run_name:}` (cached: one name per process, however often it is resolved)."""
    OmegaConf.register_new_resolver("vlp.run_name", run_name, use_cache=True, replace=True)


def keep_launch_config(run_dir: Path) -> None:
    """Copies the config Hydra composed for this launch into `.hydra/launches/N/`.

    Hydra rewrites `.hydra/` at each launch; a run resumed into its directory keeps the config of
    every launch beside it. Only global rank 0 writes (torchrun and srun start every rank alike).
    """
    source = run_dir / ".hydra"
    if not _rank_zero() or not (source / "config.yaml").is_file():
        return
    launches = source / "launches"
    number = 1 + max((int(p.name) for p in launches.glob("*") if p.name.isdigit()), default=0)
    target = launches / str(number)
    target.mkdir(parents=True)
    for name in ("config.yaml", "overrides.yaml", "hydra.yaml"):
        if (source / name).is_file():
            shutil.copy2(source / name, target / name)


def remove_interrupted_writes(run_dir: Path) -> None:
    """Deletes the temporary files (`.NAME.tmpPID`) that a killed launch left half-written in its run directory.

    Checkpoints and CSV logs are written beside their target and renamed into place; a kill in between
    leaves the temporary file. Only this run's own launches write here, so at launch none is live.
    """
    if not _rank_zero() or not run_dir.is_dir():
        return
    for path in run_dir.rglob(".*.tmp*"):
        if path.is_file() and path.name.rpartition(".tmp")[2].isdigit():
            log.info("removing %s, left half-written by a killed launch", path)
            path.unlink()


def _rank_zero() -> bool:
    """Before Lightning sets up ranks: whether torchrun, srun or Lightning's spawner made this process rank 0."""
    return all(os.environ.get(variable, "0") == "0" for variable in ("RANK", "LOCAL_RANK", "SLURM_PROCID"))
