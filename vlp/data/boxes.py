"""Region boxes of a sample, moved with its image through the crop and resize.

A sample's `{key}.json` may list `"boxes": [[x1, y1, x2, y2], ...]` in fractions of the image's
width and height (a detector's output, or the synthetic data's objects). A fusion that reads
region tokens (`model.fusion.image_input=regions`) pools the image tower's feature map over them.
The boxes must follow the training crop, so open_clip's resize and crop steps run as their
torchvision v2 counterparts, which move bounding boxes with the pixels.
"""
import torch
import torchvision.transforms as T
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2

WHOLE_IMAGE = (0.0, 0.0, 1.0, 1.0)


def _with_boxes(step):
    """(the step as a v2 transform that moves boxes, True), or (the step, False) if it leaves geometry alone."""
    if isinstance(step, T.RandomResizedCrop):
        return v2.RandomResizedCrop(step.size, step.scale, step.ratio, step.interpolation, step.antialias), True
    if isinstance(step, T.Resize):
        return v2.Resize(step.size, step.interpolation, step.max_size, step.antialias), True
    if isinstance(step, T.CenterCrop):
        return v2.CenterCrop(step.size), True
    if "Resize" in type(step).__name__ or "Crop" in type(step).__name__:  # e.g. open_clip's ResizeKeepRatio
        raise ValueError(f"the image transform step {type(step).__name__} cannot move region boxes; "
                         "use open_clip's default resize_mode (shortest) with data.max_boxes")
    return step, False


class BoxedTransform:
    """An open_clip image transform applied to an image and its boxes.

    Returns the image tensor and (max_boxes, 4) boxes in fractions of the output image: boxes the
    crop cut away are dropped, those beyond `max_boxes` too, and the empty slots hold the whole
    image, so every sample has the same number of region tokens and no attention mask is needed
    (a repeated key only weights the whole image more).
    """

    def __init__(self, transform: T.Compose, max_boxes: int):
        if max_boxes < 1:
            raise ValueError(f"data.max_boxes must be positive to read boxes, got {max_boxes}")
        self.steps = [_with_boxes(step) for step in transform.transforms]
        self.max_boxes = max_boxes

    def __call__(self, image: Image.Image, boxes: list) -> tuple[torch.Tensor, torch.Tensor]:
        width, height = image.size
        scale = torch.tensor([width, height, width, height], dtype=torch.float32)
        pixels = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)[: self.max_boxes] * scale
        moved = tv_tensors.BoundingBoxes(pixels, format="XYXY", canvas_size=(height, width))
        for step, moves_boxes in self.steps:
            if moves_boxes:
                image, moved = step(image, moved)
            else:
                image = step(image)
        height, width = moved.canvas_size
        moved = moved.as_subclass(torch.Tensor) / torch.tensor([width, height, width, height])
        kept = moved[((moved[:, 2] - moved[:, 0]) * width >= 1) & ((moved[:, 3] - moved[:, 1]) * height >= 1)]
        slots = torch.tensor(WHOLE_IMAGE).repeat(self.max_boxes, 1)
        slots[: len(kept)] = kept
        return image, slots
