"""The LightningModule: pretraining of a VLPModel (contrastive, plus ITM and MLM through a fusion),
validated with retrieval (ITM re-ranked with fusion), zero-shot and hard-negative accuracy."""
import time
from dataclasses import asdict
from contextlib import nullcontext
from functools import partial
from typing import Any, Optional

import pytorch_lightning as pl
import torch
import torch.nn as nn

from vlp.checkpoint import CONFIG_KEY
from vlp.config import ObjectivesConf
from vlp.data.wds import Batch
from vlp.distributed import all_gather_no_grad, world_info
from vlp.eval import (hard_negative_correct, heldout_masks, rerank_hits, retrieval_metrics, zeroshot_classifier,
                      zeroshot_metrics)
from vlp.fusion_losses import image_text_matching, itm_match_scores, masked_language_modelling
from vlp.microbatch import check_micro_batchable, feature_cached_backward
from vlp.models import VLPModel
from vlp.models.text_padding import trim_padding
from vlp.optim import param_groups


def _on_host(value: float) -> torch.Tensor:
    """A host number as a CPU tensor: `self.log` would copy a Python number to the device."""
    return torch.tensor(float(value))


class VLPLitModule(pl.LightningModule):
    """Trains `model` with `loss` (and ITM and MLM with a fusion); validates with retrieval, zero-shot
    classification and hard negatives.

    Args:
        model: the dual encoder, with or without a fusion.
        loss: module called as loss(image_features, text_features, logit_scale[, logit_bias]) -> output
            with `.loss`; the bias is passed when the model has one (sigmoid loss).
        optimizer: partial optimiser taking parameter groups (e.g. AdamW with lr, weight_decay).
        scheduler: partial LR scheduler taking (optimizer, total_steps), stepped every step.
        config: resolved run config, saved into every checkpoint so it rebuilds the model.
        param_group_options: per-tower LR scales and layer decay for `vlp.optim.param_groups`.
        micro_batch_size: encode the batch this many rows at a time with a feature cache
            (`vlp.microbatch`): the full-batch contrastive gradient at the memory of a micro-batch.
        objectives: `vlp.config.ObjectivesConf` fields: loss weights (ITM and MLM only with a fusion)
            and their settings; its defaults where absent.
        seed: seeds the ITM negative draws (the same on every rank).
    """

    def __init__(self, model: VLPModel, loss: nn.Module, optimizer: partial, scheduler: Optional[partial] = None,
                 config: Optional[dict] = None, param_group_options: Optional[dict] = None,
                 micro_batch_size: Optional[int] = None, objectives: Optional[dict] = None, seed: int = 0):
        super().__init__()
        self.objectives = asdict(ObjectivesConf()) | dict(objectives or {})
        self.seed = seed
        if model.fusion is not None:
            if micro_batch_size is not None:
                raise ValueError("micro_batch_size does not combine with model.fusion: ITM and MLM need every "
                                 "sample's token sequences at once, which is the memory micro-batching saves")
            for name in ("itm", "mlm"):  # an unused head would stall DDP's gradient reduction
                model.heads[name].requires_grad_(self.objectives[name] > 0)
        self.model, self.loss = model, loss
        if getattr(model, "compile_options", None) is not None:  # model.compile covers the loss too
            self.loss.compile(**model.compile_options)
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.config = config
        self.param_group_options = param_group_options or {}
        self.micro_batch_size = micro_batch_size
        if micro_batch_size is not None:
            check_micro_batchable(model)
        # micro-batching steps the optimiser itself: one step per batch, after the last micro-batch
        self.automatic_optimization = micro_batch_size is None
        self.skipped_samples = 0
        self.validated_at_step: Optional[int] = None
        self._last_step_end: Optional[float] = None
        self._logged_loss: Optional[float] = None
        self._val_outputs: list[tuple[torch.Tensor, ...]] = []
        self._val_tokens: list[tuple[torch.Tensor, ...]] = []  # fusion models: for ITM re-ranking
        self._hard_negatives = torch.zeros(3)

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Trims the text padding on the host, where reading the batch's length costs no device sync."""
        if self.model.trims_text_padding:
            batch = batch._replace(tokens=trim_padding(batch.tokens))
        return batch

    # -- training ---------------------------------------------------------------------------------
    def on_train_epoch_start(self) -> None:
        dataset = getattr(self.trainer.train_dataloader, "dataset", None)
        if hasattr(dataset, "set_position"):  # a new shuffle for each epoch
            dataset.set_position(self.current_epoch, self.global_step)

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        logging_step = self._logging_step()  # before a micro-batched step advances global_step
        if self.automatic_optimization:
            out = self.model(batch.images, batch.tokens, batch.boxes)
            loss = self.loss(out.image_features, out.text_features, *out.logit_args)
            total = self._with_fusion_objectives(loss.loss, out, batch)
        else:
            loss = self._micro_batched_step(batch)
            total = loss.loss
        self.skipped_samples += batch.skipped
        # Nothing here waits for the device: device values are logged as device tensors, which the
        # loggers read every `log_every_n_steps`, and host numbers as CPU tensors. The progress
        # bar reads its values at every refresh, so it shows the loss as of the last logging step.
        if logging_step or self._logged_loss is None:
            self._logged_loss = total.item()
        self.log("train/loss", _on_host(self._logged_loss), prog_bar=True)
        # this process's count; each rank reads its own share of the data
        self.log_dict({"train/logit_scale": self.model.scale().detach(),
                       "train/skipped_samples": _on_host(self.skipped_samples)})
        if hasattr(loss, "accuracy"):
            self.log("train/i2t_acc", loss.accuracy)
        return total

    def _with_fusion_objectives(self, itc: torch.Tensor, out, batch: Batch) -> torch.Tensor:
        """itc weighted, plus the weighted ITM and MLM losses of a fusion model, each logged."""
        weights = self.objectives
        if self.model.fusion is None:
            return itc
        total = weights["itc"] * itc
        terms = {}
        if weights["itm"] > 0:
            data_negatives = None
            if weights["itm_data_negatives"] and batch.negative_tokens is not None:
                data_negatives = batch.negative_tokens, batch.negative_index
            terms["itm"] = image_text_matching(self.model, out, batch.tokens, self.seed * 1_000_003 + self.global_step,
                                               weights["itm_across_ranks"], weights["itm_false_negative_ratio"],
                                               data_negatives)
        if weights["mlm"] > 0:
            terms["mlm"] = masked_language_modelling(self.model, out, batch.tokens, weights["mlm_probability"])
        self.log("train/itc_loss", itc)
        for name, term in terms.items():
            total = total + weights[name] * term.loss
            self.log_dict({f"train/{name}_loss": term.loss, f"train/{name}_acc": term.accuracy})
        return total

    def _logging_step(self) -> bool:
        """Whether Lightning hands this step's values to the loggers (its own rule)."""
        every = self.trainer.log_every_n_steps
        return bool(self.trainer.fast_dev_run) or (every > 0 and (self.global_step + 1) % every == 0)

    def _micro_batched_step(self, batch: Batch):
        optimizer, scheduler = self.optimizers(), self.lr_schedulers()
        block_sync = getattr(self.trainer.strategy, "block_backward_sync", nullcontext)
        # float16 mixed precision: manual_backward scales by the GradScaler's scale, the loss must too
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        loss = feature_cached_backward(self.model, self.loss, batch.images, batch.tokens, self.micro_batch_size,
                                       backward=self.manual_backward, no_sync=block_sync,
                                       loss_scale=scaler.get_scale() if scaler is not None else 1.0)
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
            self.log("train/samples_per_second", _on_host(len(batch.images) / (now - self._last_step_end)))
        self._last_step_end = now
        self.log("lr", _on_host(max(g["lr"] for g in self.trainer.optimizers[0].param_groups)))  # the base LR
        if self.device.type == "cuda":  # the allocator's host-side counter
            self.log("train/peak_gpu_memory_gb", _on_host(torch.cuda.max_memory_allocated(self.device) / 2**30))

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer, optimizer_closure=None) -> None:
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        # Lightning frees the gradients between the next forward and its backward, so they would sit
        # through that forward's activation peak: one more copy of the weights. Free them now.
        optimizer.zero_grad(set_to_none=True)

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
        self._val_tokens.clear()
        self._hard_negatives = torch.zeros(3, device=self.device)  # correct (dual), correct (ITM), triples

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        # full precision: bf16 keeps ~3 significant digits, enough to flip near-tied predictions
        with torch.autocast(self.device.type, enabled=False):
            out = self.model(batch.images, batch.tokens, batch.boxes)
            if batch.negative_tokens is not None:
                self._count_hard_negatives(out, batch)
        self._val_outputs.append((out.image_features.float(), out.text_features.float(), batch.labels))
        if self.model.fusion is not None and self.objectives["rerank_k"] > 0:
            self._val_tokens.append((out.image_tokens, out.text_tokens, out.text_padding.to(torch.uint8),
                                     out.text_cls_index))

    def _count_hard_negatives(self, out, batch: Batch) -> None:
        """Counts (image, caption, negative) triples whose true caption scores higher."""
        owner = batch.negative_index
        negatives = self.model.encode_text(batch.negative_tokens)
        true_cos = (out.image_features[owner] * out.text_features[owner]).sum(dim=1)
        counts = [hard_negative_correct(true_cos, (out.image_features[owner] * negatives).sum(dim=1)).sum()]
        if self.model.fusion is not None:
            image_tokens = out.image_tokens[owner]
            true_itm = itm_match_scores(self.model, image_tokens, out.text_tokens[owner], out.text_padding[owner],
                                        out.text_cls_index[owner])
            negative_itm = itm_match_scores(self.model, image_tokens, *self.model.encode_text_tokens(batch.negative_tokens))
            counts.append(hard_negative_correct(true_itm, negative_itm).sum())
        else:
            counts.append(torch.zeros((), device=self.device))
        self._hard_negatives += torch.stack([*counts, torch.tensor(float(len(owner)), device=self.device)])

    def on_validation_epoch_end(self) -> None:
        # ranks may hold different numbers of samples: gather once, after the loop
        image, text, labels = (all_gather_no_grad(torch.cat(parts)) for parts in self._gathered_parts())
        self._val_outputs.clear()
        metrics = retrieval_metrics(image, text)
        metrics |= self._fusion_metrics(image, text)
        prompts = getattr(self.trainer.datamodule, "zeroshot_prompts", lambda: None)()
        labelled = labels >= 0
        if prompts is not None and labelled.any():
            classifier = zeroshot_classifier(lambda t: self.model.encode_text(t.to(self.device)).float(),
                                             self.model.tokenizer, *prompts)
            metrics |= zeroshot_metrics(image[labelled], labels[labelled], classifier)
            heldout = getattr(self.trainer.datamodule, "heldout_labels", frozenset)()
            for part, mask in heldout_masks(labels[labelled], heldout).items():
                found = zeroshot_metrics(image[labelled][mask], labels[labelled][mask], classifier)
                metrics |= {f"{name}_{part}": value for name, value in found.items()}
        metrics["num_samples"] = len(image)
        self.log_dict({f"val/{k}": float(v) for k, v in metrics.items()}, sync_dist=True)
        self.validated_at_step = self.global_step

    def _fusion_metrics(self, image: torch.Tensor, text: torch.Tensor) -> dict[str, float]:
        """Hard-negative accuracies and, with fusion, ITM re-ranked recall@1."""
        correct_dual, correct_itm, triples = all_gather_no_grad(self._hard_negatives[None]).sum(dim=0).tolist()
        metrics = {}
        if triples:
            metrics["hard_negative_acc"] = correct_dual / triples
            if self.model.fusion is not None:
                metrics["itm_hard_negative_acc"] = correct_itm / triples
        if self._val_tokens:
            metrics |= self._itm_rerank_recall(image, text)
        return metrics

    def _itm_rerank_recall(self, image: torch.Tensor, text: torch.Tensor) -> dict[str, float]:
        """ALBEF's retrieval: top-k by contrastive similarity, re-scored by ITM; ranks split the queries."""
        image_tokens, text_tokens, padding, cls = (all_gather_no_grad(torch.cat(p)) for p in zip(*self._val_tokens))
        self._val_tokens.clear()
        padding = padding.bool()
        rank, world = world_info()
        queries = torch.arange(rank, len(image), world, device=self.device)
        k, chunk = self.objectives["rerank_k"], 256

        def itm(images: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
            return torch.cat([itm_match_scores(self.model, image_tokens[i], text_tokens[t], padding[t], cls[t])
                              for i, t in zip(images.split(chunk), texts.split(chunk))])

        with torch.autocast(self.device.type, enabled=False):
            similarity = image @ text.T  # (N, N)
            i2t = rerank_hits(similarity, queries, itm, k)
            t2i = rerank_hits(similarity.T, queries, lambda q, c: itm(c, q), k)
        hits = all_gather_no_grad(torch.stack([i2t.sum(), t2i.sum()]).float()[None]).sum(dim=0)
        return {"itm_i2t_r@1": hits[0].item() / len(image), "itm_t2i_r@1": hits[1].item() / len(image)}

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
