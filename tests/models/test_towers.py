"""Towers from open_clip: architectures by name, weights from a local checkpoint file."""
import json
import os
import subprocess
import sys

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


def test_lit_partial_unlock_works_on_vit_towers_and_is_refused_clearly_on_resnet():
    model = VLPModel(open_clip_towers("vlp-clip-micro"), lock_image=True, lock_image_unlocked_groups=2)
    trainable = [p.requires_grad for p in model.image_tower.parameters()]
    assert any(trainable) and not all(trainable)
    with pytest.raises(ValueError, match="lock_image_unlocked_groups=2.*ResNet image towers lock whole"):
        VLPModel(open_clip_towers("vlp-clip-rn-micro"), lock_image=True, lock_image_unlocked_groups=2)


def test_align_builds_offline_from_a_local_bert_folder(tiny_hf_arch, tmp_path):
    bert = open_clip.get_model_config(tiny_hf_arch)["text_cfg"]["hf_model_name"]  # a local folder
    build = ("from vlp.models import VLPModel, open_clip_towers; import sys; "
             "m = VLPModel(open_clip_towers('vlp-align-base', text_model=sys.argv[1])); "
             "print(m.text_tower.config.hidden_size, m.tokenizer(['a red circle']).shape[1])")
    # an empty cache and no hub: everything must come from the folder
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path), "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", build, bert], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split()[-2:] == ["32", "64"]  # the tiny BERT's width; vlp-align-base's context length
