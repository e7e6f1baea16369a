"""webdataset shards -> decoded samples -> batches.

Shards hold `{key}.jpg|png|webp` + `{key}.txt` (+ `{key}.cls` for labelled evaluation
data, + `{key}.json` whose `negatives` lists hard negative captions and whose `boxes` lists
region boxes, `vlp.data.boxes`). Two streams are built on webdataset's tar reading and shuffling:

- `TrainStream`: an endless shard stream (resampled with replacement, or each rank and
  worker cycling over its own disjoint subset), cut into exactly `num_batches` batches
  per epoch on every rank, so DDP ranks always run the same number of steps.
- `EvalStream`: every sample exactly once over all ranks and workers, in shard order.

A sample that fails to read, decode or transform is skipped and counted; the count
travels with the next batch (`Batch.skipped`) so the trainer can log it.
"""
import glob
import io
import json
import logging
import os
import random
import re
from itertools import islice
from typing import Callable, Iterable, Iterator, NamedTuple, Optional, Sequence, Union

import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import IterableDataset, default_collate, get_worker_info

from vlp.data.boxes import BoxedTransform

log = logging.getLogger(__name__)

IMAGE_KEYS = "jpg;png;jpeg;webp"
MAX_CONSECUTIVE_FAILURES = 1000  # past this the data is unreadable, not noisy


class Batch(NamedTuple):
    images: torch.Tensor  # (B, 3, H, W)
    tokens: torch.Tensor  # (B, L)
    labels: torch.Tensor  # (B,) class index from `.cls`, -1 where absent; a task's decoder may give a dict of them
    skipped: int  # samples skipped since the previous batch of this worker
    negative_tokens: Optional[torch.Tensor] = None  # (M, L) hard negative captions of the batch's samples
    negative_index: Optional[torch.Tensor] = None  # (M,) the sample each negative belongs to
    boxes: Optional[torch.Tensor] = None  # (B, R, 4) region boxes (x1, y1, x2, y2) in fractions of the image


def expand_urls(urls: Union[str, Sequence[str]]) -> list[str]:
    """Expands shard specs into a list of shard URLs.

    Accepts a brace pattern (`/d/train-{000000..000099}.tar`), a folder (all `*.tar`
    in it), a glob (`/d/*.tar`), `::`-joined specs, a list of any of these, and URLs
    (`pipe:...`, `s3://...`, `https://...`), which are passed through unchecked.

    Raises:
        FileNotFoundError: a local spec that matches no file, naming the spec.
        ValueError: a folder holding shards of several splits (`train-*` and `val-*`, ...).
    """
    specs = [urls] if isinstance(urls, str) else list(urls)
    out = []
    for spec in specs:
        for part in wds.shardlists.expand_urls(str(spec)):
            out.extend(_expand_local(part))
    if not out:
        raise FileNotFoundError(f"no shards in {urls!r}")
    return out


def _expand_local(spec: str) -> list[str]:
    if "://" in spec or spec.startswith("pipe:"):
        return [spec]
    if os.path.isdir(spec):
        found = sorted(glob.glob(os.path.join(spec, "*.tar")))
        _check_one_split(spec, found)
    elif glob.has_magic(spec):
        found = sorted(glob.glob(spec))
    else:
        found = [spec] if os.path.isfile(spec) else []
    if not found:
        raise FileNotFoundError(f"shard spec {spec!r} matches no file")
    return found


_SPLITS = re.compile(r"^(train|val|valid|validation|test|eval)[-_.]", re.IGNORECASE)


def _check_one_split(folder: str, shards: list[str]) -> None:
    """A folder stands for all its shards: refuse one that mixes splits rather than train on validation data."""
    splits = sorted({m.group(1).lower() for s in shards if (m := _SPLITS.match(os.path.basename(s)))})
    if len(splits) > 1:
        raise ValueError(f"folder {folder!r} holds shards of several splits ({', '.join(splits)}); "
                         f"name them with a pattern, e.g. '{os.path.join(folder, 'train-*.tar')}'")


class SampleDecoder:
    """Raw webdataset sample -> (image tensor, caption, label, hard negative captions, boxes).

    Args:
        transform: PIL image -> (3, H, W) tensor (open_clip's image transform).
        image_key: `;`-separated extensions tried in order.
        caption_key: extension holding the caption.
        label_key: extension holding an integer class index (optional in the data).
        meta_key: extension of a JSON object whose `negatives` (optional) lists captions that are
            false for the image (hard-negative evaluation) and whose `boxes` (optional) lists
            region boxes.
        max_boxes: region boxes per sample (`vlp.data.boxes.BoxedTransform`); 0: boxes are not
            read, and the decoded boxes are None.
    """

    def __init__(self, transform: Callable, image_key=IMAGE_KEYS, caption_key="txt", label_key="cls",
                 meta_key="json", max_boxes: int = 0):
        self.transform = transform
        self.boxed = BoxedTransform(transform, max_boxes) if max_boxes else None
        self.image_keys = image_key.split(";")
        self.caption_key = caption_key
        self.label_key = label_key
        self.meta_key = meta_key

    def __call__(self, sample: dict) -> tuple[torch.Tensor, str, int, list[str], Optional[torch.Tensor]]:
        if self.caption_key not in sample:
            raise KeyError(f"no caption ({self.caption_key}) in sample {sample.get('__key__')}")
        image, boxes = self.image(sample)
        caption = sample[self.caption_key].decode("utf-8")
        label = int(sample[self.label_key]) if self.label_key in sample else -1
        negatives = self._meta(sample).get("negatives", [])
        return image, caption, label, negatives, boxes

    def image(self, sample: dict) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The sample's transformed image (3, H, W) and its boxes (max_boxes, 4), None if not read."""
        image_key = next((k for k in self.image_keys if k in sample), None)
        if image_key is None:
            raise KeyError(f"no image ({';'.join(self.image_keys)}) in sample {sample.get('__key__')}")
        with Image.open(io.BytesIO(sample[image_key])) as image:
            if self.boxed is None:
                return self.transform(image.convert("RGB")), None
            return self.boxed(image.convert("RGB"), self._boxes(sample))

    def _meta(self, sample: dict) -> dict:
        return json.loads(sample[self.meta_key]) if self.meta_key in sample else {}

    def _boxes(self, sample: dict) -> list:
        boxes = self._meta(sample).get("boxes", [])
        if not all(len(box) == 4 and 0 <= box[0] < box[2] <= 1 and 0 <= box[1] < box[3] <= 1 for box in boxes):
            raise ValueError(f"sample {sample.get('__key__')}: `boxes` must be [x1, y1, x2, y2] lists in "
                             f"fractions of the image, x1 < x2 and y1 < y2; got {boxes}")
        return boxes


class _FailureCounter:
    """Counts skipped samples in one worker; webdataset calls it as an error handler."""

    def __init__(self):
        self.pending = 0  # not yet reported with a batch
        self.consecutive = 0

    def __call__(self, exn: Exception) -> bool:
        self.pending += 1
        self.consecutive += 1
        if self.pending <= 3:
            log.warning("skipping unreadable data: %r", exn)
        if self.consecutive > MAX_CONSECUTIVE_FAILURES:
            raise RuntimeError(f"{self.consecutive} consecutive unreadable samples; last: {exn!r}") from exn
        return True  # continue with the next sample or shard


def _batches(samples: Iterable[dict], decode: SampleDecoder, tokenizer: Callable, batch_size: int,
             failures: _FailureCounter, partial: bool) -> Iterator[Batch]:
    """Decodes samples (skipping and counting failures) and collates them into batches."""
    decoded = []
    for sample in samples:
        try:
            examples = decode(sample)  # one example, or a list of them (e.g. one per question)
        except Exception as exn:  # a bad sample is skipped and counted, never fatal
            failures(exn)
            continue
        failures.consecutive = 0
        for example in examples if isinstance(examples, list) else [examples]:
            decoded.append(example)
            if len(decoded) == batch_size:
                yield _collate(decoded, tokenizer, failures)
                decoded = []
    if partial and decoded:
        yield _collate(decoded, tokenizer, failures)


def _collate(decoded, tokenizer, failures) -> Batch:
    skipped, failures.pending = failures.pending, 0
    images, captions, labels, negatives, boxes = zip(*decoded)
    batch = Batch(torch.stack(images), tokenizer(list(captions)), default_collate(list(labels)), skipped,
                  boxes=None if boxes[0] is None else torch.stack(boxes))
    owners = [i for i, captions in enumerate(negatives) for _ in captions]
    if not owners:
        return batch
    negative_captions = [caption for captions in negatives for caption in captions]
    return batch._replace(negative_tokens=tokenizer(negative_captions), negative_index=torch.tensor(owners))


def _worker_info() -> tuple[int, int, int, int]:
    """(rank, world size, worker, number of workers) of the calling process."""
    rank, world, _, _ = wds.utils.pytorch_worker_info()
    info = get_worker_info()
    return rank, world, (info.id if info else 0), (info.num_workers if info else 1)


class TrainStream(IterableDataset):
    """Exactly `num_batches` training batches per epoch from an endless shard stream.

    Args:
        urls: shard URLs (see `expand_urls`).
        decode: sample decoder.
        tokenizer: list of captions -> (B, L) tokens.
        batch_size: per-device batch size.
        num_batches: batches per epoch on this rank (the same on every rank).
        resampled: draw shards with replacement (every rank sees all shards); otherwise
            each rank and worker cycles over its own disjoint slice of the shards,
            which needs at least `world size x workers` shards.
        shuffle_buffer: samples held for shuffling across shards.
        seed: base seed; the stream also depends on rank, worker, epoch and start step.
    """

    def __init__(self, urls: list[str], decode: SampleDecoder, tokenizer: Callable, batch_size: int,
                 num_batches: int, resampled: bool = True, shuffle_buffer: int = 1000, seed: int = 0):
        super().__init__()
        self.urls, self.decode, self.tokenizer = urls, decode, tokenizer
        self.batch_size, self.num_batches = batch_size, num_batches
        self.resampled, self.shuffle_buffer, self.seed = resampled, shuffle_buffer, seed
        self.epoch, self.start_step = 0, 0

    def set_position(self, epoch: int, step: int) -> None:
        """Reseeds for a new epoch or a resumed run (read when DataLoader workers start)."""
        self.epoch, self.start_step = epoch, step

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[Batch]:
        rank, world, worker, workers = _worker_info()
        rng = random.Random(f"{self.seed}-{self.epoch}-{self.start_step}-{rank}-{worker}")
        share = self.num_batches // workers + (worker < self.num_batches % workers)
        failures = _FailureCounter()
        shards = self._shards(rng, rank * workers + worker, world * workers)
        samples = wds.tarfile_to_samples(handler=failures)(shards)
        samples = wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer // 2, rng=rng)(samples)
        yield from islice(_batches(samples, self.decode, self.tokenizer, self.batch_size, failures, False), share)

    def _shards(self, rng: random.Random, slot: int, slots: int) -> Iterator[dict]:
        if self.resampled:
            while True:
                yield dict(url=rng.choice(self.urls))
        mine = self.urls[slot::slots]
        if not mine:
            raise ValueError(f"{len(self.urls)} shards cannot feed {slots} (ranks x workers) readers; "
                             "use resampled=true or fewer workers")
        while True:
            rng.shuffle(mine)
            yield from (dict(url=u) for u in mine)


class EvalStream(IterableDataset):
    """Every sample of the shards exactly once across all ranks and workers.

    With at least as many shards as readers (ranks x workers), each reader reads only its
    own shards. With fewer, workers split the shards and, within each shard, rank r keeps
    samples r, r+W, r+2W, ... so ranks get near-equal shares (every rank reads every shard
    of its worker). Ranks may end with different batch counts: gather results after the
    loop, not per step.
    """

    def __init__(self, urls: list[str], decode: SampleDecoder, tokenizer: Callable, batch_size: int):
        super().__init__()
        self.urls, self.decode, self.tokenizer, self.batch_size = urls, decode, tokenizer, batch_size

    def __iter__(self) -> Iterator[Batch]:
        rank, world, worker, workers = _worker_info()
        failures = _FailureCounter()
        readers = world * workers
        if len(self.urls) >= readers:
            shards = (dict(url=u) for u in self.urls[rank * workers + worker::readers])
            samples = wds.tarfile_to_samples(handler=failures)(shards)
        else:
            shards = (dict(url=u) for u in self.urls[worker::workers])
            samples = _every_nth(wds.tarfile_to_samples(handler=failures)(shards), rank, world)
        yield from _batches(samples, self.decode, self.tokenizer, self.batch_size, failures, True)


def _every_nth(samples: Iterable[dict], offset: int, n: int) -> Iterator[dict]:
    """Keeps samples offset, offset+n, ... of each shard."""
    url, index = None, 0
    for sample in samples:
        if sample["__url__"] != url:
            url, index = sample["__url__"], 0
        if index % n == offset:
            yield sample
        index += 1


def count_samples(urls: list[str]) -> Optional[int]:
    """Number of samples from a `sizes.json` beside the shards (open_clip's convention), if any."""
    folders = {os.path.dirname(u) for u in urls}
    if len(folders) != 1 or not os.path.isfile(path := os.path.join(folders.pop(), "sizes.json")):
        return None
    with open(path) as f:
        sizes = json.load(f)
    names = [os.path.basename(u) for u in urls]
    if not all(n in sizes for n in names):
        return None
    return sum(int(sizes[n]) for n in names)
