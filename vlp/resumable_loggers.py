"""Loggers that continue a resumed run in its own directory (Lightning glue).

A run resumed into its run directory keeps what it logged before: the CSV log keeps the earlier
rows (and drops those written after the checkpoint it resumes from, which are logged again), the
TensorBoard writer purges the same steps, and wandb resumes the same run, whose id is kept in
`<run dir>/wandb_id`.
"""
import csv
import os
import uuid
from pathlib import Path
from typing import Any, Optional

from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.loggers.csv_logs import ExperimentWriter
from pytorch_lightning.utilities import rank_zero_only


class _AppendingWriter(ExperimentWriter):
    """Lightning's CSV writer, appending to an existing metrics.csv instead of deleting it."""

    def _check_log_dir_exists(self) -> None:
        if os.path.isfile(self.metrics_file_path):
            with open(self.metrics_file_path, newline="") as f:
                self.metrics_keys = sorted(next(csv.reader(f), []))

    def _rewrite_with_new_header(self, fieldnames: list[str]) -> None:
        # atomically, as a kill during the rewrite must not lose the rows already there
        with open(self.metrics_file_path, newline="") as f:
            rows = list(csv.DictReader(f))
        _write_rows(Path(self.metrics_file_path), fieldnames, rows)


class AppendingCSVLogger(CSVLogger):
    """`CSVLogger` that continues `metrics.csv`; rows from `resume_step` on are dropped first.

    Args:
        resume_step: the global step a resumed run starts at (the rows from it on were written
            after its checkpoint and are logged again); 0 for a fresh start, None to keep all rows.
        **kwargs: `CSVLogger` arguments.
    """

    def __init__(self, *args, resume_step: Optional[int] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._resume_step = resume_step

    @property
    @rank_zero_only
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            os.makedirs(self.root_dir, exist_ok=True)
            path = Path(self.log_dir) / ExperimentWriter.NAME_METRICS_FILE
            if self._resume_step is not None and path.is_file():
                drop_rows_from_step(path, self._resume_step)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment


def drop_rows_from_step(path: Path, step: int) -> None:
    """Removes the rows logged at `step` or later from a CSV log."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        fieldnames, rows = reader.fieldnames or [], [r for r in reader if int(r["step"]) < step]
    _write_rows(path, fieldnames, rows)


def _write_rows(path: Path, fieldnames: list[str], rows: list[dict]) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fieldnames)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def continuation_kwargs(target: str, run_dir: str, resume_step: int) -> dict[str, Any]:
    """Extra arguments that make the logger class `target` continue the run in `run_dir`."""
    name = target.rsplit(".", 1)[-1]
    if name == "AppendingCSVLogger":
        return {"resume_step": resume_step}
    if name == "TensorBoardLogger":
        return {"purge_step": resume_step}  # SummaryWriter hides the events from this step on
    if name == "WandbLogger":
        return {"id": wandb_run_id(Path(run_dir)), "resume": "allow"}
    return {}


def wandb_run_id(run_dir: Path) -> str:
    """The wandb run id of this run directory, drawn on first use and kept in `wandb_id`."""
    path = run_dir / "wandb_id"
    if path.is_file():
        return path.read_text().strip()
    run_id = uuid.uuid4().hex[:8]  # wandb's own ids are 8 characters of [a-z0-9]
    if rank_zero_only.rank == 0:  # only rank 0 logs to wandb
        run_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(run_id + "\n")
    return run_id
