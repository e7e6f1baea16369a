"""Lightning callbacks of vlp-train: periodic zero-shot classification on an image folder."""
from typing import Optional

import pytorch_lightning as pl
from open_clip.transform import PreprocessCfg, image_transform_v2

from vlp.eval.folder import folder_zeroshot_metrics, image_folder
from vlp.eval.prompts import load_prompts


class ZeroShotEvaluation(pl.Callback):
    """Zero-shot top-1/top-5 on an ImageNet-style folder every `every_n_steps` steps and at the last step.

    Logged as `<name>/zeroshot_top1` and `<name>/zeroshot_top5` (so `optimized_metric` can name them),
    computed on global rank 0 with the same functions as `vlp-eval image_folder=...`.

    Args:
        image_folder: `root/<class>/<image>`, classes in the prompt set's order when sorted.
        zeroshot: prompts, a built-in set (`imagenet`) or a JSON file.
        every_n_steps: optimiser steps between evaluations.
        name: metric prefix.
        batch_size, num_workers: of the evaluation's DataLoader.
    """

    def __init__(self, image_folder: Optional[str], zeroshot: str = "imagenet", every_n_steps: int = 1000,
                 name: str = "imagenet", batch_size: int = 256, num_workers: int = 4):
        self.root, self.zeroshot, self.every_n_steps, self.name = image_folder, zeroshot, every_n_steps, name
        self.batch_size, self.num_workers = batch_size, num_workers
        self.dataset = self.prompts = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if not self.root:  # checked here, not at construction, so recipes compose without the data
            raise ValueError(f"callbacks.{self.name}.image_folder is not set: point it at an image folder "
                             f"(or disable the evaluation with callbacks.{self.name}=null)")
        self.prompts = load_prompts(self.zeroshot)
        transform = image_transform_v2(PreprocessCfg(**pl_module.model.preprocess), is_train=False)
        self.dataset = image_folder(self.root, transform, len(self.prompts[0]))

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args) -> None:
        step = trainer.global_step
        if step % self.every_n_steps and step != trainer.max_steps:
            return
        if trainer.is_global_zero:
            metrics = folder_zeroshot_metrics(pl_module.model, self.dataset, *self.prompts, self.batch_size,
                                              self.num_workers, progress=False)
            metrics.pop("num_samples")
            # rank 0 alone: a synchronised log would wait for ranks that never call it
            pl_module.log_dict({f"{self.name}/{k}": v for k, v in metrics.items()}, rank_zero_only=True)
