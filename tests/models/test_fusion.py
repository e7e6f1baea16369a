"""Token outputs of the towers and the three fusion transformers."""
import functools

import pytest
import torch
from torch import nn

from vlp.models import VLPModel, open_clip_towers
from vlp.models.fusion import CoAttentionFusion, CrossAttentionFusion, MergedFusion
from vlp.models.tokens import add_mask_token, check_token_support

FUSIONS = [CrossAttentionFusion, MergedFusion, CoAttentionFusion]
CAPTIONS = ["a red circle", "a blue square above a green star", "one"]


def fusion_model(arch="vlp-clip-micro", fusion=CrossAttentionFusion, **towers_kwargs) -> VLPModel:
    torch.manual_seed(0)
    return VLPModel(open_clip_towers(arch, **towers_kwargs), fusion=functools.partial(fusion, width=32, heads=2))


@pytest.mark.parametrize("arch,tokens", [("vlp-clip-micro", 16), ("vlp-clip-rn-micro", 4)])
def test_token_outputs_come_with_unchanged_pooled_features(arch, tokens):
    model = fusion_model(arch).eval()
    images, text = torch.randn(3, 3, 64, 64), model.tokenizer(CAPTIONS)
    with torch.no_grad():
        out = model(images, text)
        torch.testing.assert_close(out.image_features, model.encode_image(images))
        torch.testing.assert_close(out.text_features, model.encode_text(text))
    assert out.image_tokens.shape[:2] == (3, tokens)  # ViT: 4x4 patches; ResNet: its 2x2 final map
    assert out.text_tokens.shape[:2] == text.shape
    assert torch.equal(out.text_padding, text == 0)
    assert torch.equal(out.text_cls_index, (text == 49407).int().argmax(dim=1))  # CLIP pools its end of text


def test_hf_text_tower_gives_tokens(tiny_hf_arch):
    model = fusion_model(tiny_hf_arch)
    text = model.tokenizer(CAPTIONS)
    out = model(torch.randn(3, 3, 64, 64), text)
    assert out.text_tokens.shape[:2] == text.shape and torch.equal(out.text_padding, text == 0)
    assert (out.text_cls_index == 0).all()  # BERT's [CLS]
    assert model.mask_token_id == model.tokenizer.tokenizer.mask_token_id  # BERT has its own [MASK]
    assert model.fuse(torch.randn(3, 3, 64, 64), text).cls.shape == (3, 32)


@pytest.mark.parametrize("fusion", FUSIONS)
def test_fusion_reads_both_modalities_and_ignores_padding(fusion):
    model = fusion_model(fusion=fusion).eval()
    images, text = torch.randn(3, 3, 64, 64), model.tokenizer(CAPTIONS)
    with torch.no_grad():
        out = model(images, text)
        fused = model.fusion(out.image_tokens, out.text_tokens, out.text_padding, out.text_cls_index)
        assert fused.text.shape == (3, text.shape[1], 32) and fused.cls.shape == (3, 32)
        assert (fused.image is None) == (fusion is CrossAttentionFusion)
        garbage = out.text_tokens.masked_fill(out.text_padding[..., None], 7.0)
        again = model.fusion(out.image_tokens, garbage, out.text_padding, out.text_cls_index)
        torch.testing.assert_close(again.cls, fused.cls)  # padding is masked out
        other_image = model.fusion(out.image_tokens.flip(0), out.text_tokens, out.text_padding, out.text_cls_index)
        assert not torch.allclose(other_image.cls, fused.cls)  # the [CLS] sees the image


@pytest.mark.parametrize("fusion", FUSIONS)
def test_fusion_learns_which_side_of_the_image_an_object_is_on(fusion):
    """Where a thing is lives only in the order of the image tokens: after 100 steps, "red left"
    must match a 2x2 map whose red token is in the left column and "red right" must not.
    With positions at 0.02 beside feature-map-sized content, no design got past ~60%."""
    torch.manual_seed(0)
    width, colours = 32, 4
    object_features = torch.randn(colours, 64) * 2  # feature maps are large: the RN micro's are ~12 in norm
    background = torch.randn(64) * 2
    words = torch.randn(colours + 2, width)  # the colour words, then "left", "right"
    model = fusion(image_width=64, text_width=width, num_image_tokens=4, width=width, heads=2, layers=1)

    def batch(n):
        colour, cell, claim = torch.randint(colours, (n,)), torch.randint(4, (n,)), torch.randint(2, (n,))
        image = background.repeat(n, 4, 1) + 0.3 * torch.randn(n, 4, 64)
        image[torch.arange(n), cell] = object_features[colour]
        text = torch.stack([words[colour], words[colours + claim]], dim=1)
        return image, text, (claim == cell % 2).float()  # row-major 2x2: cells 0 and 2 are on the left

    assert matching_accuracy(model, batch, steps=100) > 0.9


@pytest.mark.parametrize("word_codes", [False, True])
def test_word_codes_let_the_fusion_read_words_the_text_tower_blurs(word_codes):
    """A text tower trained contrastively from scratch gives "left" and "right" nearly the same
    outputs (here: the same). Only with word codes can the fusion tell which one the text says."""
    torch.manual_seed(0)
    width, colours = 32, 4
    object_features, background = torch.randn(colours, 64) * 2, torch.randn(64) * 2
    words = torch.randn(colours + 1, width)  # the colour words, then "left" = "right"
    model = CrossAttentionFusion(image_width=64, text_width=width, num_image_tokens=4, width=width, heads=2,
                                 layers=1, word_codes=word_codes, text_vocab_size=colours + 2, text_length=2)

    def batch(n):
        colour, cell, claim = torch.randint(colours, (n,)), torch.randint(4, (n,)), torch.randint(2, (n,))
        image = background.repeat(n, 4, 1) + 0.3 * torch.randn(n, 4, 64)
        image[torch.arange(n), cell] = object_features[colour]
        text = torch.stack([words[colour], words[colours].expand(n, -1)], dim=1)
        ids = torch.stack([colour, colours + claim], dim=1)
        return image, model.inputs.add_word_codes(text, ids), (claim == cell % 2).float()

    accuracy = matching_accuracy(model, batch, steps=100)
    assert accuracy > 0.9 if word_codes else accuracy < 0.6


def test_word_codes_are_the_same_in_every_build():
    """The codes are not saved: a model rebuilt from a checkpoint must make the same ones."""
    def build(seed):
        torch.manual_seed(seed)
        fusion = functools.partial(CrossAttentionFusion, width=32, heads=2, word_codes=True)
        return VLPModel(open_clip_towers("vlp-clip-micro"), fusion=fusion).eval()

    model, rebuilt, without = build(0), build(1), fusion_model().eval()
    rebuilt.load_state_dict(model.state_dict())
    without.load_state_dict(model.state_dict())  # the same weights; no codes in a state dict
    images, text = torch.randn(3, 3, 64, 64), model.tokenizer(CAPTIONS)
    with torch.no_grad():
        fused = model.fuse(images, text).cls
        torch.testing.assert_close(rebuilt.fuse(images, text).cls, fused)
        assert not torch.allclose(without.fuse(images, text).cls, fused)  # the codes reach the fusion


def matching_accuracy(fusion: nn.Module, batch, steps: int) -> float:
    """Trains `fusion` and a match head for `steps` AdamW steps on `batch(n)` -> (image tokens,
    two text tokens each, whether they match); returns the accuracy on 512 fresh pairs."""
    head = nn.Linear(fusion.width, 1)
    optimizer = torch.optim.AdamW([*fusion.parameters(), *head.parameters()], lr=3e-3)

    def match_logits(image, text):
        padding, cls = torch.zeros(len(text), 2, dtype=torch.bool), torch.ones(len(text), dtype=torch.long)
        return head(fusion(image, text, padding, cls).cls)[:, 0]

    for _ in range(steps):
        image, text, match = batch(64)
        loss = nn.functional.binary_cross_entropy_with_logits(match_logits(image, text), match)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    image, text, match = batch(512)
    with torch.no_grad():
        return ((match_logits(image, text) > 0).float() == match).float().mean().item()


def test_state_dict_prefixes_with_fusion_and_mask_row():
    model = fusion_model()
    assert {k.split(".")[0] for k in model.state_dict()} == {"image_tower", "text_tower", "fusion", "heads",
                                                             "logit_scale"}
    assert {k.split(".")[1] for k in model.state_dict() if k.startswith("heads.")} == {"itm", "mlm"}
    assert model.text_tower.token_embedding.num_embeddings == 49409 and model.mask_token_id == 49408


def test_mask_row_keeps_pretrained_rows_and_is_added_once():
    towers = open_clip_towers("vlp-clip-micro")
    before = towers.text.token_embedding.weight.detach().clone()
    assert add_mask_token(towers.text, towers.tokenizer) == 49408
    assert add_mask_token(towers.text, towers.tokenizer) == 49408
    assert torch.equal(towers.text.token_embedding.weight[:49408], before)
    assert towers.text.token_embedding.num_embeddings == 49409


def test_tower_without_tokens_fails_naming_it():
    towers = open_clip_towers("vlp-clip-micro")
    with pytest.raises(ValueError, match="Sequential"):
        check_token_support(nn.Sequential(), towers.text)
    with pytest.raises(ValueError, match="Linear"):
        check_token_support(towers.image, nn.Linear(2, 2))


def test_wrong_image_size_is_reported():
    model = fusion_model()
    out = model(torch.randn(1, 3, 64, 64), model.tokenizer(["x"]))
    with pytest.raises(ValueError, match="16 image tokens"):
        model.fusion(out.image_tokens[:, :9], out.text_tokens, out.text_padding, out.text_cls_index)


def test_width_must_divide_into_heads():
    with pytest.raises(ValueError, match="heads=3"):
        VLPModel(open_clip_towers("vlp-clip-micro"), fusion=functools.partial(MergedFusion, width=32, heads=3))
