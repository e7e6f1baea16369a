"""Towers from open_clip: architectures by name, weights from a local checkpoint file."""
import json

import open_clip
import pytest
import torch

from vlp.models import VLPModel, open_clip_towers


def test_pretrained_file_in_open_clip_layout_loads_into_both_towers(tmp_path):
    reference = open_clip.create_model("vlp-clip-micro")  # standard CLIP layout, as open_clip saves it
    path = tmp_path / "weights.pt"
    torch.save({"state_dict": reference.state_dict()}, path)
    model = VLPModel(open_clip_towers("vlp-clip-micro", pretrained=str(path)))
    images, tokens = torch.randn(2, 3, 64, 64), model.tokenizer(["a red circle", "a blue star"])
    with torch.no_grad():
        assert torch.allclose(model.image_tower(images), reference.encode_image(images), atol=1e-5)
        assert torch.allclose(model.text_tower(tokens), reference.encode_text(tokens), atol=1e-5)


def test_state_dict_prefixes_are_stable():
    model = VLPModel(open_clip_towers("vlp-clip-micro"))
    prefixes = {k.split(".")[0] for k in model.state_dict()}
    assert prefixes == {"image_tower", "text_tower", "logit_scale"}


def test_towers_take_open_clip_preprocessing_and_tokenizer():
    towers = open_clip_towers("RN50", image_size=64, context_length=16)
    assert towers.preprocess["size"] in (64, (64, 64))
    assert towers.tokenizer(["hello"]).shape == (1, 16)
    with torch.no_grad():
        assert towers.image(torch.randn(1, 3, 64, 64)).shape == towers.text(towers.tokenizer(["x"])).shape


def test_logit_scale_initialised_and_clamped():
    model = VLPModel(open_clip_towers("vlp-clip-micro"), init_logit_scale=1 / 0.07, max_logit_scale=100)
    out = model(torch.randn(1, 3, 64, 64), model.tokenizer(["x"]))
    assert out.logit_scale.item() == pytest.approx(1 / 0.07, rel=1e-5)
    with torch.no_grad():
        model.logit_scale.fill_(10.0)  # as an optimiser step past the cap would
    model.clamp_logit_scale_()
    assert model(torch.randn(1, 3, 64, 64), model.tokenizer(["x"])).logit_scale.item() == pytest.approx(100)
    assert VLPModel(open_clip_towers("vlp-clip-micro"), init_logit_scale=500).scale().item() == pytest.approx(100)


def test_timm_image_tower_from_an_open_clip_config(tmp_path):
    config = {"embed_dim": 32,
              "vision_cfg": {"timm_model_name": "resnet18", "timm_model_pretrained": False, "timm_pool": "avg",
                             "timm_proj": "linear", "image_size": 64},
              "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    (tmp_path / "test-timm-resnet18.json").write_text(json.dumps(config))
    open_clip.add_model_config(tmp_path / "test-timm-resnet18.json")
    model = VLPModel(open_clip_towers("test-timm-resnet18"))
    assert type(model.image_tower).__name__ == "TimmModel"
    out = model(torch.randn(2, 3, 64, 64), model.tokenizer(["a", "b"]))
    assert out.image_features.shape == out.text_features.shape == (2, 32)


def test_hugging_face_text_tower_and_tokenizer_from_a_local_config(tiny_hf_arch):
    model = VLPModel(open_clip_towers(tiny_hf_arch))
    assert type(model.text_tower).__name__ == "HFTextEncoder"
    tokens = model.tokenizer(["a red circle", "two blue stars"])
    assert tokens.shape == (2, 16)
    out = model(torch.randn(2, 3, 64, 64), tokens)
    out.text_features.sum().backward()
    assert out.text_features.shape == (2, 32)
    assert model.text_tower.transformer.embeddings.word_embeddings.weight.grad is not None
