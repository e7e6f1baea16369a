"""Region boxes follow their image through open_clip's resize and crop, and reach the batch."""
import io
import json

import pytest
import torch
import torchvision.transforms as T
import webdataset as wds
from open_clip.transform import AugmentationCfg, PreprocessCfg, image_transform_v2
from PIL import Image, ImageDraw

from vlp.data.boxes import BoxedTransform
from vlp.data.wds import EvalStream, SampleDecoder
from test_wds import TOKENIZER

MEAN, STD = torch.tensor(PreprocessCfg().mean)[:, None, None], torch.tensor(PreprocessCfg().std)[:, None, None]


def image_with_rectangle(size, box):
    """A black image with a white rectangle over `box` (fractions), and the box."""
    width, height = size
    image = Image.new("RGB", size)
    x1, y1, x2, y2 = box
    ImageDraw.Draw(image).rectangle([x1 * width, y1 * height, x2 * width - 1, y2 * height - 1], fill="white")
    return image


def white_extent(pixels: torch.Tensor) -> torch.Tensor:
    """[x1, y1, x2, y2] in fractions of the transformed image's white pixels."""
    white = ((pixels * STD + MEAN).mean(dim=0) > 0.5)
    ys, xs = torch.nonzero(white, as_tuple=True)
    height, width = white.shape
    return torch.tensor([xs.min() / width, ys.min() / height, (xs.max() + 1) / width, (ys.max() + 1) / height])


def test_validation_resize_and_centre_crop_move_and_drop_boxes():
    # 100 x 50: the shortest side is already 50; the centre crop keeps x in [25, 75)
    transform = BoxedTransform(image_transform_v2(PreprocessCfg(size=50), False), max_boxes=3)
    image, boxes = transform(Image.new("RGB", (100, 50)), [[0.5, 0.0, 0.75, 1.0], [0.0, 0.2, 0.2, 0.6]])
    assert image.shape == (3, 50, 50)
    # the first box moves to x in [25, 50) of 50; the second is cut away; empty slots hold the whole image
    assert torch.allclose(boxes, torch.tensor([[0.5, 0.0, 1.0, 1.0], [0, 0, 1, 1], [0, 0, 1, 1]]))


@pytest.mark.parametrize("seed", range(5))
def test_random_resized_crop_moves_each_box_with_its_pixels(seed):
    augment = AugmentationCfg(scale=(0.4, 1.0))
    transform = BoxedTransform(image_transform_v2(PreprocessCfg(size=64), True, augment), max_boxes=1)
    box = [0.35, 0.3, 0.65, 0.55]
    torch.manual_seed(seed)
    image, boxes = transform(image_with_rectangle((120, 90), box), [box])
    assert torch.allclose(boxes[0], white_extent(image), atol=2 / 64)  # bicubic resampling blurs a pixel or so


def test_too_many_boxes_keep_the_first_and_no_boxes_give_the_whole_image():
    transform = BoxedTransform(image_transform_v2(PreprocessCfg(size=16), False), max_boxes=2)
    _, boxes = transform(Image.new("RGB", (16, 16)), [[0, 0, 0.5, 0.5], [0.5, 0.5, 1, 1], [0, 0.5, 0.5, 1]])
    assert torch.allclose(boxes, torch.tensor([[0, 0, 0.5, 0.5], [0.5, 0.5, 1, 1]]))
    _, boxes = transform(Image.new("RGB", (16, 16)), [])
    assert torch.equal(boxes, torch.tensor([[0.0, 0, 1, 1], [0, 0, 1, 1]]))


def test_a_resize_step_that_cannot_move_boxes_is_refused_by_name():
    class ResizeKeepRatio:  # like open_clip's, which torchvision's box transforms do not cover
        def __call__(self, image):
            return image

    with pytest.raises(ValueError, match="ResizeKeepRatio cannot move region boxes"):
        BoxedTransform(T.Compose([ResizeKeepRatio(), T.ToTensor()]), max_boxes=1)


def _shard(path, samples):
    with wds.TarWriter(str(path)) as sink:
        for key, meta in samples:
            png = io.BytesIO()
            Image.new("RGB", (16, 16)).save(png, format="PNG")
            sink.write({"__key__": key, "png": png.getvalue(), "txt": "a caption", "json": json.dumps(meta).encode()})


def test_batches_carry_the_boxes_and_a_sample_with_bad_boxes_is_skipped_naming_it(tmp_path, caplog):
    _shard(tmp_path / "s.tar", [("good", {"boxes": [[0.25, 0.25, 0.75, 1.0]]}), ("none", {}),
                                ("bad", {"boxes": [[0.5, 0.0, 0.25, 1.0]]})])
    decoder = SampleDecoder(image_transform_v2(PreprocessCfg(size=16), False), max_boxes=2)
    batch, = list(EvalStream([str(tmp_path / "s.tar")], decoder, TOKENIZER, batch_size=4))
    assert batch.boxes.shape == (2, 2, 4) and batch.skipped == 1
    assert torch.allclose(batch.boxes[0], torch.tensor([[0.25, 0.25, 0.75, 1.0], [0, 0, 1, 1]]))
    assert torch.equal(batch.boxes[1], torch.tensor([[0.0, 0, 1, 1], [0, 0, 1, 1]]))
    assert "sample bad: `boxes` must be [x1, y1, x2, y2]" in caplog.text
    # without max_boxes the batch has none
    batch, = list(EvalStream([str(tmp_path / "s.tar")], SampleDecoder(decoder.transform), TOKENIZER, batch_size=4))
    assert batch.boxes is None and batch.skipped == 0
