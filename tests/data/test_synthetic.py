"""Tests for the synthetic coloured-shapes dataset (vlp.data.synthetic)."""

import io
import json
import re
from collections import Counter

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from vlp.data import synthetic
from vlp.data.wds import count_samples, expand_urls
from vlp.data.synthetic import (
    CLASSNAMES, COLOURS, HELDOUT, SHAPES, TEMPLATES, main, render_sample, write_dataset,
    write_split,
)

ROWS = {"top": 0, "bottom": 2}
COLS = {"left": 0, "right": 2}


def _png(image):
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _words(caption):
    return set(re.findall(r"[a-z]+", caption))


def _grid_cell(position):
    """(row, col) of a position name such as "top left", "right" or "center"."""
    words = position.split()
    return (next((ROWS[w] for w in words if w in ROWS), 1),
            next((COLS[w] for w in words if w in COLS), 1))


def _object_mask(pixels):
    """Pixels clearly differing from the background, sampled at a corner no object reaches."""
    diff = np.abs(pixels - pixels[0, 0]).max(axis=-1)
    return diff > 0.5 * diff.max()


@pytest.fixture(scope="module")
def train_samples():
    return [render_sample(0, "train", i) for i in range(300)]


@pytest.fixture(scope="module")
def val_samples():
    return [render_sample(0, "val", i) for i in range(48)]


def test_heldout_pairs_each_colour_once_and_each_shape_twice():
    assert len(set(HELDOUT)) == 8
    assert Counter(c for c, _ in HELDOUT) == {c: 1 for c in COLOURS}
    assert Counter(s for _, s in HELDOUT) == {s: 2 for s in SHAPES}


def test_classnames_are_colour_major_and_templates_have_one_slot():
    assert len(SHAPES) == 4 and len(COLOURS) == 8 and len(set(CLASSNAMES)) == 32
    for ci, colour in enumerate(COLOURS):
        for si, shape in enumerate(SHAPES):
            assert CLASSNAMES[ci * len(SHAPES) + si] == f"{colour} {shape}"
    assert 5 <= len(TEMPLATES) <= 8 and all(t.count("{}") == 1 for t in TEMPLATES)


def test_render_is_deterministic_per_seed_split_index():
    image, caption, meta = render_sample(3, "train", 17)
    again = render_sample(3, "train", 17)
    assert _png(image) == _png(again[0]) and (caption, meta) == again[1:]
    for other in [(3, "train", 18), (4, "train", 17), (3, "val", 17)]:
        assert _png(render_sample(*other)[0]) != _png(image), other


def test_image_size_changes_only_the_resolution():
    small, large = render_sample(0, "train", 5, image_size=32), render_sample(0, "train", 5)
    assert small[0].size == (32, 32) and large[0].size == (64, 64) and large[0].mode == "RGB"
    assert small[1:] == large[1:]


def test_train_never_shows_heldout_pairs(train_samples):
    counts = Counter(len(meta["objects"]) for _, _, meta in train_samples)
    assert set(counts) == {1, 2} and 100 < counts[1] < 200
    seen = set()
    for _, _, meta in train_samples:
        classes = [o["class"] for o in meta["objects"]]
        assert len(set(classes)) == len(classes)
        for obj in meta["objects"]:
            assert (obj["colour"], obj["shape"]) not in HELDOUT
            assert CLASSNAMES[obj["class"]] == f"{obj['colour']} {obj['shape']}"
            seen.add(obj["class"])
    assert len(seen) == 32 - len(HELDOUT)


def test_val_even_indices_show_exactly_one_heldout_object(val_samples):
    classes = Counter()
    for _, _, meta in val_samples[::2]:
        (obj,) = meta["objects"]
        assert (obj["colour"], obj["shape"]) in HELDOUT and "negatives" not in meta
        assert CLASSNAMES[obj["class"]] == f"{obj['colour']} {obj['shape']}"
        classes[obj["class"]] += 1
    assert len(classes) == 8 and set(classes.values()) == {3}  # balanced


def test_val_seen_shows_one_object_of_each_training_pair_in_new_images(train_samples):
    samples = [render_sample(0, "val_seen", i) for i in range(48)]
    classes = Counter()
    for _, caption, meta in samples:
        (obj,) = meta["objects"]
        assert (obj["colour"], obj["shape"]) not in HELDOUT
        assert {obj["colour"], obj["shape"]} <= _words(caption)
        classes[obj["class"]] += 1
    assert len(classes) == 32 - len(HELDOUT) and set(classes.values()) == {2}  # balanced
    training_pixels = {np.asarray(image).tobytes() for image, _, _ in train_samples}
    assert not any(np.asarray(image).tobytes() in training_pixels for image, _, _ in samples)


def test_val_odd_indices_carry_hard_negatives_with_the_same_words(val_samples):
    for _, caption, meta in val_samples[1::2]:
        a, b = meta["objects"]
        assert a["colour"] != b["colour"] and a["shape"] != b["shape"]
        negatives = meta["negatives"]
        assert len(negatives) == 3 and caption not in negatives and len(set(negatives)) == 3
        colour_swap, reversed_relation, objects_swapped = negatives
        words = sorted(_words(caption))
        assert sorted(_words(colour_swap)) == words and sorted(_words(objects_swapped)) == words  # same bag

        assert reversed_relation != caption


def test_two_object_training_captions_carry_false_captions_with_the_same_words(train_samples):
    with_negatives = 0
    for _, caption, meta in train_samples:
        for negative in meta.get("negatives") or []:
            assert len(meta["objects"]) == 2 and negative != caption
            names = set(COLOURS) | set(SHAPES)
            assert _words(negative) & names == _words(caption) & names  # only who is what, or where, changed
            with_negatives += 1
    assert with_negatives > 50


def test_relation_captions_train_with_the_relation_reversed_and_the_objects_swapped(train_samples):
    colour, shape = "|".join(COLOURS), "|".join(SHAPES)
    relation = re.compile(rf"({colour}) ({shape}) (to the left of|to the right of|above|below) "
                          rf"\w+(?: \w+)*? ({colour}) ({shape})\.")
    opposite = {"to the left of": "to the right of", "to the right of": "to the left of",
                "above": "below", "below": "above"}
    stated = clear = 0
    for _, caption, meta in train_samples:
        if len(meta["boxes"]) == 2:
            (ax, ay), (bx, by) = (((x1 + x2) / 2, (y1 + y2) / 2) for x1, y1, x2, y2 in meta["boxes"])
            clear += max(abs(ax - bx), abs(ay - by)) >= 2 * min(abs(ax - bx), abs(ay - by))
        match = relation.search(caption)
        if not match:
            continue
        stated += 1
        first, rel, second = match.group(1, 2), match.group(3), match.group(4, 5)
        found = {m.group(1, 2, 3, 4, 5) for m in map(relation.search, meta["negatives"]) if m}
        assert (*first, opposite[rel], *second) in found, (caption, meta["negatives"])  # relation reversed
        assert (*second, rel, *first) in found, (caption, meta["negatives"])  # objects swapped
    assert stated > 0.5 * clear  # two thirds of those in a clear relation (a third before version 7)


def test_relation_captions_put_every_two_object_training_image_in_a_stated_relation():
    """The mix experiment=fusion_synthetic trains on: far more relation pairs, the same validation."""
    colour, shape = "|".join(COLOURS), "|".join(SHAPES)
    relation = re.compile(rf"^(?:an?|one) .*({colour}) ({shape}) (to the left of|to the right of|above|below) "
                          rf"\w+(?: \w+)*? ({colour}) ({shape})\.$")
    mix = dict(two_objects=0.8, relation_captions=True)
    samples = [render_sample(0, "train", i, 32, **mix) for i in range(200)]
    two = [(caption, meta) for _, caption, meta in samples if len(meta["objects"]) == 2]
    assert 0.7 < len(two) / len(samples) < 0.9
    for caption, meta in two:
        true = relation.match(caption)
        assert true, caption  # stated, and test_spatial_relations_... checks it is true
        assert len(meta["negatives"]) == 2, meta["negatives"]  # relation reversed, objects swapped
        for negative in meta["negatives"]:  # the same coloured shapes: no colours swapped
            false = relation.match(negative)
            assert {false.group(1, 2), false.group(4, 5)} == {true.group(1, 2), true.group(4, 5)}, negative
    default = [render_sample(0, "train", i, 32)[1] for i in range(200)]
    assert sum(map(bool, map(relation.match, default))) < 0.3 * len(two)  # ~12 in 64 against ~52
    for index in (0, 1, 7):  # the validation splits do not depend on the mix
        for split in ("val", "val_seen"):
            image, caption, meta = render_sample(0, split, index, 32, **mix)
            plain = render_sample(0, split, index, 32)
            assert (_png(image), caption, meta) == (_png(plain[0]), plain[1], plain[2])


def test_captions_name_every_object_and_vary(train_samples, val_samples):
    captions = []
    for _, caption, meta in train_samples + val_samples:
        for obj in meta["objects"]:
            assert {obj["colour"], obj["shape"]} <= _words(caption), (caption, meta)
        captions.append(caption)
    assert len(set(captions)) > 0.9 * len(captions)
    words = Counter(w for c in captions for w in _words(c))
    for word in ["small", "large", "left", "center", "two", "background"]:
        assert words[word] > 3, word


def test_spatial_relations_in_captions_are_true(train_samples, val_samples):
    colour, shape = "|".join(COLOURS), "|".join(SHAPES)
    pattern = re.compile(rf"({colour}) ({shape}) (to the left of|to the right of|above|below) "
                         rf"\w+(?: \w+)*? ({colour}) ({shape})\.")
    checked = 0
    for _, caption, meta in train_samples + val_samples:
        match = pattern.search(caption)
        if not match:
            continue
        by_name = {(o["colour"], o["shape"]): _grid_cell(o["position"]) for o in meta["objects"]}
        (ra, ca), (rb, cb) = by_name[match.group(1, 2)], by_name[match.group(4, 5)]
        relation = match.group(3)
        assert {"to the left of": ca <= cb, "to the right of": ca >= cb,
                "above": ra <= rb, "below": ra >= rb}[relation], (caption, meta)
        checked += 1
    assert checked >= 10


@pytest.mark.parametrize("split", ["train", "val"])
def test_shards_round_trip_through_webdataset(tmp_path, split):
    paths = write_split(tmp_path, split, 25, seed=1, samples_per_shard=10, image_size=32,
                        workers=1)
    assert [p.rsplit("/", 1)[-1] for p in paths] == [f"{split}-00000{i}.tar" for i in range(3)]
    dataset = wds.WebDataset(str(tmp_path / f"{split}-{{000000..000002}}.tar"),
                             shardshuffle=False).decode("pil")
    samples = list(dataset)
    assert [s["__key__"] for s in samples] == [f"{split}_{i:08d}" for i in range(25)]
    for i, sample in enumerate(samples):
        image, caption, meta = render_sample(1, split, i, image_size=32)
        assert sample["png"].size == (32, 32)
        assert np.array_equal(np.asarray(sample["png"]), np.asarray(image))
        assert sample["txt"] == caption and sample["json"] == meta
        if len(meta["objects"]) == 1:
            assert sample["cls"] == meta["objects"][0]["class"]
        else:
            assert "cls" not in sample


def test_shards_do_not_depend_on_shard_size_or_workers(tmp_path):
    def read(folder):
        shards = sorted(str(p) for p in folder.glob("*.tar"))
        dataset = wds.WebDataset(shards, shardshuffle=False)
        return {s["__key__"]: (s["png"], s["txt"]) for s in dataset}

    write_split(tmp_path / "a", "train", 12, samples_per_shard=5, image_size=32, workers=2)
    write_split(tmp_path / "b", "train", 12, samples_per_shard=12, image_size=32, workers=1)
    write_split(tmp_path / "c", "train", 12, samples_per_shard=5, image_size=32, workers=1)
    assert len(read(tmp_path / "a")) == 12 and read(tmp_path / "a") == read(tmp_path / "b")
    for name in ["train-000000.tar", "train-000002.tar"]:  # byte-identical, mtimes included
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "c" / name).read_bytes()


def test_write_dataset_skips_complete_dataset_and_removes_stale_shards(tmp_path, monkeypatch):
    kwargs = dict(val_samples=8, val_seen_samples=4, samples_per_shard=20, image_size=32, workers=1)
    patterns = write_dataset(tmp_path, train_samples=30, **kwargs)
    assert patterns == {"train": f"{tmp_path}/train-{{000000..000001}}.tar",
                        "val": f"{tmp_path}/val-{{000000..000000}}.tar",
                        "val_seen": f"{tmp_path}/val_seen-{{000000..000000}}.tar"}
    zeroshot = json.loads((tmp_path / "zeroshot.json").read_text())
    assert zeroshot == {"classnames": CLASSNAMES, "templates": list(TEMPLATES),
                        "heldout": [f"{c} {s}" for c, s in HELDOUT]}

    def fail(job):
        raise AssertionError(f"rewrote {job[0]}")

    with monkeypatch.context() as patch:
        patch.setattr(synthetic, "_write_shard", fail)
        assert write_dataset(tmp_path, train_samples=30, **kwargs) == patterns
        (tmp_path / "val-000000.tar").unlink()  # incomplete: must be rewritten
        with pytest.raises(AssertionError, match="rewrote"):
            write_dataset(tmp_path, train_samples=30, **kwargs)
    assert not (tmp_path / "manifest.json").exists()
    write_dataset(tmp_path, train_samples=10, **kwargs)
    assert sorted(p.name for p in tmp_path.glob("*.tar")) == ["train-000000.tar", "val-000000.tar",
                                                              "val_seen-000000.tar"]


def test_write_dataset_writes_sizes_json_that_data_wds_reads(tmp_path):
    write_dataset(tmp_path, train_samples=30, val_samples=8, val_seen_samples=4, samples_per_shard=20,
                  image_size=32, workers=1)
    sizes = json.loads((tmp_path / "sizes.json").read_text())
    assert sizes == {"train-000000.tar": 20, "train-000001.tar": 10, "val-000000.tar": 8,
                     "val_seen-000000.tar": 4}
    for shard, size in sizes.items():  # the counts are the shards' real sample counts
        assert sum(1 for _ in wds.WebDataset(str(tmp_path / shard), shardshuffle=False)) == size
    assert count_samples(expand_urls(str(tmp_path / "train-*.tar"))) == 30


def test_cli_writes_dataset_and_reruns_quickly(tmp_path, capsys, monkeypatch):
    argv = ["--out", str(tmp_path), "--train-samples", "12", "--val-samples", "8", "--val-seen-samples", "4",
            "--samples-per-shard", "10", "--image-size", "32", "--workers", "1"]
    main(argv)
    out = capsys.readouterr().out
    assert f"train: {tmp_path}/train-{{000000..000001}}.tar" in out
    assert f"val: {tmp_path}/val-{{000000..000000}}.tar" in out
    assert f"val_seen: {tmp_path}/val_seen-{{000000..000000}}.tar" in out
    assert json.loads((tmp_path / "zeroshot.json").read_text())["classnames"] == CLASSNAMES
    monkeypatch.setattr(synthetic, "_write_shard", lambda job: pytest.fail("not skipped"))
    main(argv)
    assert "train-{000000..000001}" in capsys.readouterr().out
    monkeypatch.undo()
    main([*argv, "--two-objects", "1", "--relation-captions"])  # another mix: written again
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["two_objects"] == 1.0 and manifest["relation_captions"] is True
    with wds.WebDataset(str(tmp_path / "train-000000.tar"), shardshuffle=False) as shard:
        assert all(len(json.loads(sample["json"])["objects"]) == 2 for sample in shard)


@pytest.mark.parametrize("args, message", [
    (["--train-samples", "0"], "--train-samples: must be an integer >= 1"),
    (["--val-samples", "-3"], "--val-samples: must be an integer >= 1"),
    (["--val-seen-samples", "0"], "--val-seen-samples: must be an integer >= 1"),
    (["--samples-per-shard", "0"], "--samples-per-shard"),
    (["--seed", "x"], "--seed: invalid integer value"),
    (["--image-size", "4"], "--image-size: must be an integer >= 16"),
    (["--two-objects", "1.5"], "--two-objects: must be a share in [0, 1], got 1.5"),
    (["--two-objects", "half"], "--two-objects: invalid share value: 'half'"),
    (["--split", "test"], "unrecognized arguments"),
])
def test_cli_rejects_bad_arguments(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exc:
        main(["--out", str(tmp_path / "out"), *args])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_functions_reject_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="unknown split 'test'"):
        render_sample(0, "test", 0)
    with pytest.raises(ValueError, match="unknown split"):
        write_split(tmp_path, "test", 10)
    with pytest.raises(ValueError, match="positive"):
        write_dataset(tmp_path, train_samples=0)
    with pytest.raises(ValueError, match=r"two_objects is a share of the training images, in \[0, 1\]; got -0.1"):
        write_dataset(tmp_path, two_objects=-0.1)
    assert not any(tmp_path.iterdir())


def test_colours_and_shapes_are_learnable_from_pixels(train_samples):
    """Nearest-centroid classifiers on crude pixel features separate colour and shape."""
    colours, shape_crops, colour_ids, shape_ids = [], [], [], []
    for image, _, meta in train_samples:
        if len(meta["objects"]) != 1:
            continue
        obj, pixels = meta["objects"][0], np.asarray(image, dtype=float)
        mask = _object_mask(pixels)
        ys, xs = np.nonzero(mask)
        crop = Image.fromarray(mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1])
        shape_crops.append(np.asarray(crop.convert("L").resize((16, 16)), dtype=float).ravel())
        colours.append(pixels[mask].mean(axis=0))
        colour_ids.append(list(COLOURS).index(obj["colour"]))
        shape_ids.append(SHAPES.index(obj["shape"]))
    for features, labels, classes in [(colours, colour_ids, 8), (shape_crops, shape_ids, 4)]:
        x, y = np.stack(features), np.array(labels)
        half = len(y) // 2
        centroids = np.stack([x[:half][y[:half] == k].mean(axis=0) for k in range(classes)])
        predicted = ((x[half:, None] - centroids) ** 2).sum(axis=-1).argmin(axis=1)
        assert (predicted == y[half:]).mean() > 0.9
    # Object colours stay saturated, hence distinct from the grey backgrounds.
    assert min(c.max() - c.min() for c in colours) > 80


def test_each_objects_box_holds_it_closely(train_samples):
    """The json's box of a single object contains every pixel of it, and the shape fills it."""
    checked = 0
    for image, _, meta in train_samples:
        if len(meta["objects"]) != 1:
            continue
        pixels = np.asarray(image, dtype=float)
        ys, xs = np.nonzero(_object_mask(pixels))
        side = pixels.shape[0]
        x1, y1, x2, y2 = np.array(meta["objects"][0]["box"]) * side
        assert x1 - 1 <= xs.min() and xs.max() + 1 <= x2 + 1 and y1 - 1 <= ys.min() and ys.max() + 1 <= y2 + 1
        assert xs.max() + 1 - xs.min() > 0.5 * (x2 - x1) and ys.max() + 1 - ys.min() > 0.5 * (y2 - y1)
        checked += 1
    assert checked > 100
    two = next(meta for _, _, meta in train_samples if len(meta["objects"]) == 2)
    a, b = (np.array(o["box"]) for o in two["objects"])
    # the boxes' inscribed circles (the objects' circumcircles) do not overlap
    assert np.hypot(*((a[:2] + a[2:]) / 2 - (b[:2] + b[2:]) / 2)) >= (a[2] - a[0] + b[2] - b[0]) / 2 - 1e-3
