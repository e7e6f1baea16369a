"""LightningDataModule over webdataset shards (Lightning glue for vlp.data)."""
import logging
import os
import signal
import warnings
from functools import partial
from typing import Any, Callable, Optional

import pytorch_lightning as pl
import torch
import torch.nn as nn
from lightning_fabric.utilities.seed import pl_worker_init_function
from open_clip.transform import PreprocessCfg, image_transform_v2
from torch.utils.data import DataLoader

from vlp.data.wds import IMAGE_KEYS, EvalStream, SampleDecoder, TrainStream, count_samples, expand_urls
from vlp.eval.prompts import load_heldout, load_prompts

log = logging.getLogger(__name__)
# the streams split batches over workers exactly, so their __len__ is right with any number of workers
warnings.filterwarnings("ignore", message=r".*`IterableDataset` has `__len__` defined")


class PositionedLoader(DataLoader):
    """The training loader; its stream position (epoch, step) travels in Lightning's checkpoints.

    On resume the stream restarts at that position with a new shuffle seeded by it (see
    `TrainStream`): the step count and epoch boundaries continue, no sequence is replayed.
    With `resampled=true` (shards drawn with replacement) the data then follow the same
    distribution as an uninterrupted run; with `resampled=false` each reader starts a new pass
    over its shards, so in the interrupted epoch some samples may be seen twice and others not.

    Args:
        position: () -> (epoch, global step) at the time a checkpoint is saved.
    """

    def __init__(self, dataset: TrainStream, *args, position: Callable[[], tuple[int, int]], **kwargs):
        super().__init__(dataset, *args, **kwargs)
        self.position = position

    def state_dict(self) -> dict[str, int]:
        epoch, step = self.position()
        return {"epoch": epoch, "step": step}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.dataset.set_position(state_dict["epoch"], state_dict["step"])


def leave_ctrl_c_to_the_main_process(worker_id: int, rank: int) -> None:
    """A data worker's start: ignore SIGINT, then seed as Lightning would have.

    Ctrl-C in a terminal reaches the whole process group, the workers too. A worker that dies of
    it makes PyTorch raise "DataLoader worker exited unexpectedly" in the main process, which can
    come in the middle of saving the interrupted run's checkpoint. The main process stops the
    workers itself once it has saved. `seed_everything(workers=True)` adds Lightning's seeding
    only to loaders without a `worker_init_fn`, so this one calls it.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if int(os.environ.get("PL_SEED_WORKERS", 0)):
        pl_worker_init_function(worker_id, rank)


def check_boxes(model: nn.Module, max_boxes: Optional[int]) -> None:
    """Refuses data without boxes for a model whose fusion reads region tokens, naming the key."""
    inputs = getattr(getattr(model, "fusion", None), "inputs", None)
    if inputs is not None and inputs.region_stage is not None and not max_boxes:
        raise ValueError("the model's fusion reads region tokens (model.fusion.image_input=regions): set "
                         "data.max_boxes to the most boxes a sample's json `boxes` lists")


class VLPDataModule(pl.LightningDataModule):
    """Image-text shards for training and validation.

    Args:
        train: `urls` (brace pattern, folder, glob or list), `num_samples` (one epoch;
            read from a `sizes.json` beside the shards when null), `resampled`,
            `shuffle_buffer`.
        val: `urls` of the validation shards; no validation when they are None.
        batch_size: per device.
        num_workers: DataLoader workers per device.
        preprocess: the model's open_clip preprocessing config (size, mean, std, ...).
        tokenizer: the model's tokenizer.
        augment: open_clip `AugmentationCfg` fields for training images.
        zeroshot: JSON file with `classnames` and `templates`, or a built-in set (`imagenet`), for
            zero-shot classification on the labelled (`.cls`) validation samples; None to skip.
        prepare: called once per node before reading (e.g. writes synthetic shards).
        image_key, caption_key, label_key: webdataset extensions to read.
        seed: base seed of the shard and sample shuffling.
        prefetch_factor: batches each worker prepares ahead.
        max_boxes: region boxes read per sample from its json `boxes` (`vlp.data.boxes`), for a
            fusion that reads regions; 0: none.
    """

    def __init__(
        self,
        train: dict,
        val: Optional[dict],
        batch_size: int,
        num_workers: int,
        preprocess: dict,
        tokenizer: Callable,
        augment: Optional[dict] = None,
        zeroshot: Optional[str] = None,
        prepare: Optional[Callable[[], Any]] = None,
        image_key: str = IMAGE_KEYS,
        caption_key: str = "txt",
        label_key: str = "cls",
        seed: int = 0,
        prefetch_factor: int = 4,
        max_boxes: int = 0,
    ):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"data.batch_size must be positive, got {batch_size}")
        self.train_cfg, self.val_urls = dict(train), (val or {}).get("urls")
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.prefetch_factor = prefetch_factor
        self.zeroshot_path, self.prepare = zeroshot, prepare
        preprocess_cfg = PreprocessCfg(**preprocess)
        keys = dict(image_key=image_key, caption_key=caption_key, label_key=label_key, max_boxes=max_boxes)
        self.train_decoder = SampleDecoder(image_transform_v2(preprocess_cfg, True, augment), **keys)
        self.val_decoder = SampleDecoder(image_transform_v2(preprocess_cfg, False), **keys)
        self.tokenizer = tokenizer
        self.train_set: Optional[TrainStream] = None
        self.val_set: Optional[EvalStream] = None

    def prepare_data(self) -> None:
        if self.prepare is not None:
            self.prepare()

    def setup(self, stage: str) -> None:
        world = self.trainer.world_size if self.trainer else 1
        if stage == "fit":
            urls = expand_urls(self.train_cfg["urls"])
            num_samples = self.train_cfg.get("num_samples") or count_samples(urls)
            if not num_samples:
                raise ValueError("data.train.num_samples is required: there is no sizes.json beside "
                                 f"the shards {urls[0]} ... to count them")
            num_batches = num_samples // (self.batch_size * world)
            if num_batches < 1:
                raise ValueError(f"data.train.num_samples={num_samples} is less than one global batch "
                                 f"({self.batch_size} x {world} devices)")
            resampled = self.train_cfg.get("resampled", True)
            readers = world * max(1, self.num_workers)
            if not resampled and len(urls) < readers:
                raise ValueError(f"{len(urls)} train shards cannot feed {readers} readers (devices x "
                                 "data.num_workers) without data.train.resampled=true")
            self.train_set = TrainStream(urls, self.train_decoder, self.tokenizer, self.batch_size, num_batches,
                                         resampled, self.train_cfg.get("shuffle_buffer", 1000), self.seed)
        if stage in ("fit", "validate") and self.val_urls:
            self.val_set = EvalStream(expand_urls(self.val_urls), self.val_decoder, self.tokenizer, self.batch_size)

    def train_dataloader(self) -> DataLoader:
        if self.trainer is not None:  # a resumed run continues with a fresh stream
            self.train_set.set_position(self.trainer.current_epoch, self.trainer.global_step)
        return self._loader(self.train_set, PositionedLoader, position=self._position)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set) if self.val_set is not None else []

    def _position(self) -> tuple[int, int]:
        return self.trainer.current_epoch, self.trainer.global_step

    def _loader(self, dataset, loader_class=DataLoader, **kwargs) -> DataLoader:
        # the streams batch; the loader must not batch again
        rank = self.trainer.global_rank if self.trainer is not None else 0
        return loader_class(dataset, batch_size=None, num_workers=self.num_workers,
                            worker_init_fn=partial(leave_ctrl_c_to_the_main_process, rank=rank),
                            pin_memory=torch.cuda.is_available(),
                            prefetch_factor=self.prefetch_factor if self.num_workers else None, **kwargs)

    def zeroshot_prompts(self) -> Optional[tuple[list[str], list[str]]]:
        """(classnames, templates) for zero-shot classification, or None."""
        return load_prompts(self.zeroshot_path) if self.zeroshot_path else None

    def heldout_labels(self) -> frozenset[int]:
        """Labels of the zero-shot classes kept out of training (`"heldout"` in the prompt file)."""
        return load_heldout(self.zeroshot_path) if self.zeroshot_path else frozenset()
