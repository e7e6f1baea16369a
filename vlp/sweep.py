"""Sweeps (`vlp-train -m`): what cannot work fails up front, a failed trial does not stop the sweep,
and the sweep ends with a table of its trials (Hydra glue).
"""
import json
import logging
import math
from pathlib import Path
from typing import Any, Optional

import pytorch_lightning as pl
import yaml
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig
from pytorch_lightning.strategies.launchers.subprocess_script import _SubprocessScriptLauncher

from vlp.cli import BadInput

log = logging.getLogger(__name__)
ERROR_FILE = "error.txt"  # in the run directory of a failed trial


def in_sweep() -> bool:
    """True inside a job of `vlp-train -m`."""
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def reject_lightning_spawner(trainer: pl.Trainer) -> None:
    """Raises BadInput for a sweep whose trials would start their DDP processes with Lightning's spawner.

    That spawner starts the other ranks by re-running the command line, `-m` included, so every
    rank would run the whole sweep. A launcher starts the ranks of each trial instead.
    """
    launcher = trainer.strategy.launcher
    if (in_sweep() and isinstance(launcher, _SubprocessScriptLauncher) and launcher.num_processes > 1
            and not trainer.strategy.cluster_environment.creates_processes_externally):
        raise BadInput(f"vlp-train -m cannot start {launcher.num_processes} DDP processes per trial itself "
                       "(Lightning would re-run the whole sweep in each); run each trial as its own job: "
                       f"hydra/launcher=submitit_slurm hydra.launcher.tasks_per_node={launcher.num_processes} "
                       f"hydra.launcher.gpus_per_node={launcher.num_processes}")


def record_failure(run_dir: Path, error: BaseException, traceback: str) -> float:
    """Writes the trial's traceback into its run directory; returns NaN, which Optuna records as failed."""
    log.error("trial failed (the sweep goes on): %s: %s\n%s", type(error).__name__, error, traceback)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / ERROR_FILE).write_text(traceback)
    return math.nan


class SweepSummary(Callback):
    """Prints a table of the trials when a sweep ends: overrides, status and the optimised metric."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        metric = config.get("optimized_metric")
        rows = [_trial(d, metric) for d in sorted(sweep_dir.iterdir(), key=_job_number) if _job_number(d) >= 0]
        if rows:
            print(summary_table(rows, metric, sweep_dir))


def _job_number(path: Path) -> int:
    return int(path.name) if path.is_dir() and path.name.isdigit() else -1


def _trial(run_dir: Path, metric: Optional[str]) -> dict[str, Any]:
    overrides_file = run_dir / ".hydra" / "overrides.yaml"
    overrides = (yaml.safe_load(overrides_file.read_text()) or []) if overrides_file.is_file() else []
    metrics_file = run_dir / "metrics.json"
    if (run_dir / ERROR_FILE).is_file():
        return dict(job=run_dir.name, status="failed", value=None, overrides=overrides)
    if not metrics_file.is_file():
        return dict(job=run_dir.name, status="unfinished", value=None, overrides=overrides)
    value = json.loads(metrics_file.read_text()).get(metric) if metric else None
    return dict(job=run_dir.name, status="ok", value=value, overrides=overrides)


def summary_table(rows: list[dict[str, Any]], metric: Optional[str], sweep_dir: Path) -> str:
    """The trials as a text table with the overrides they differ in, the best (highest `metric`) marked."""
    shared = set.intersection(*(set(r["overrides"]) for r in rows)) if len(rows) > 1 else set()
    scored = [r for r in rows if r["value"] is not None and not math.isnan(r["value"])]
    best = max(scored, key=lambda r: r["value"]) if scored else None
    header = f"{'job':>4}  {'status':<10} {metric or 'metric':>20}  overrides"
    lines = [f"\nsweep of {len(rows)} trials in {sweep_dir} ({sum(r['status'] == 'failed' for r in rows)} failed)",
             header, "-" * len(header)]
    for r in rows:
        value = "" if r["value"] is None else f"{r['value']:.4f}"
        mark = "  <- best" if r is best else ""
        overrides = " ".join(o for o in r["overrides"] if o not in shared)
        lines.append(f"{r['job']:>4}  {r['status']:<10} {value:>20}  {overrides}{mark}")
    return "\n".join(lines)
