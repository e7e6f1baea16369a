"""scripts/relation_probe.py: its ideal object tokens, region tokens and own word embeddings must
describe the very objects that were rendered and the words that were captioned."""
import importlib.util
from pathlib import Path

import pytest
import torch

from vlp.data.synthetic import COLOURS, SHAPES

SCRIPT = Path(__file__).parents[1] / "scripts" / "relation_probe.py"


@pytest.fixture(scope="module")
def probe():
    spec = importlib.util.spec_from_file_location("relation_probe", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_object_tokens_hold_colour_shape_and_coordinates(probe):
    _, objects, _, _ = probe.position_swap_pairs(seed=0, count=40)[0]
    tokens = probe.object_tokens(objects)
    for row, obj in zip(tokens, objects):
        assert row[:12].nonzero().flatten().tolist() == [list(COLOURS).index(obj["colour"]),
                                                         len(COLOURS) + SHAPES.index(obj["shape"])]
        x1, y1, x2, y2 = obj["box"]
        assert row[12:].tolist() == pytest.approx([(x1 + x2) * 2 - 2, (y1 + y2) * 2 - 2, 1.0])


def test_pairs_are_a_caption_and_a_false_caption_with_its_shapes_elsewhere(probe):
    pairs = probe.position_swap_pairs(seed=0, count=60)
    assert pairs
    where = {"left", "right", "top", "bottom", "center", "above", "below"}
    for _, objects, caption, false_caption in pairs:
        assert len(objects) == 2 and false_caption != caption
        assert where & set(caption.replace(".", "").split()), caption  # what the task is about
        assert len(probe.coloured_shapes(caption)) == 2, caption
        assert probe.coloured_shapes(false_caption) == probe.coloured_shapes(caption), false_caption


def test_region_tokens_pool_each_objects_box(probe):
    # channel 0 lights the left half of an 8×8 map, channel 1 the right half
    feature_map = torch.zeros(1, 2, 8, 8)
    feature_map[0, 0, :, :4], feature_map[0, 1, :, 4:] = 1.0, 1.0
    left, right = [0.05, 0.3, 0.4, 0.6], [0.55, 0.1, 0.95, 0.5]
    tokens = probe.region_tokens(feature_map, torch.tensor([[left, right]]))
    assert tokens.shape == (1, 2, 8)
    root2 = 2 ** 0.5  # layer-normed, then to unit norm
    assert tokens[0, :, :2].tolist() == [pytest.approx([1 / root2, -1 / root2], abs=1e-3),
                                         pytest.approx([-1 / root2, 1 / root2], abs=1e-3)]
    assert tokens[0, 0, 2:].tolist() == pytest.approx([-1.8, -0.8, -0.4, 0.4, 1.4, 1.2])
    assert tokens[0, 1, 2:].tolist() == pytest.approx([0.2, -1.6, 1.8, 0.0, 1.6, 1.6])


def test_own_words_embed_each_word_once_and_add_positions(probe):
    ids = torch.tensor([[49406, 320, 736, 49407, 0], [49406, 736, 320, 49407, 0]])
    embed = probe.OwnWords(ids, width=8)
    tokens, padding, cls_index = embed(ids, ids == 0, ids.argmax(dim=-1))
    assert len(embed.words.weight) == 5  # the words used, not the 49k vocabulary
    words = tokens - embed.positions[:5]
    assert torch.allclose(words[0, 1], words[1, 2]) and torch.allclose(words[0, 2], words[1, 1])
    assert not torch.allclose(tokens[0, 1], tokens[1, 2])  # the same word at another position
    assert padding.tolist() == [[False] * 4 + [True]] * 2 and cls_index.tolist() == [3, 3]
