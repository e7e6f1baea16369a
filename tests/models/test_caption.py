"""CoCa captioning: the loss against open_clip's CoCa and CoCaLoss, and generation."""
import json
import logging

import open_clip
import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import CoCaLoss

from vlp.models import VLPModel, open_clip_towers
from vlp.models.caption import (attention_pool_tokens, caption_forward, caption_loss, coca_text_decoder,
                                encode_image_tokens)
from vlp.models.generate import EOT_ID, SOT_ID, decode, generate

ARCH = "vlp-coca-micro"
CAPTIONS = ["a red circle .", "a blue star on the left .", "two shapes : a pink square and a green star ."]


@pytest.fixture(scope="module")
def coca_and_model():
    """open_clip's CoCa and a VLPModel sharing its modules (towers + heads.caption)."""
    torch.manual_seed(0)
    coca = open_clip.create_model(ARCH).eval()
    coca.text_decoder = coca_text_decoder(ARCH)  # open_clip leaves its projection uninitialised
    towers = open_clip_towers(ARCH)._replace(image=coca.visual, text=coca.text)
    return coca, VLPModel(towers, heads={"caption": coca.text_decoder}).eval()


def test_decoder_is_open_clips_coca_decoder_with_an_initialised_projection():
    decoder = coca_text_decoder(ARCH)
    reference = open_clip.create_model(ARCH).text_decoder
    assert {k: v.shape for k, v in decoder.state_dict().items()} == \
        {k: v.shape for k, v in reference.state_dict().items()}
    assert decoder.text_projection.std().item() == pytest.approx(decoder.width ** -0.5, rel=0.05)


def test_a_model_without_a_multimodal_decoder_is_refused():
    with pytest.raises(ValueError, match="CoCa architecture"):
        coca_text_decoder("vlp-clip-micro")


def test_resnet_tokens_are_its_attention_pool_read_at_every_position():
    torch.manual_seed(0)
    tower = open_clip_towers("vlp-coca-rn-micro").image.eval()
    pool = tower.attnpool
    feature_map = torch.randn(2, pool.k_proj.in_features, 2, 2)
    tokens = attention_pool_tokens(pool, feature_map)
    # open_clip's own computation (AttentionPool2d.forward), keeping every query instead of the first
    x = feature_map.flatten(2).permute(2, 0, 1)
    x = torch.cat([x.mean(dim=0, keepdim=True), x]) + pool.positional_embedding[:, None]
    expected, _ = F.multi_head_attention_forward(
        x, x, x, x.shape[-1], pool.num_heads, None,
        torch.cat([pool.q_proj.bias, pool.k_proj.bias, pool.v_proj.bias]), None, None, False, 0.0,
        pool.c_proj.weight, pool.c_proj.bias, use_separate_proj_weight=True, q_proj_weight=pool.q_proj.weight,
        k_proj_weight=pool.k_proj.weight, v_proj_weight=pool.v_proj.weight, need_weights=False)
    torch.testing.assert_close(tokens, expected.transpose(0, 1))
    torch.testing.assert_close(tokens[:, 0], pool(feature_map))  # row 0: the pooled features


def test_a_resnet_coca_captions_from_its_pooled_position_tokens():
    torch.manual_seed(0)
    towers = open_clip_towers("vlp-coca-rn-micro")
    model = VLPModel(towers, heads={"caption": coca_text_decoder("vlp-coca-rn-micro")})
    images, tokens = torch.randn(2, 3, 64, 64), model.tokenizer(CAPTIONS[:2])
    pooled, image_tokens = encode_image_tokens(model, images)
    assert image_tokens.shape == (2, 4, 128)  # the 2x2 final feature map, at the decoder's width
    torch.testing.assert_close(pooled, model.encode_image(images))  # contrastive features unchanged
    out = caption_forward(model, images, tokens)
    caption_loss(out.logits, out.labels).backward()
    # the decoder reads the pool at every position: its value projection learns from captions alone
    assert towers.image.attnpool.v_proj.weight.grad.abs().sum() > 0
    assert generate(model.eval(), images, "greedy", max_len=6).shape[0] == 2


def test_a_resnet_whose_tokens_do_not_fit_the_decoder_is_refused(tmp_path):
    cfg = open_clip.get_model_config("vlp-coca-rn-micro")
    cfg["multimodal_cfg"] = dict(cfg["multimodal_cfg"], width=64)
    (tmp_path / "vlp-test-coca-rn-misfit.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path)
    with pytest.raises(ValueError, match="embed_dim=128.*width 64"):
        coca_text_decoder("vlp-test-coca-rn-misfit")


def test_a_pretrained_cocas_decoder_comes_with_it(tmp_path, caplog):
    torch.manual_seed(3)
    coca = open_clip.create_model(ARCH)
    coca.text_decoder = coca_text_decoder(ARCH)
    path = tmp_path / "open_clip_coca.pt"
    torch.save(coca.state_dict(), path)  # an open_clip checkpoint file, like the ones its tags download
    decoder = coca_text_decoder(ARCH, pretrained=str(path))
    for key, value in coca.text_decoder.state_dict().items():
        torch.testing.assert_close(decoder.state_dict()[key], value)
    clip = tmp_path / "clip.pt"
    torch.save(open_clip.create_model("vlp-clip-micro").state_dict(), clip)
    with caplog.at_level(logging.INFO, logger="vlp.models.caption"):
        fresh = coca_text_decoder(ARCH, pretrained=str(clip))
    assert "clip.pt holds no CoCa decoder: model.heads.caption starts from random weights" in caplog.text
    assert not torch.equal(fresh.text_projection, coca.text_decoder.text_projection)
    with pytest.raises(ValueError, match="'no-such-tag' is neither a file nor an open_clip tag of vlp-coca-micro"):
        coca_text_decoder(ARCH, pretrained="no-such-tag")


def test_loss_and_features_equal_open_clips_coca(coca_and_model):
    coca, model = coca_and_model
    images, tokens = torch.randn(3, 3, 64, 64), model.tokenizer(CAPTIONS)
    with torch.no_grad():
        ref = coca(images, tokens)
        out = caption_forward(model, images, tokens)
    expected = CoCaLoss(caption_loss_weight=1.0, clip_loss_weight=0.0)(
        ref["image_features"], ref["text_features"], ref["logits"], ref["labels"], ref["logit_scale"])[1]
    torch.testing.assert_close(caption_loss(out.logits, out.labels), expected)
    torch.testing.assert_close(out.image_features, ref["image_features"])
    torch.testing.assert_close(out.text_features, ref["text_features"])
    # only positions whose next token is text are scored
    assert len(out.labels) == int((tokens[:, 1:] != 0).sum())


def _mean_logprob(model, images, sequence):
    """Mean log-probability per generated token of `sequence` (B=1), by teacher forcing."""
    tokens = torch.cat([sequence, torch.zeros(1, 32 - sequence.shape[1], dtype=torch.long)], dim=1)
    out = caption_forward(model, images, tokens)
    return torch.log_softmax(out.logits, -1).gather(1, out.labels[:, None]).mean().item()


def test_beam_search_is_deterministic_and_at_least_as_likely_as_greedy(coca_and_model):
    _, model = coca_and_model
    torch.manual_seed(1)
    images = torch.randn(2, 3, 64, 64)
    first = generate(model, images, "beam_search", num_beams=3, max_len=10)
    assert torch.equal(first, generate(model, images, "beam_search", num_beams=3, max_len=10))
    assert (first[:, 0] == SOT_ID).all()
    greedy = generate(model, images, "greedy", max_len=10)
    for i in range(2):
        beam_seq = first[i][: _length(first[i])][None]
        greedy_seq = greedy[i][: _length(greedy[i])][None]
        if beam_seq[0, -1] == EOT_ID and greedy_seq[0, -1] == EOT_ID:  # both finished: compare their scores
            assert _mean_logprob(model, images[i:i + 1], beam_seq) >= _mean_logprob(
                model, images[i:i + 1], greedy_seq) - 1e-5
    # one beam is greedy decoding
    assert torch.equal(generate(model, images, "beam_search", num_beams=1, max_len=10)[:, :greedy.shape[1]], greedy)


def _length(row):
    ends = (row == EOT_ID).nonzero()
    return int(ends[0]) + 1 if len(ends) else len(row)


def test_top_p_sampling_follows_its_generator_and_respects_lengths(coca_and_model):
    _, model = coca_and_model
    images = torch.randn(2, 3, 64, 64)
    runs = [generate(model, images, "top_p", top_p=0.9, max_len=8, min_len=4,
                     generator=torch.Generator().manual_seed(5)) for _ in range(2)]
    assert torch.equal(*runs)
    assert runs[0].shape[1] <= 8
    assert not (runs[0][:, 1:4] == EOT_ID).any()  # no end of text before min_len tokens
    assert len(decode(runs[0])) == 2


def test_unknown_generation_method_is_refused(coca_and_model):
    with pytest.raises(ValueError, match="beam_search, top_p, greedy"):
        generate(coca_and_model[1], torch.randn(1, 3, 64, 64), "nucleus")
