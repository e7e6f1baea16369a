"""The webdataset pipeline: shard specs, exact epoch lengths, exactly-once evaluation, bad samples."""
import io
import os

import open_clip
import pytest
import torch
import webdataset as wds
from open_clip.transform import PreprocessCfg, image_transform_v2
from PIL import Image
from torch.utils.data import DataLoader

from vlp.data.wds import EvalStream, SampleDecoder, TrainStream, count_samples, expand_urls

TOKENIZER = open_clip.get_tokenizer("vlp-clip-micro")


def _png(colour) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), colour).save(buf, format="PNG")
    return buf.getvalue()


def write_shards(folder, sizes, bad=()) -> list[str]:
    """Shards of numbered samples; `bad` names samples to corrupt (image bytes) or strip (no caption)."""
    paths, n = [], 0
    for s, size in enumerate(sizes):
        path = os.path.join(folder, f"shard-{s:06d}.tar")
        with wds.TarWriter(path) as sink:
            for _ in range(size):
                sample = {"__key__": f"s{n:05d}", "png": _png((n % 256, 0, 0)), "txt": f"caption {n}", "cls": str(n)}
                if n in bad:
                    kind = bad[n]
                    if kind == "corrupt":
                        sample["png"] = b"not an image"
                    else:
                        del sample["txt"]
                sink.write(sample)
                n += 1
        paths.append(path)
    return paths


def decoder():
    return SampleDecoder(image_transform_v2(PreprocessCfg(size=(16, 16)), False))


def labels_of(batches) -> list[int]:
    return [int(x) for b in batches for x in b.labels]


def test_expand_urls_accepts_braces_folders_globs_and_lists(tmp_path):
    paths = write_shards(tmp_path, [2, 2, 2])
    brace = str(tmp_path / "shard-{000000..000002}.tar")
    assert expand_urls(brace) == paths
    assert expand_urls(str(tmp_path)) == paths
    assert expand_urls(str(tmp_path / "shard-*.tar")) == paths
    assert expand_urls([paths[0], str(tmp_path / "shard-00000[12].tar")]) == paths
    assert expand_urls("pipe:curl -s http://host/a.tar") == ["pipe:curl -s http://host/a.tar"]


def test_a_folder_of_several_splits_is_refused_not_read_whole(tmp_path):
    for split in ("train", "val"):
        with wds.TarWriter(str(tmp_path / f"{split}-000000.tar")) as sink:
            sink.write({"__key__": "a", "png": _png((0, 0, 0)), "txt": "x"})
    with pytest.raises(ValueError, match=r"several splits \(train, val\).*train-\*\.tar"):
        expand_urls(str(tmp_path))
    assert expand_urls(str(tmp_path / "train-*.tar")) == [str(tmp_path / "train-000000.tar")]


def test_expand_urls_names_the_spec_that_matches_nothing(tmp_path):
    missing = str(tmp_path / "nope-{000..002}.tar")
    with pytest.raises(FileNotFoundError, match="nope-000.tar"):
        expand_urls(missing)
    with pytest.raises(FileNotFoundError, match=r"empty/\*\.tar"):
        expand_urls(str(tmp_path / "empty" / "*.tar"))


def test_count_samples_reads_sizes_json(tmp_path):
    paths = write_shards(tmp_path, [3, 4])
    assert count_samples(paths) is None
    (tmp_path / "sizes.json").write_text('{"shard-000000.tar": 3, "shard-000001.tar": 4}')
    assert count_samples(paths) == 7


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("resampled", [True, False])
def test_train_stream_yields_exactly_num_batches(tmp_path, workers, resampled):
    paths = write_shards(tmp_path, [5, 7, 3, 9])
    stream = TrainStream(paths, decoder(), TOKENIZER, batch_size=4, num_batches=7, resampled=resampled,
                         shuffle_buffer=8)
    loader = DataLoader(stream, batch_size=None, num_workers=workers)
    batches = list(loader)
    assert len(batches) == len(loader) == 7
    assert [(b.images.shape, b.tokens.shape) for b in batches] == [((4, 3, 16, 16), (4, TOKENIZER.context_length))] * 7


def test_train_stream_shuffles_differently_per_epoch_and_repeats_with_the_same_position(tmp_path):
    paths = write_shards(tmp_path, [8, 8, 8])
    stream = TrainStream(paths, decoder(), TOKENIZER, batch_size=4, num_batches=5, shuffle_buffer=8)
    first = labels_of(stream)
    assert labels_of(stream) == first  # deterministic for a given seed and position
    stream.set_position(epoch=1, step=5)
    assert labels_of(stream) != first


def test_non_resampled_ranks_read_disjoint_shards(tmp_path, monkeypatch):
    paths = write_shards(tmp_path, [6, 6, 6, 6])
    seen = []
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        stream = TrainStream(paths, decoder(), TOKENIZER, batch_size=4, num_batches=3, resampled=False,
                             shuffle_buffer=1)
        seen.append(set(labels_of(stream)))
    assert not seen[0] & seen[1]
    assert len(seen[0] | seen[1]) == 24  # 12 samples each: one pass over its two shards


def test_non_resampled_needs_a_shard_per_reader(tmp_path, monkeypatch):
    paths = write_shards(tmp_path, [4])
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    stream = TrainStream(paths, decoder(), TOKENIZER, batch_size=2, num_batches=1, resampled=False)
    with pytest.raises(ValueError, match="1 shards cannot feed 2"):
        list(stream)


@pytest.mark.parametrize("world,workers", [(1, 0), (2, 0), (2, 2), (3, 2)])
def test_eval_stream_reads_every_sample_exactly_once(tmp_path, monkeypatch, world, workers):
    paths = write_shards(tmp_path, [5, 1, 7])  # fewer shards than ranks x workers, uneven
    seen = []
    for rank in range(world):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", str(world))
        loader = DataLoader(EvalStream(paths, decoder(), TOKENIZER, batch_size=4), batch_size=None,
                            num_workers=workers)
        seen += labels_of(loader)
    assert sorted(seen) == list(range(13))


@pytest.mark.parametrize("world,workers", [(2, 0), (2, 2)])
def test_eval_stream_splits_shards_over_readers_when_there_are_enough(tmp_path, monkeypatch, world, workers):
    sizes = [3, 1, 4, 2, 5, 3, 2, 4]
    paths = write_shards(tmp_path, sizes)
    first = [sum(sizes[:i]) for i in range(len(sizes))]
    shard_of = {n: s for s, (start, size) in enumerate(zip(first, sizes)) for n in range(start, start + size)}
    seen = []
    for rank in range(world):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", str(world))
        loader = DataLoader(EvalStream(paths, decoder(), TOKENIZER, batch_size=4), batch_size=None,
                            num_workers=workers)
        labels = labels_of(loader)
        shards = {shard_of[n] for n in labels}
        assert sorted(labels) == [n for s in sorted(shards) for n in range(first[s], first[s] + sizes[s])]  # whole shards
        seen += labels
    assert sorted(seen) == list(range(sum(sizes)))


def test_bad_samples_are_skipped_and_counted(tmp_path):
    paths = write_shards(tmp_path, [6, 6], bad={1: "corrupt", 4: "no caption", 9: "corrupt"})
    truncated = tmp_path / "shard-000002.tar"
    truncated.write_bytes(open(paths[1], "rb").read()[:1500])  # cut mid-shard
    batches = list(EvalStream(paths + [str(truncated)], decoder(), TOKENIZER, batch_size=4))
    assert sorted(labels_of(batches)) == sorted(set(range(12)) - {1, 4, 9})
    # three bad samples, and the truncated shard (cut inside its first member) counts once
    assert sum(b.skipped for b in batches) == 4


def test_an_unreadable_stream_fails_clearly(tmp_path, monkeypatch):
    monkeypatch.setattr("vlp.data.wds.MAX_CONSECUTIVE_FAILURES", 10)
    paths = write_shards(tmp_path, [20], bad={i: "corrupt" for i in range(20)})
    stream = TrainStream(paths, decoder(), TOKENIZER, batch_size=2, num_batches=1)
    with pytest.raises(RuntimeError, match="consecutive unreadable samples"):
        list(stream)


def test_decoder_reads_configured_keys():
    sample = {"__key__": "k", "webp": b"", "jpg": _png((0, 255, 0)), "caption": "hello".encode(), "label": b"3"}
    dec = SampleDecoder(image_transform_v2(PreprocessCfg(size=(8, 8)), False), image_key="jpg",
                        caption_key="caption", label_key="label")
    image, caption, label, negatives, boxes = dec(sample)
    assert image.shape == (3, 8, 8) and caption == "hello" and label == 3 and boxes is None
    with pytest.raises(KeyError, match="no caption"):
        decoder()({"__key__": "k", "png": _png((0, 0, 0))})
    assert torch.is_tensor(image)
