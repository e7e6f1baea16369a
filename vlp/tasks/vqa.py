"""`task=vqa`: fine-tunes a fusion VLPModel to answer questions (fused [CLS] -> `heads.vqa`)."""
import json
import logging
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from vlp.data.wds import Batch
from vlp.distributed import all_gather_objects
from vlp.eval.vqa import vqa_accuracy, vqa_metrics
from vlp.lit import VLPLitModule

log = logging.getLogger(__name__)
ANSWERS_KEY = "vlp_answers"  # where checkpoints keep the answer vocabulary


class VQALitModule(VLPLitModule):
    """VQA as multi-label answer classification over a closed vocabulary (LXMERT, ALBEF's classifier).

    The question goes through the text tower and the fusion with the image; the fused [CLS] goes
    through `heads.vqa`. Loss: binary cross-entropy against the soft VQA scores of every answer,
    summed over answers, averaged over questions. Validation logs `val/vqa_acc`, `val/vqa_acc_<type>`
    per answer type, `val/vqa_majority_acc`: always answering the most frequent training answer, and
    both on the images with a class (`_labelled`; on the synthetic data: the held-out pairs).
    The answer vocabulary is written to `<run dir>/answers.json` and into every checkpoint.

    Args:
        model: a VLPModel with a fusion and `heads.vqa`.
        loss, optimizer, **common: as for `VLPLitModule` (`loss` is unused; micro_batch_size must be unset).
    """

    def __init__(self, model, loss, optimizer, **common):
        if model.fusion is None:
            raise ValueError("VQA needs a fusion model: add fusion=cross_attention|merged|co_attention")
        if "vqa" not in model.heads:
            raise ValueError("task=vqa needs model.heads.vqa (conf/task/vqa.yaml adds vlp.models.heads.VQAHead)")
        if common.get("micro_batch_size"):
            raise ValueError("micro_batch_size works with task=pretrain only; set micro_batch_size=null")
        super().__init__(model, loss, optimizer, **common)
        self.answers: Optional[list[str]] = None
        self._freeze_unreached()
        self._val_results: list[tuple[float, float, str, bool]] = []  # (accuracy, majority accuracy, type, labelled)

    def _freeze_unreached(self) -> None:
        """Freezes what the answer never depends on (pooled projections, temperature, ITM/MLM heads):
        DDP needs a gradient for every trainable parameter, and they would only decay."""
        size = self.model.preprocess["size"]
        images = torch.zeros(2, 3, *((size, size) if isinstance(size, int) else size))
        training = self.model.training
        self.model.eval()  # BatchNorm must not learn from the probe
        try:
            self.answer_logits(images, self.model.tokenizer(["a", "b"]), images.new_zeros(2, 0, 4)).sum().backward()
        finally:
            self.model.train(training)
        frozen = [name for name, p in self.model.named_parameters() if p.requires_grad and p.grad is None]
        for name, p in self.model.named_parameters():
            p.requires_grad_(p.requires_grad and name not in frozen)
        self.model.zero_grad(set_to_none=True)
        log.info("VQA trains %d parameter tensors; frozen as unused by it: %s", sum(
            p.requires_grad for p in self.model.parameters()), ", ".join(frozen) or "none")

    def answer_logits(self, images: torch.Tensor, questions: torch.Tensor,
                      boxes: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, K) logits over the answer vocabulary (K = its length once known); boxes (B, R, 4) for region tokens."""
        logits = self.model.heads["vqa"](self.model.fuse(images, questions, boxes).cls)
        return logits[:, : len(self.answers)] if self.answers else logits

    def on_fit_start(self) -> None:
        self.answers = self.trainer.datamodule.answers
        run_dir = (self.config or {}).get("paths", {}).get("run_dir")
        if self.trainer.is_global_zero and run_dir:
            Path(run_dir).mkdir(parents=True, exist_ok=True)
            (Path(run_dir) / "answers.json").write_text(json.dumps(self.answers, indent=0))

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        logits = self.answer_logits(batch.images, batch.tokens, batch.boxes)
        scores = batch.labels["scores"][:, : logits.shape[1]]
        loss = F.binary_cross_entropy_with_logits(logits, scores, reduction="sum") / len(logits)
        self.skipped_samples += batch.skipped
        self.log("train/loss", loss, prog_bar=True)
        self.log_dict({"train/vqa_acc": vqa_accuracy(logits.detach(), scores).mean(),
                       "train/skipped_samples": float(self.skipped_samples)})
        return loss

    def on_validation_epoch_start(self) -> None:
        self._val_results.clear()

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        with torch.autocast(self.device.type, enabled=False):
            logits = self.answer_logits(batch.images, batch.tokens, batch.boxes)
        scores = batch.labels["scores"][:, : logits.shape[1]]
        # column 0 is the most frequent training answer: the majority baseline
        self._val_results += zip(vqa_accuracy(logits, scores).tolist(), scores[:, 0].tolist(),
                                 batch.labels["answer_type"], batch.labels["labelled"].tolist())

    def on_validation_epoch_end(self) -> None:
        results = all_gather_objects(self._val_results)  # every rank gets all, computes the same values
        self._val_results.clear()
        accuracy, majority, types, labelled = zip(*results) if results else ((), (), (), ())
        metrics = vqa_metrics(accuracy, types)
        if results:
            metrics["vqa_majority_acc"] = sum(majority) / len(majority)
        if any(labelled):  # images with a class; on the synthetic data, the held-out (colour, shape) pairs
            metrics["vqa_acc_labelled"] = sum(a for a, l in zip(accuracy, labelled) if l) / sum(labelled)
            metrics["vqa_majority_acc_labelled"] = sum(m for m, l in zip(majority, labelled) if l) / sum(labelled)
        metrics["num_samples"] = len(results)
        self.log_dict({f"val/{k}": float(v) for k, v in metrics.items()})
        self.validated_at_step = self.global_step

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint[ANSWERS_KEY] = self.answers

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        self.answers = checkpoint.get(ANSWERS_KEY)
