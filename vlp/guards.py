"""Stop a diverged run before it can overwrite the last good checkpoint (Lightning glue)."""
from collections.abc import Mapping
from typing import Any, Optional

import pytorch_lightning as pl
import torch


class DivergedError(FloatingPointError):
    """The training loss or the weights became NaN or inf."""


class StopOnNonFiniteLoss(pl.Callback):
    """Stops training with a clear message when the loss or the weights become NaN or inf.

    The loss check accumulates on the device (no host sync per step) and is read every
    `trainer.log_every_n_steps` steps; before any checkpoint is written the weights are checked
    too, so no checkpoint ever holds diverged weights: the run stops (it does not skip the step)
    with its last good `last.ckpt` intact.
    """

    def __init__(self):
        self._first_bad_step: Optional[torch.Tensor] = None  # () long on the device; -1 while all is finite

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        loss = outputs["loss"] if isinstance(outputs, Mapping) else outputs
        if loss is None:
            return
        loss = loss.detach()
        if self._first_bad_step is None:
            self._first_bad_step = torch.full((), -1, dtype=torch.long, device=loss.device)
        newly_bad = (self._first_bad_step < 0) & ~torch.isfinite(loss).all()
        self._first_bad_step = torch.where(newly_bad, trainer.global_step, self._first_bad_step)
        if trainer.global_step % max(trainer.log_every_n_steps, 1) == 0:
            self._check_loss(trainer)

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        # raising here, before anything is written, leaves the checkpoint on disk untouched
        self._check_loss(trainer)
        params = [p.detach() for p in pl_module.parameters()]
        if params and not bool(torch.stack([torch.isfinite(p).all() for p in params]).all()):
            self._stop(trainer, f"the weights became NaN or inf by step {trainer.global_step}")

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # runs before ModelCheckpoint's save-on-exception: diverged weights must not become last.ckpt
        if isinstance(exception, FloatingPointError):
            for callback in trainer.checkpoint_callbacks:
                callback.save_on_exception = False

    def _check_loss(self, trainer: pl.Trainer) -> None:
        if self._first_bad_step is not None and (step := int(self._first_bad_step)) >= 0:
            self._stop(trainer, f"the training loss became NaN or inf at step {step}")

    @staticmethod
    def _stop(trainer: pl.Trainer, what: str) -> None:
        where = trainer.checkpoint_callback.dirpath if trainer.checkpoint_callback else trainer.default_root_dir
        raise DivergedError(f"{what}: training stopped without saving; the last good checkpoint is in {where}. "
                            "Resume from it with a lower optim.lr, a longer scheduler.warmup_steps or "
                            "trainer.gradient_clip_val")
