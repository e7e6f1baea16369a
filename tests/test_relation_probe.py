"""scripts/relation_probe.py rebuilds each image's objects from the synthetic data's random draws:
its ideal object tokens must describe the very objects that were rendered and captioned."""
import importlib.util
from pathlib import Path

import pytest

from vlp.data.synthetic import COLOURS, SHAPES, render_sample

SCRIPT = Path(__file__).parents[1] / "scripts" / "relation_probe.py"


@pytest.fixture(scope="module")
def probe():
    spec = importlib.util.spec_from_file_location("relation_probe", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("seed", [0, 1])
def test_drawn_objects_are_the_rendered_ones(probe, seed):
    for index in range(40):
        rendered = render_sample(seed, "train", index)[2]["objects"]
        drawn = probe.drawn_objects(seed, index)
        assert [(o["colour"], o["shape"], o["size"], o["position"]) for o in drawn] == \
               [(o["colour"], o["shape"], o["size"], o["position"]) for o in rendered]


def test_object_tokens_hold_colour_shape_and_coordinates(probe):
    objects = probe.drawn_objects(0, next(i for i in range(40) if len(probe.drawn_objects(0, i)) == 2))
    tokens = probe.object_tokens(objects)
    for row, obj in zip(tokens, objects):
        assert row[:12].nonzero().flatten().tolist() == [list(COLOURS).index(obj["colour"]),
                                                         len(COLOURS) + SHAPES.index(obj["shape"])]
        assert row[12:].tolist() == pytest.approx([obj["x"] * 4 - 2, obj["y"] * 4 - 2, 1.0])


def test_pairs_are_a_caption_and_its_positions_swapped_false_caption(probe):
    pairs = probe.position_swap_pairs(seed=0, count=60)
    assert pairs
    where = {"left", "right", "top", "bottom", "center", "above", "below"}
    for _, objects, caption, false_caption in pairs:
        assert len(objects) == 2 and false_caption != caption
        assert where & set(caption.replace(".", "").split()), caption  # what the task is about
