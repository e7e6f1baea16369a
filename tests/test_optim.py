"""Parameter groups (weight decay, per-tower learning rates, layer decay, frozen towers) and the schedule."""
import math

import pytest
import torch

from vlp.models import VLPModel, open_clip_towers
from vlp.optim import cosine_with_warmup, param_groups


def group_of(groups, model):
    """parameter name -> its group."""
    by_id = {id(p): g for g in groups for p in g["params"]}
    return {n: by_id[id(p)] for n, p in model.named_parameters() if id(p) in by_id}


def test_no_weight_decay_on_biases_norms_and_logit_scale_and_frozen_params_left_out():
    model = VLPModel(open_clip_towers("vlp-clip-micro"))
    model.text_tower.token_embedding.weight.requires_grad_(False)
    groups = group_of(param_groups(model, weight_decay=0.2, lr=1e-3), model)
    assert groups["logit_scale"]["weight_decay"] == 0.0
    assert groups["image_tower.transformer.resblocks.0.ln_1.weight"]["weight_decay"] == 0.0
    assert groups["image_tower.transformer.resblocks.0.attn.in_proj_bias"]["weight_decay"] == 0.0
    assert groups["image_tower.transformer.resblocks.0.attn.in_proj_weight"]["weight_decay"] == 0.2
    assert "text_tower.token_embedding.weight" not in groups
    assert set(groups) == {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(g["lr"] == 1e-3 for g in groups.values())


def test_per_tower_learning_rates_and_layer_decay():
    model = VLPModel(open_clip_towers("vlp-clip-micro"))  # 2 blocks per tower: depth 3
    groups = group_of(param_groups(model, 0.2, lr=1.0, image_lr_scale=0.1, text_lr_scale=2.0, layer_decay=0.5),
                      model)
    lr = {n: g["lr"] for n, g in groups.items()}
    assert lr["logit_scale"] == 1.0
    assert lr["image_tower.proj"] == pytest.approx(0.1)  # head: no decay
    assert lr["image_tower.transformer.resblocks.1.mlp.c_fc.weight"] == pytest.approx(0.1 * 0.5)
    assert lr["image_tower.transformer.resblocks.0.mlp.c_fc.weight"] == pytest.approx(0.1 * 0.25)
    assert lr["image_tower.conv1.weight"] == pytest.approx(0.1 * 0.125)  # stem
    assert lr["text_tower.token_embedding.weight"] == pytest.approx(2.0 * 0.125)
    assert lr["text_tower.ln_final.weight"] == pytest.approx(2.0)


@pytest.mark.parametrize("arch,unlocked", [("vlp-clip-micro", 0), ("vlp-clip-micro", 1), ("vlp-clip-rn-micro", 0)])
def test_locked_towers_stay_unchanged_and_are_left_out_of_the_optimiser(arch, unlocked):
    torch.manual_seed(0)
    model = VLPModel(open_clip_towers(arch), lock_image=True, lock_image_unlocked_groups=unlocked,
                     lock_image_freeze_bn_stats=arch.endswith("rn-micro"), lock_text=True)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    assert any(n.startswith("image_tower.") for n in frozen) and any(n.startswith("text_tower.") for n in frozen)
    if unlocked:
        assert model.image_tower.proj.requires_grad  # the last group stays trainable
    optimizer = torch.optim.AdamW(param_groups(model, 0.2, lr=1e-2))
    assert not {id(p) for n, p in model.named_parameters() if n in frozen} & {
        id(p) for g in optimizer.param_groups for p in g["params"]}
    model.train()
    for _ in range(3):
        out = model(torch.randn(4, 3, 64, 64), model.tokenizer(["a", "b", "c", "d"]))
        sims = out.logit_scale * out.image_features @ out.text_features.T
        torch.nn.functional.cross_entropy(sims, torch.arange(4)).backward()
        optimizer.step()
        optimizer.zero_grad()
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    if arch.endswith("rn-micro"):  # frozen BatchNorm statistics do not move either
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.image_tower.modules())


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
