"""Region tokens pooled over boxes, and the fusions that read them."""
import functools

import pytest
import torch
from torch import nn

from vlp.models import VLPModel, open_clip_towers
from vlp.models.fusion import CoAttentionFusion, CrossAttentionFusion, MergedFusion
from vlp.models.regions import check_region_support, feature_map, region_tokens
from test_fusion import matching_accuracy

FUSIONS = [CrossAttentionFusion, MergedFusion, CoAttentionFusion]


def region_model(fusion=CrossAttentionFusion, arch="vlp-clip-rn-micro", stage=2) -> VLPModel:
    torch.manual_seed(0)
    return VLPModel(open_clip_towers(arch), fusion=functools.partial(fusion, width=32, heads=2, image_input="regions",
                                                                     region_stage=stage))


def test_region_tokens_average_the_map_over_each_box_after_the_whole_image():
    features = torch.randn(2, 3, 4, 4)
    boxes = torch.tensor([[[0.0, 0.0, 0.5, 0.5]], [[0.5, 0.25, 1.0, 0.75]]])  # cells (rows 0-1, cols 0-1); (1-2, 2-3)
    tokens = region_tokens(features, boxes)
    assert tokens.shape == (2, 2, 3 + 6)
    torch.testing.assert_close(tokens[:, 0, :3], features.mean(dim=(2, 3)))
    torch.testing.assert_close(tokens[0, 1, :3], features[0, :, 0:2, 0:2].mean(dim=(1, 2)))
    torch.testing.assert_close(tokens[1, 1, :3], features[1, :, 1:3, 2:4].mean(dim=(1, 2)))
    torch.testing.assert_close(tokens[1, :, 3:], torch.tensor([[0, 0, 1, 1, 1, 1], [0.5, 0.25, 1, 0.75, 0.5, 0.5]]))


@pytest.mark.parametrize("arch,stage,shape", [("vlp-clip-rn-micro", 2, (256, 8, 8)),
                                              ("vlp-clip-micro", 1, (128, 4, 4))])
def test_feature_map_of_a_stage_comes_with_the_unchanged_pooled_features(arch, stage, shape):
    tower = open_clip_towers(arch).image.eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        pooled, features = feature_map(tower, images, stage)
        torch.testing.assert_close(pooled, tower(images))
    assert features.shape[1:] == shape


def test_a_vit_fusion_pools_its_patch_grid():
    model = region_model(arch="vlp-clip-micro", stage=1).eval()  # its last block
    out = model(torch.randn(2, 3, 64, 64), model.tokenizer(["a", "b"]), torch.tensor([[[0.0, 0.0, 0.5, 0.5]]] * 2))
    assert out.image_tokens.shape == (2, 2, 128 + 6)  # the whole image and one box; ViT width 128


def test_a_tower_without_feature_maps_or_a_stage_out_of_range_is_refused_by_name():
    with pytest.raises(ValueError, match="Sequential has none"):
        check_region_support(nn.Sequential(), 2)
    with pytest.raises(ValueError, match="region_stage=2: this VisionTransformer has feature maps 0 to 1"):
        region_model(arch="vlp-clip-micro")


@pytest.mark.parametrize("fusion", FUSIONS)
def test_a_fusion_reads_the_boxes(fusion):
    model = region_model(fusion).eval()
    images, text = torch.randn(2, 3, 64, 64), model.tokenizer(["a red circle left of a blue star", "one"])
    boxes = torch.tensor([[[0.1, 0.1, 0.4, 0.4], [0.5, 0.5, 0.9, 0.9]]] * 2)
    with torch.no_grad():
        out = model(images, text, boxes)
        assert out.image_tokens.shape == (2, 3, 256 + 6)  # the whole image, then two boxes; RN stage 2 width
        fused = model.fuse(images, text, boxes).cls
        torch.testing.assert_close(model.fuse(images, text, boxes.flip(1)).cls, fused)  # a set: no order
        moved = boxes.clone()
        moved[:, 0, [0, 2]] += 0.5
        assert not torch.allclose(model.fuse(images, text, moved).cls, fused, atol=1e-3)  # where each box is matters
    with pytest.raises(ValueError, match="set data.max_boxes"):
        model(images, text)


@pytest.mark.parametrize("fusion", FUSIONS)
def test_fusion_learns_which_side_an_object_is_on_from_its_box_alone(fusion):
    """The object's token is the same wherever it is; only its box says which side it is on.
    Features of a ResNet's size (norm ~12) beside six box numbers: the box must not drown."""
    torch.manual_seed(0)
    width, colours = 32, 4
    object_features = torch.randn(colours, 64) * 1.5
    whole = torch.cat([torch.randn(64) * 1.5, torch.tensor([0.0, 0, 1, 1, 1, 1])])
    words = torch.randn(colours + 2, width)  # the colour words, then "left", "right"
    model = fusion(image_width=64 + 6, text_width=width, num_image_tokens=0, width=width, heads=2, layers=1,
                   image_input="regions")

    def batch(n):
        colour, left, claim = torch.randint(colours, (n,)), torch.randint(2, (n,)), torch.randint(2, (n,))
        x1 = torch.where(left.bool(), 0.05, 0.55) + 0.2 * torch.rand(n)
        y1 = 0.7 * torch.rand(n)
        box = torch.stack([x1, y1, x1 + 0.2, y1 + 0.2, torch.full_like(x1, 0.2), torch.full_like(x1, 0.2)], 1)
        image = torch.stack([whole.expand(n, -1), torch.cat([object_features[colour], box], 1)], dim=1)
        text = torch.stack([words[colour], words[colours + claim]], dim=1)
        return image, text, (claim == 1 - left).float()  # claim 0: "left"

    assert matching_accuracy(model, batch, steps=150) > 0.9
