"""Region tokens: the image tower's feature map pooled over boxes, for a fusion transformer.

VisualBERT, UNITER and LXMERT feed their fusion one token per detected object: its features
and its box. vlp pools an open_clip image tower's feature map over each box with torchvision's
`roi_align` (a detector's RoI pooling) instead of running a detector, so the features are
learned with the rest. Patch tokens leave the fusion to find each object first; on the
synthetic data a fusion did not learn spatial relations from them (BENCHMARKS.md).
"""
import torch
import torch.nn as nn
from open_clip.modified_resnet import ModifiedResNet
from open_clip.transformer import VisionTransformer
from torch import Tensor
from torchvision.ops import roi_align

GEOMETRY = 6  # x1, y1, x2, y2, width, height of each box, in fractions of the image
_RESNET_LAST_STAGE = 4  # stem, layer1..layer4


def check_region_support(tower: nn.Module, stage: int) -> None:
    """Raises at start-up, naming the tower or the stage, if region tokens cannot be pooled from
    its feature map at `stage`."""
    if not isinstance(tower, (ModifiedResNet, VisionTransformer)):
        raise ValueError(f"region tokens (model.fusion.image_input=regions) need a ResNet or ViT "
                         f"image tower's feature map; {type(tower).__name__} has none")
    last = _RESNET_LAST_STAGE if isinstance(tower, ModifiedResNet) else len(tower.transformer.resblocks) - 1
    if not 0 <= stage <= last:
        raise ValueError(f"model.fusion.region_stage={stage}: this {type(tower).__name__} has feature maps "
                         f"0 to {last}")


def feature_map(tower: nn.Module, images: Tensor, stage: int) -> tuple[Tensor, Tensor]:
    """(pooled features (B, D), feature map (B, C, H, W) of `stage`) in one forward pass.

    `stage` indexes open_clip's `forward_intermediates`: for a ResNet 0 is the stem and 1-4 its
    layers (stage 2 of a 64 px micro tower is 8×8); for a ViT, a block.
    """
    indices = [stage]
    if isinstance(tower, ModifiedResNet):  # it stops after the last index asked for, so ask for its last
        indices = sorted({stage, _RESNET_LAST_STAGE})
    out = tower.forward_intermediates(images, indices=indices, output_fmt="NCHW")
    return out["image_features"], out["image_intermediates"][indices.index(stage)]


def region_tokens(feature_map: Tensor, boxes: Tensor) -> Tensor:
    """(B, 1 + R, C + GEOMETRY): the whole image's token, then one per box (B, R, 4).

    Each token is the feature map averaged over its box (`roi_align`, one output bin) followed
    by the box's x1, y1, x2, y2, width and height; the fusion projects the two parts apart.
    """
    B, _, H, W = feature_map.shape
    whole = boxes.new_tensor([0.0, 0.0, 1.0, 1.0]).expand(B, 1, 4)
    boxes = torch.cat([whole, boxes.to(whole)], dim=1)  # (B, 1 + R, 4)
    scaled = boxes * boxes.new_tensor([W, H, W, H])
    rows = torch.arange(B, device=boxes.device, dtype=boxes.dtype).repeat_interleave(boxes.shape[1])
    rois = torch.cat([rows[:, None], scaled.flatten(0, 1)], dim=1).to(feature_map.dtype)  # (B * (1 + R), 5)
    pooled = roi_align(feature_map, rois, output_size=1, aligned=True).view(B, boxes.shape[1], -1)
    x1, y1, x2, y2 = boxes.unbind(-1)
    geometry = torch.stack([x1, y1, x2, y2, x2 - x1, y2 - y1], dim=-1).to(pooled.dtype)
    return torch.cat([pooled, geometry], dim=-1)
