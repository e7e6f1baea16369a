"""Resume that continues: which checkpoint `ckpt_path=auto` means, atomic checkpoint writes, step
checkpoints after their validation and at the final step, the loop state of a checkpoint saved in
the middle of a batch or a validation, and every rank's random state (Lightning glue).
"""
import logging
import os
import random
from pathlib import Path
from typing import Any, Optional

import pytorch_lightning as pl
import numpy as np
import torch
import torch.distributed as dist
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.plugins.io import TorchCheckpointIO
from pytorch_lightning.trainer.states import TrainerFn

from vlp.rundir import slurm_batch_job

log = logging.getLogger(__name__)


def resolve_ckpt_path(ckpt_path: Optional[str], run_dir: Path) -> Optional[str]:
    """The checkpoint to resume from: a path as given, or for `auto` the newest in the run directory.

    `auto` (the default in a SLURM batch job, where `ckpt_path` is null) picks the later, by global step, of
    `checkpoints/last.ckpt` and the `hpc_ckpt_N.ckpt` that Lightning saves on SLURM's requeue signal;
    with neither, the run starts fresh.
    """
    if ckpt_path is None and slurm_batch_job():
        ckpt_path = "auto"  # a requeued job continues its own run
    if ckpt_path != "auto":
        return ckpt_path
    candidates = [run_dir / "checkpoints" / "last.ckpt", *run_dir.glob("hpc_ckpt_*.ckpt")]
    steps = {path: global_step(path) for path in candidates if path.is_file()}
    if not steps:
        log.info("ckpt_path=auto: no checkpoint in %s yet; starting fresh", run_dir)
        return None
    newest = max(steps, key=steps.get)
    log.info("ckpt_path=auto: resuming from %s (step %d)", newest, steps[newest])
    return str(newest)


def global_step(path: Path) -> int:
    """The step a checkpoint was saved at, read without loading its tensors."""
    return torch.load(path, map_location="cpu", mmap=True, weights_only=False)["global_step"]


class StepCheckpoint(ModelCheckpoint):
    """Lightning's `ModelCheckpoint` that saves a validation step's checkpoint after its validation,
    also saves `last.ckpt` at the final step, and never hangs a multi-process run that fails on one rank.

    Lightning saves a step's checkpoint before that step's validation, and a run resumed from it
    skips the validation as done: a kill during a validation lost it for good. Lightning saves
    `last.ckpt` at the end of training only when it never saved one before, so a run whose last
    step is not a multiple of `every_n_train_steps` would end on an older one.
    """

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args, **kwargs) -> None:
        epoch_loop = trainer.fit_loop.epoch_loop
        if epoch_loop._should_check_val_fx(trainer.fit_loop._data_fetcher):
            self._defer_save_until_validation = True  # Lightning's own hold: saved in on_validation_end
            return
        super().on_train_batch_end(trainer, pl_module, *args, **kwargs)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args, **kwargs) -> None:
        if self._defer_save_until_validation:  # the validation did not run: a run without validation data
            self._defer_save_until_validation = False
            super().on_train_batch_end(trainer, pl_module, None, *args, **kwargs)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # Saving is collective (Lightning's barrier, every rank's random state). An error raised on
        # one rank leaves the others blocked in the step's all-reduce, so saving would wait for
        # them until the process group times out (30 minutes); only Ctrl-C reaches every rank.
        if trainer.world_size > 1 and not isinstance(exception, KeyboardInterrupt):
            log.error("rank %d failed (%s); with %d ranks no checkpoint is saved on a failure: the last one "
                      "in %s is kept", trainer.global_rank, type(exception).__name__, trainer.world_size, self.dirpath)
            return
        super().on_exception(trainer, pl_module, exception)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._last_global_step_saved != trainer.global_step and not self._should_skip_saving_checkpoint(trainer):
            candidates = self._monitor_candidates(trainer)
            self._save_topk_checkpoint(trainer, candidates)
            self._save_last_checkpoint(trainer, candidates)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file beside its target, then renames it into place.

    A kill at any moment leaves either the previous file or the new one, never a torn one.
    Remote paths (s3://, ...) are written as Lightning writes them.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Optional[Any] = None) -> None:
        if "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


class ResumePoint(pl.Callback):
    """Makes every checkpoint of a fit resume after its last finished batch, and one saved in the middle
    of a validation (on Ctrl-C or another exception, or on SLURM's requeue signal) run that whole
    validation again.

    Lightning's loop resumes from progress counters that it reads right only at the points where its
    own `ModelCheckpoint` saves. From a checkpoint saved within a batch, the unfinished batch stayed
    counted in the run's batches (Lightning-AI/pytorch-lightning#19367), so each later validation came
    a step early and the last one twice; and right after a validation, every later log row came a step
    late. A validation cut off between two of its batches counted as done and was skipped; cut off
    within one, it went on from that batch's index, over the loader's first batches.
    """

    def __init__(self):
        self._validated_at_step = None

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._validated_at_step = trainer.global_step  # its metrics are logged: it must not run again

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        if trainer.state.fn != TrainerFn.FITTING:
            return
        loop = checkpoint["loops"]["fit_loop"]
        if trainer.validating and self._validated_at_step != trainer.global_step:
            # saved as within the validation's first batch, from which Lightning runs all of it again
            validation = loop["epoch_loop.val_loop.batch_progress"]
            before = validation["total"]["completed"] - validation["current"]["completed"]  # earlier validations
            validation["total"] = {"ready": before + 1, "started": before + 1, "processed": before, "completed": before}
            validation["current"] = dict.fromkeys(validation["current"], 0)
            return
        batches = loop["epoch_loop.batch_progress"]
        for counts in batches["total"], batches["current"]:
            counts["ready"] = counts["started"] = counts["processed"]  # forget a batch not finished
        done_in_epoch = batches["current"]["processed"]
        if done_in_epoch:  # saved as at the end of the last finished batch, as Lightning's own checkpoints are
            for counts in batches["total"], batches["current"]:
                counts["completed"] = counts["processed"] - 1
            stepped = done_in_epoch % trainer.accumulate_grad_batches == 0  # Lightning counts it again on resume
            loop["epoch_loop.state_dict"]["_batches_that_stepped"] = trainer.global_step - stepped


class RankRngStates(pl.Callback):
    """Saves the random state (torch, CUDA, numpy, Python) of every rank; a resumed rank continues its own.

    Lightning writes the checkpoint from rank 0 only, so the states are gathered from all ranks when
    it is made (every rank takes part in `trainer.save_checkpoint`).
    """

    def state_dict(self) -> dict[str, Any]:
        states = _rng_states()
        if not (dist.is_available() and dist.is_initialized()):
            return {"ranks": [states]}
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, states)
        return {"ranks": gathered}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        ranks = state_dict["ranks"]
        world, rank = (dist.get_world_size(), dist.get_rank()) if dist.is_initialized() else (1, 0)
        if len(ranks) != world:
            log.warning("checkpoint holds the random state of %d ranks, this run has %d: not restored",
                        len(ranks), world)
            return
        _set_rng_states(ranks[rank])


def _rng_states() -> dict[str, Any]:
    """This process's random states, in types a weights-only `torch.load` accepts."""
    name, keys, *rest = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
            "numpy": [name, torch.from_numpy(keys.astype(np.int64)), *rest]}


def _set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    if states["cuda"]:
        torch.cuda.set_rng_state_all(states["cuda"])
    name, keys, *rest = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
