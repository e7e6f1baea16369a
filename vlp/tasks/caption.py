"""`task=caption`: CoCa training (contrastive + captioning loss) with generated-caption validation."""
import logging
from typing import Optional

import torch

from vlp.data.wds import Batch
from vlp.distributed import all_gather_objects
from vlp.eval import heldout_masks
from vlp.eval.captioning import attribute_accuracy, caption_metrics
from vlp.lit import VLPLitModule
from vlp.models.caption import caption_forward, caption_loss
from vlp.models.generate import decode, generate
from vlp.models.model import VLPOutput

log = logging.getLogger(__name__)


class CaptionLitModule(VLPLitModule):
    """Trains a CoCa VLPModel (towers + `heads.caption`) with open_clip's CoCaLoss semantics.

    loss = contrastive_loss_weight * contrastive loss + caption_loss_weight * next-token cross-entropy
    (padding ignored). Validation adds to pretraining's retrieval and zero-shot metrics
    `val/caption_bleu4`, `val/caption_cider` of generated captions against the validation captions,
    and `val/caption_attr_acc` on labelled images (see `vlp.eval.captioning.attribute_accuracy`),
    also split into `_heldout` and `_seen` where the zero-shot prompt file lists held-out classes.

    Args:
        model, loss, optimizer: as for `VLPLitModule`; `loss` is the contrastive loss.
        caption_loss_weight: weight of the captioning loss (open_clip's default: 2).
        contrastive_loss_weight: weight of the contrastive loss (open_clip's default: 1).
        generation: keyword arguments of `vlp.models.generate.generate` for validation captions.
        **common: the other `VLPLitModule` arguments (scheduler, config, ...; micro_batch_size must be unset).
    """

    def __init__(self, model, loss, optimizer, *, caption_loss_weight: float = 2.0,
                 contrastive_loss_weight: float = 1.0, generation: Optional[dict] = None, **common):
        if common.get("micro_batch_size"):
            raise ValueError("micro_batch_size works with task=pretrain only; set micro_batch_size=null")
        if "caption" not in model.heads:
            raise ValueError("task=caption needs a caption decoder in model.heads.caption "
                             "(conf/task/caption.yaml adds CoCa's: vlp.models.caption.coca_text_decoder)")
        super().__init__(model, loss, optimizer, **common)
        self.caption_loss_weight, self.contrastive_loss_weight = caption_loss_weight, contrastive_loss_weight
        self.generation = dict(generation or {"method": "greedy"})
        self._generated: list[tuple[str, str, int]] = []  # (caption, reference, label)

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        out = caption_forward(self.model, batch.images, batch.tokens)
        logit_args = VLPOutput(out.image_features, out.text_features, self.model.scale(), self.model.logit_bias).logit_args
        contrastive = self.loss(out.image_features, out.text_features, *logit_args).loss
        captioning = caption_loss(out.logits, out.labels)
        loss = self.contrastive_loss_weight * contrastive + self.caption_loss_weight * captioning
        self.skipped_samples += batch.skipped
        self.log("train/loss", loss, prog_bar=True)
        self.log_dict({"train/contrastive_loss": contrastive, "train/caption_loss": captioning,
                       "train/logit_scale": self.model.scale(), "train/skipped_samples": float(self.skipped_samples)})
        return loss

    def on_validation_epoch_start(self) -> None:
        super().on_validation_epoch_start()
        self._generated.clear()

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        super().validation_step(batch, batch_idx)
        with torch.autocast(self.device.type, enabled=False):
            tokens = generate(self.model, batch.images, **self.generation)
        # references pass through the same tokenizer as the captions: both lower case, punctuation split
        self._generated += zip(decode(tokens), decode(batch.tokens), batch.labels.tolist())

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        generated = all_gather_objects(self._generated)
        captions, references, labels = zip(*generated) if generated else ((), (), ())
        metrics = caption_metrics(captions, [[r] for r in references])
        prompts = getattr(self.trainer.datamodule, "zeroshot_prompts", lambda: None)()
        labelled = [(c, l) for c, l in zip(captions, labels) if l >= 0]
        if prompts is not None and labelled:
            metrics["caption_attr_acc"] = attribute_accuracy(*zip(*labelled), prompts[0])
            heldout = getattr(self.trainer.datamodule, "heldout_labels", frozenset)()
            for part, mask in heldout_masks(torch.tensor([l for _, l in labelled]), heldout).items():
                chosen = [pair for pair, keep in zip(labelled, mask.tolist()) if keep]
                metrics[f"caption_attr_acc_{part}"] = attribute_accuracy(*zip(*chosen), prompts[0])
        # every rank holds all captions and computes the same values: no reduction needed
        self.log_dict({f"val/{k}": float(v) for k, v in metrics.items()})
        if self.trainer.is_global_zero:
            log.info("val captions: %s", "; ".join(f"{c!r} (ref {r!r})" for c, r, _ in generated[:3]))
        self._generated.clear()

