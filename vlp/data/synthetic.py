"""Synthetic coloured-shapes image-caption dataset, written as webdataset shards.

Each image shows one or two coloured shapes on a plain neutral background, with a varied
caption naming every object's colour and shape. The "train" split never shows the (colour,
shape) pairs in HELDOUT. In the "val" split, even indices show one HELDOUT object, so zero-shot
accuracy on them measures compositional generalisation; odd indices show two objects in a clear
spatial relation, captioned "a red circle to the left of a blue square." and carrying hard
negative captions in their json (`negatives`: colours swapped, relation reversed, objects
swapped) that a bag of words cannot tell from the truth. Two-object training images carry
negatives too, for objectives that train on them (ITM): their caption with the colours swapped,
with the positions swapped, and with the objects swapped in place, where the caption says where
things are. Two thirds of the two-object training images in a clear relation are captioned with
it, so a fusion sees the relation words often enough to learn them; `relation_captions` puts every
two-object training image in a clear relation and captions it so, with only the relation's false
captions, and `two_objects` sets their share (0.5), for fusions that must learn the relations in
few steps. The "val_seen" split shows one object of a training pair per image: fresh images of
what training saw, the other half of a compositional test (zeroshot.json lists the HELDOUT classes
under "heldout", so metrics can report the two halves apart). Every sample is a pure function of
(seed, split, index), so shard size and sample count never change a sample's content.
"""

import argparse
import io
import json
import math
import os
import re
from contextlib import nullcontext
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image, ImageDraw
from tqdm import tqdm

from vlp.data.synthetic_captions import caption_with_negatives, hard_negatives, relation_caption, relation_of
from vlp.data.synthetic_vqa import questions

SHAPES = ("circle", "square", "triangle", "star")
COLOURS = {
    "red": (220, 30, 30), "orange": (255, 140, 0), "yellow": (245, 220, 0),
    "green": (30, 160, 50), "cyan": (0, 200, 220), "blue": (30, 70, 230),
    "purple": (140, 40, 200), "pink": (255, 110, 190),
}
CLASSNAMES = [f"{colour} {shape}" for colour in COLOURS for shape in SHAPES]
# Each colour once and each shape twice, so every attribute is still seen in training.
HELDOUT = (("red", "circle"), ("orange", "square"), ("yellow", "triangle"), ("green", "star"),
           ("cyan", "triangle"), ("blue", "star"), ("purple", "circle"), ("pink", "square"))
# No article directly before "{}", so prompts stay grammatical for "orange ...".
TEMPLATES = ("a photo of one {}.", "a picture of a single {}.", "an image showing one {}.",
             "one {} on a plain background.", "a single {}.", "an image of one {}.")
BACKGROUNDS = {"white": 240, "light grey": 190, "dark grey": 70, "black": 20}
SIZES = {"small": 0.12, "medium": 0.17, "large": 0.23}  # circumradius / image side
SPLITS = {"train": 0, "val": 1, "val_seen": 2}

# Bump whenever rendering or captions change, so cached datasets get regenerated.
# 8: relation_captions without colours-swapped negatives; 7: more relation captions,
# objects-swapped training negatives; 6: boxes as a list
_VERSION = 8
_SUPERSAMPLE = 4
_MIN_IMAGE_SIZE = 16
_HELDOUT_IDS = [CLASSNAMES.index(f"{c} {s}") for c, s in HELDOUT]
_TRAIN_IDS = [i for i in range(len(CLASSNAMES)) if i not in _HELDOUT_IDS]
# Polygon vertex radii (relative to the circumradius) and first vertex angle in degrees.
_VERTICES = {"square": ([1.0] * 4, 45), "triangle": ([1.0] * 3, -90),
             "star": ([1.0, 0.45] * 5, -90)}


def _position_name(x, y):
    """Coarse 3x3-grid name of a point in normalised coordinates, e.g. "top left"."""
    row = ("top", "", "bottom")[min(int(y * 3), 2)]
    col = ("left", "", "right")[min(int(x * 3), 2)]
    return f"{row} {col}".strip() or "center"


def _sample_objects(rng, class_ids):
    """Samples size, position and rotation per class, resampling until objects don't overlap."""
    while True:
        objects = []
        for cid in class_ids:
            size = list(SIZES)[rng.integers(len(SIZES))]
            radius = SIZES[size] * rng.uniform(0.9, 1.1)
            x, y = rng.uniform(radius + 0.02, 1 - radius - 0.02, size=2)
            jitter = rng.integers(-12, 13, size=3)
            colour, shape = CLASSNAMES[cid].split()
            objects.append({
                "colour": colour, "shape": shape, "size": size,
                "position": _position_name(x, y), "class": int(cid),
                "x": x, "y": y, "radius": radius, "angle": rng.uniform(-20, 20),
                "rgb": tuple(int(v) for v in np.clip(np.add(COLOURS[colour], jitter), 0, 255)),
            })
        # Disjoint circumcircles guarantee the shapes themselves never overlap.
        a, b = objects[0], objects[-1]
        if a is b or math.dist((a["x"], a["y"]), (b["x"], b["y"])) >= a["radius"] + b["radius"]:
            return objects


def _render(objects, background, image_size):
    """Draws at _SUPERSAMPLE x resolution and downsamples with LANCZOS for anti-aliasing."""
    side = image_size * _SUPERSAMPLE
    image = Image.new("RGB", (side, side), background)
    draw = ImageDraw.Draw(image)
    for obj in objects:
        cx, cy, radius = obj["x"] * side, obj["y"] * side, obj["radius"] * side
        if obj["shape"] == "circle":
            r = 0.9 * radius  # a full-circumradius disc would look much bigger than the others
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=obj["rgb"])
        else:
            radii, start = _VERTICES[obj["shape"]]
            angles = np.radians(start + obj["angle"] + np.arange(len(radii)) * 360 / len(radii))
            points = zip(cx + radius * np.cos(angles) * radii, cy + radius * np.sin(angles) * radii)
            draw.polygon(list(points), fill=obj["rgb"])
    # reducing_gap box-filters 2x first: about twice as fast, visually identical.
    return image.resize((image_size, image_size), Image.Resampling.LANCZOS, reducing_gap=2.0)


def _box(obj):
    """[x1, y1, x2, y2] of the square around an object's circumcircle, in fractions of the image side."""
    x, y, r = obj["x"], obj["y"], obj["radius"]
    return [round(float(v), 4) for v in (x - r, y - r, x + r, y + r)]


def _two_object_val(rng):
    """Two objects of different colours and shapes in a clear relation, for hard negatives."""
    while True:
        first, second = rng.choice(_TRAIN_IDS, size=2, replace=False)
        colours, shapes = zip(*(CLASSNAMES[i].split() for i in (first, second)))
        if len(set(colours)) == 2 and len(set(shapes)) == 2:
            objects = _sample_objects(rng, [first, second])
            if relation_of(*objects):
                return objects


def render_sample(seed, split, index, image_size=64, *, two_objects=0.5, relation_captions=False):
    """Renders one sample; a pure function of (seed, split, index).

    Layout and caption do not depend on image_size, only the pixel resolution does.

    Args:
        seed: Non-negative dataset seed.
        split: "train" (1-2 objects, never a HELDOUT pair), "val" (even index: one HELDOUT
            object; odd index: two seen objects with hard negative captions) or "val_seen" (one
            object of a training pair).
        index: Non-negative sample index within the split.
        image_size: Output width and height in pixels.
        two_objects: Share of "train" images with two objects.
        relation_captions: Place the two objects of every "train" image in a clear spatial
            relation and caption them with it, false captions only relation reversed and objects
            swapped (else at random, and two thirds of those in a clear relation are captioned
            with it). The other splits do not depend on either.

    Returns:
        (image, caption, meta): an RGB PIL image, the caption, and metadata
        {"objects": [{"colour", "shape", "size", "position", "class", "box"}, ...], "background"},
        where "box" is [x1, y1, x2, y2] in fractions of the image side: the square around the
        object's circumcircle, which holds the whole shape (what a detector's box would give),
        "boxes": the same boxes as a list (the field region-token fusions read), and, for
        two-object val samples, "negatives": [caption, ...].

    Raises:
        ValueError: On an unknown split or a two_objects outside [0, 1].
    """
    _check_split(split)
    _check_share(two_objects)
    rng = np.random.default_rng([seed, SPLITS[split], index])
    negatives = None
    if split == "train":
        ids = rng.choice(_TRAIN_IDS, size=1 + int(rng.random() < two_objects), replace=False)
        objects = _sample_objects(rng, ids)
        while relation_captions and len(objects) == 2 and not relation_of(*objects):
            objects = _sample_objects(rng, ids)
    elif split == "val_seen":
        objects = _sample_objects(rng, [_TRAIN_IDS[index % len(_TRAIN_IDS)]])  # balanced classes
    elif index % 2 == 0:
        objects = _sample_objects(rng, [_HELDOUT_IDS[index // 2 % len(_HELDOUT_IDS)]])  # balanced classes
    else:
        objects = _two_object_val(rng)
        negatives = hard_negatives(*objects, relation_of(*objects))
    background = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    grey = BACKGROUNDS[background] + int(rng.integers(-8, 9))
    image = _render(objects, (grey,) * 3, image_size)
    if negatives is None:
        caption, negatives = caption_with_negatives(rng, objects, background, relation_captions)
    else:
        caption = relation_caption(*objects, relation_of(*objects))
    public = ("colour", "shape", "size", "position", "class")
    meta = {"objects": [{k: o[k] for k in public} | {"box": _box(o)} for o in objects], "background": background}
    meta["boxes"] = [o["box"] for o in meta["objects"]]  # the region boxes vlp.data.boxes reads
    meta["qa"] = questions(objects, relation_of)  # VQA: vlp.tasks.vqa_data reads it
    if negatives:
        meta["negatives"] = negatives
    return image, caption, meta


def _write_shard(job):
    """Writes samples [start, stop) of a split to one shard; returns the sample count."""
    path, split, start, stop, seed, image_size, mix = job
    tmp = f"{path}.tmp"  # renamed on success, so a crash never leaves a truncated shard
    with wds.TarWriter(tmp, encoder=False, mtime=0) as sink:  # fixed mtime: reproducible tars
        for index in range(start, stop):
            image, caption, meta = render_sample(seed, split, index, image_size, **mix)
            png = io.BytesIO()
            image.save(png, format="PNG")
            sample = {"__key__": f"{split}_{index:08d}", "png": png.getvalue(),
                      "txt": caption.encode(), "json": json.dumps(meta).encode()}
            if len(meta["objects"]) == 1:
                sample["cls"] = str(meta["objects"][0]["class"]).encode()
            sink.write(sample)
    os.replace(tmp, path)
    return stop - start


def _check_split(split):
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")


def _check_share(two_objects):
    if not 0 <= two_objects <= 1:
        raise ValueError(f"two_objects is a share of the training images, in [0, 1]; got {two_objects}")


def _check_sizes(num_samples, samples_per_shard, image_size):
    if num_samples < 1 or samples_per_shard < 1:
        raise ValueError("sample counts and samples_per_shard must be positive")
    if image_size < _MIN_IMAGE_SIZE:
        raise ValueError(f"image_size must be at least {_MIN_IMAGE_SIZE}")


def write_split(out_dir, split, num_samples, *, seed=0, samples_per_shard=1000, image_size=64,
                two_objects=0.5, relation_captions=False, workers=None, progress=False):
    """Renders a split into shards "{split}-000000.tar", ... in out_dir.

    Stale shards of the same split beyond the new shard count are deleted, and so is
    manifest.json, which no longer describes the folder's contents.

    Args:
        out_dir: Output folder, created if missing.
        split: "train", "val" or "val_seen".
        num_samples: Number of samples, indices 0..num_samples-1.
        seed: Dataset seed.
        samples_per_shard: Samples per shard; the last shard may be shorter.
        image_size: Image width and height in pixels.
        two_objects, relation_captions: The training images' mix, as in render_sample.
        workers: Processes to render with; defaults to the CPU count (at most one per shard).
            The output does not depend on it.
        progress: Show a tqdm progress bar.

    Returns:
        The shard paths written, in order.

    Raises:
        ValueError: On an unknown split, non-positive sizes or a two_objects outside [0, 1].
    """
    _check_split(split)
    _check_sizes(num_samples, samples_per_shard, image_size)
    _check_share(two_objects)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "manifest.json").unlink(missing_ok=True)  # also keeps a crashed rewrite incomplete
    paths = [str(out / f"{split}-{i:06d}.tar")
             for i in range(math.ceil(num_samples / samples_per_shard))]
    for old in out.glob(f"{split}-*.tar"):
        if re.fullmatch(rf"{split}-\d{{6}}\.tar", old.name) and str(old) not in paths:
            old.unlink()
    jobs = [(path, split, i * samples_per_shard, min((i + 1) * samples_per_shard, num_samples),
             seed, image_size, {"two_objects": two_objects, "relation_captions": relation_captions})
            for i, path in enumerate(paths)]
    workers = min(len(jobs), workers or os.cpu_count() or 1)
    with tqdm(total=num_samples, desc=split, unit="img", disable=not progress) as bar, \
            (Pool(workers) if workers > 1 else nullcontext()) as pool:
        for count in (pool.imap_unordered(_write_shard, jobs) if pool else map(_write_shard, jobs)):
            bar.update(count)
    return paths


def write_dataset(out_dir, *, train_samples=20000, val_samples=512, val_seen_samples=256, seed=0,
                  samples_per_shard=1000, image_size=64, two_objects=0.5, relation_captions=False,
                  workers=None, progress=False):
    """Writes the three splits, zeroshot.json, sizes.json and manifest.json; skips work if already complete.

    Args:
        out_dir: Output folder, created if missing.
        train_samples: Number of train samples.
        val_samples: Number of val samples.
        val_seen_samples: Number of val_seen samples.
        seed, samples_per_shard, image_size, two_objects, relation_captions, workers, progress: As
            in write_split.

    Returns:
        Brace-expandable shard patterns, e.g. {"train": "<out>/train-{000000..000019}.tar",
        "val": "<out>/val-{000000..000000}.tar", "val_seen": ...}.

    Raises:
        ValueError: On non-positive sizes or a two_objects outside [0, 1].
    """
    counts = {"train": train_samples, "val": val_samples, "val_seen": val_seen_samples}
    for n in counts.values():
        _check_sizes(n, samples_per_shard, image_size)
    out = Path(out_dir)
    num_shards = {split: math.ceil(n / samples_per_shard) for split, n in counts.items()}
    shards = {split: f"{split}-{{000000..{n - 1:06d}}}.tar" for split, n in num_shards.items()}
    manifest = {"version": _VERSION, "seed": seed, "train_samples": train_samples,
                "val_samples": val_samples, "val_seen_samples": val_seen_samples,
                "samples_per_shard": samples_per_shard, "image_size": image_size,
                "two_objects": two_objects, "relation_captions": relation_captions, "shards": shards}
    manifest_path = out / "manifest.json"
    complete = manifest_path.is_file() and json.loads(manifest_path.read_text()) == manifest
    if not (complete and (out / "sizes.json").is_file() and all((out / f"{split}-{i:06d}.tar").is_file()
                                                              for split, n in num_shards.items() for i in range(n))):
        for split, n in counts.items():
            write_split(out, split, n, seed=seed, samples_per_shard=samples_per_shard, image_size=image_size,
                        two_objects=two_objects, relation_captions=relation_captions, workers=workers,
                        progress=progress)
        zeroshot = {"classnames": CLASSNAMES, "templates": list(TEMPLATES),
                    "heldout": [f"{colour} {shape}" for colour, shape in HELDOUT]}
        (out / "zeroshot.json").write_text(json.dumps(zeroshot, indent=2))
        # samples per shard, open_clip's convention: data=wds reads an epoch's size from it
        sizes = {f"{split}-{i:06d}.tar": min(samples_per_shard, n - i * samples_per_shard)
                 for split, n in counts.items() for i in range(num_shards[split])}
        (out / "sizes.json").write_text(json.dumps(sizes, indent=2))
        manifest_path.write_text(json.dumps(manifest, indent=2))
    return {split: str(out / pattern) for split, pattern in shards.items()}


def _int_at_least(minimum):
    def parse(text):
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {value}")
        return value
    parse.__name__ = "integer"  # argparse names the type in "invalid integer value" errors
    return parse


def _share(text):
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be a share in [0, 1], got {value}")
    return value


_share.__name__ = "share"  # argparse names the type in "invalid share value" errors


def main(argv=None):
    """CLI entry point `vlp-synthetic`: writes the dataset and prints its shard patterns."""
    parser = argparse.ArgumentParser(prog="vlp-synthetic", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output folder")
    for flag, minimum, default in [("--train-samples", 1, 20000), ("--val-samples", 1, 512),
                                   ("--val-seen-samples", 1, 256),
                                   ("--seed", 0, 0), ("--samples-per-shard", 1, 1000),
                                   ("--image-size", _MIN_IMAGE_SIZE, 64)]:
        parser.add_argument(flag, type=_int_at_least(minimum), default=default,
                            help="default: %(default)s")
    parser.add_argument("--two-objects", type=_share, default=0.5,
                        help="share of training images with two objects (default: %(default)s)")
    parser.add_argument("--relation-captions", action="store_true",
                        help="every two-object training image in a clear spatial relation, captioned with "
                             "it, with only the relation's false captions")
    parser.add_argument("--workers", type=_int_at_least(1),
                        help="rendering processes (default: CPU count)")
    args = parser.parse_args(argv)
    patterns = write_dataset(args.out, train_samples=args.train_samples,
                             val_samples=args.val_samples, val_seen_samples=args.val_seen_samples,
                             seed=args.seed,
                             samples_per_shard=args.samples_per_shard,
                             image_size=args.image_size, two_objects=args.two_objects,
                             relation_captions=args.relation_captions, workers=args.workers, progress=True)
    for split, pattern in patterns.items():
        print(f"{split}: {pattern}")


if __name__ == "__main__":
    main()
