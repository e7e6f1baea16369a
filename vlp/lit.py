"""The LightningModule: contrastive pretraining of a VLPModel, with retrieval and zero-shot validation."""
import time
from contextlib import nullcontext
from functools import partial
from typing import Any, Optional

import pytorch_lightning as pl
import torch
import torch.nn as nn

from vlp.checkpoint import CONFIG_KEY
from vlp.data.wds import Batch
from vlp.distributed import all_gather_no_grad
from vlp.eval import retrieval_metrics, zeroshot_classifier, zeroshot_metrics
from vlp.microbatch import feature_cached_backward
from vlp.models import VLPModel
from vlp.optim import param_groups


class VLPLitModule(pl.LightningModule):
    """Trains `model` with `loss`; validates with retrieval and zero-shot classification.

    Args:
        model: the dual encoder.
        loss: module called as loss(image_features, text_features, logit_scale[, logit_bias]) -> output
            with `.loss`; the bias is passed when the model has one (sigmoid loss).
        optimizer: partial optimiser taking parameter groups (e.g. AdamW with lr, weight_decay).
        scheduler: partial LR scheduler taking (optimizer, total_steps), stepped every step.
        config: resolved run config, saved into every checkpoint so it rebuilds the model.
        param_group_options: per-tower LR scales and layer decay for `vlp.optim.param_groups`.
        micro_batch_size: encode the batch this many rows at a time with a feature cache
            (`vlp.microbatch`): the full-batch contrastive gradient at the memory of a micro-batch.
    """

    def __init__(self, model: VLPModel, loss: nn.Module, optimizer: partial, scheduler: Optional[partial] = None,
                 config: Optional[dict] = None, param_group_options: Optional[dict] = None,
                 micro_batch_size: Optional[int] = None):
        super().__init__()
        self.model, self.loss = model, loss
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.config = config
        self.param_group_options = param_group_options or {}
        self.micro_batch_size = micro_batch_size
        # micro-batching steps the optimiser itself: one step per batch, after the last micro-batch
        self.automatic_optimization = micro_batch_size is None
        self.skipped_samples = 0
        self.validated_at_step: Optional[int] = None
        self._last_step_end: Optional[float] = None
        self._val_outputs: list[tuple[torch.Tensor, ...]] = []

    # -- training ---------------------------------------------------------------------------------
    def on_train_epoch_start(self) -> None:
        dataset = getattr(self.trainer.train_dataloader, "dataset", None)
        if hasattr(dataset, "set_position"):  # a new shuffle for each epoch
            dataset.set_position(self.current_epoch, self.global_step)

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        if self.automatic_optimization:
            out = self.model(batch.images, batch.tokens)
            loss = self.loss(out.image_features, out.text_features, *out.logit_args)
        else:
            loss = self._micro_batched_step(batch)
        self.skipped_samples += batch.skipped
        self.log("train/loss", loss.loss, prog_bar=True)
        # this process's count; each rank reads its own share of the data
        self.log_dict({"train/logit_scale": self.model.scale(),
                       "train/skipped_samples": float(self.skipped_samples)})
        if hasattr(loss, "accuracy"):
            self.log("train/i2t_acc", loss.accuracy)
        return loss.loss

    def _micro_batched_step(self, batch: Batch):
        optimizer, scheduler = self.optimizers(), self.lr_schedulers()
        block_sync = getattr(self.trainer.strategy, "block_backward_sync", nullcontext)
        loss = feature_cached_backward(self.model, self.loss, batch.images, batch.tokens, self.micro_batch_size,
                                       backward=self.manual_backward, no_sync=block_sync)
        optimizer.step()
        optimizer.zero_grad()
        if scheduler is not None:
            scheduler.step()
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Batch, batch_idx: int) -> None:
        self.model.clamp_logit_scale_()  # after the optimiser step, as open_clip does
        # per device and including data loading, like open_clip's samples_per_second_per_gpu
        now = time.perf_counter()
        if self._last_step_end is not None:
            self.log("train/samples_per_second", len(batch.images) / (now - self._last_step_end))
        self._last_step_end = now
        self.log("lr", max(g["lr"] for g in self.trainer.optimizers[0].param_groups))  # the base LR
        if self.device.type == "cuda":
            self.log("train/peak_gpu_memory_gb", torch.cuda.max_memory_allocated(self.device) / 2**30)

    def configure_optimizers(self):
        kwargs = self.optimizer_factory.keywords
        groups = param_groups(self.model, kwargs.get("weight_decay", 0.0), kwargs["lr"],
                              **self.param_group_options)
        optimizer = self.optimizer_factory(groups)
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer, total_steps=self.trainer.estimated_stepping_batches)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -- validation -------------------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        self._val_outputs.clear()

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        # full precision: bf16 keeps ~3 significant digits, enough to flip near-tied predictions
        with torch.autocast(self.device.type, enabled=False):
            out = self.model(batch.images, batch.tokens)
        self._val_outputs.append((out.image_features.float(), out.text_features.float(), batch.labels))

    def on_validation_epoch_end(self) -> None:
        # ranks may hold different numbers of samples: gather once, after the loop
        image, text, labels = (all_gather_no_grad(torch.cat(parts)) for parts in self._gathered_parts())
        self._val_outputs.clear()
        metrics = retrieval_metrics(image, text)
        prompts = getattr(self.trainer.datamodule, "zeroshot_prompts", lambda: None)()
        labelled = labels >= 0
        if prompts is not None and labelled.any():
            classifier = zeroshot_classifier(lambda t: self.model.encode_text(t.to(self.device)).float(),
                                             self.model.tokenizer, *prompts)
            metrics |= zeroshot_metrics(image[labelled], labels[labelled], classifier)
        metrics["num_samples"] = len(image)
        self.log_dict({f"val/{k}": float(v) for k, v in metrics.items()}, sync_dist=True)
        self.validated_at_step = self.global_step

    def _gathered_parts(self):
        if not self._val_outputs:  # this rank got no sample; still join the gather
            width = self.model.encode_text(self.model.tokenizer(["x"]).to(self.device)).shape[1]
            empty = torch.empty(0, width, device=self.device)
            return [empty], [empty.clone()], [torch.empty(0, dtype=torch.long, device=self.device)]
        return zip(*self._val_outputs)

    # -- checkpoints ------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[CONFIG_KEY] = self.config
        checkpoint["vlp_skipped_samples"] = self.skipped_samples

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.skipped_samples = checkpoint.get("vlp_skipped_samples", 0)
