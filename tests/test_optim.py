"""Parameter groups and the learning-rate schedule."""
import math

import pytest
import torch

from vlp.models import VLPModel, open_clip_towers
from vlp.optim import cosine_with_warmup, param_groups


def test_no_weight_decay_on_biases_norms_and_logit_scale_and_frozen_params_left_out():
    model = VLPModel(open_clip_towers("vlp-clip-micro"))
    model.text_tower.token_embedding.weight.requires_grad_(False)
    decay, no_decay = param_groups(model, weight_decay=0.2)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    not_decayed = {names[id(p)] for p in no_decay["params"]}
    assert decay["weight_decay"] == 0.2 and no_decay["weight_decay"] == 0.0
    assert "logit_scale" in not_decayed
    assert "image_tower.transformer.resblocks.0.ln_1.weight" in not_decayed
    assert "image_tower.transformer.resblocks.0.attn.in_proj_bias" in not_decayed
    assert "image_tower.transformer.resblocks.0.attn.in_proj_weight" in decayed
    assert "text_tower.token_embedding.weight" not in decayed | not_decayed
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert decayed | not_decayed == trainable and not decayed & not_decayed


def test_cosine_schedule_warms_up_linearly_then_decays_to_the_floor():
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=1.0)
    scheduler = cosine_with_warmup(optimizer, total_steps=110, warmup_steps=10, min_lr_ratio=0.1)
    lrs = []
    for _ in range(111):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[:10] == pytest.approx([(i + 1) / 10 for i in range(10)])
    assert lrs[10] == pytest.approx(1.0)
    assert lrs[60] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lrs[110] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
