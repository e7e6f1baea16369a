"""ITM and MLM through the fusion: masking statistics, negative sampling, losses against an independent
computation, and ITM over 2 real gloo ranks equal to one process holding the global batch."""
import functools
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from vlp.fusion_losses import (IGNORE, caption_hashes, image_text_matching, mask_tokens, masked_language_modelling,
                               near_positives, sample_negatives)
from vlp.models import VLPModel, open_clip_towers
from vlp.models.fusion import CrossAttentionFusion

CAPTIONS = ["a red circle.", "a blue square above a star.", "a red circle.", "two shapes: a green star",
            "a pink triangle to the left of a cyan circle.", "one yellow square.", "a purple star.", "a big circle."]


def fusion_model(seed=0) -> VLPModel:
    torch.manual_seed(seed)
    return VLPModel(open_clip_towers("vlp-clip-micro"),
                    fusion=functools.partial(CrossAttentionFusion, width=32, heads=2, layers=1)).double()


def test_mask_tokens_bert_statistics_and_never_special():
    special = [0, 49406, 49407]
    tokens = torch.randint(1, 1000, (400, 50))
    tokens[:, 0], tokens[:, 30], tokens[:, 31:] = 49406, 49407, 0
    masked, labels = mask_tokens(tokens, 49408, special, 49408, generator=torch.Generator().manual_seed(0))
    chosen = labels != IGNORE
    ordinary = ~torch.isin(tokens, torch.tensor(special))
    assert not chosen[~ordinary].any() and (masked[~ordinary] == tokens[~ordinary]).all()
    assert (labels[chosen] == tokens[chosen]).all() and (masked[~chosen] == tokens[~chosen]).all()
    assert chosen.sum() / ordinary.sum() == pytest.approx(0.15, abs=0.01)
    as_mask = (masked[chosen] == 49408).float().mean()
    kept = (masked[chosen] == tokens[chosen]).float().mean()
    assert as_mask == pytest.approx(0.8, abs=0.03) and kept == pytest.approx(0.1, abs=0.03)
    assert not torch.isin(masked[chosen], torch.tensor(special)).any()  # random draws avoid specials too


def test_sample_negatives_follows_the_masked_softmax():
    similarity = torch.tensor([[3.0, 1.0, 2.0, 0.0]]).repeat(20000, 1)
    excluded = torch.zeros_like(similarity, dtype=torch.bool)
    excluded[:, 3] = True
    picks = sample_negatives(similarity, torch.zeros(20000, dtype=torch.long), excluded, torch.rand(20000))
    counts = torch.bincount(picks, minlength=4).float() / len(picks)
    want = torch.tensor([0.0, 1.0, 2.718281828, 0.0]) / (1 + 2.718281828)
    torch.testing.assert_close(counts, want, atol=0.015, rtol=0)


def test_sample_negatives_without_admissible_candidate_draws_another_row():
    picks = sample_negatives(torch.zeros(50, 3), torch.ones(50, dtype=torch.long),
                             torch.ones(50, 3, dtype=torch.bool), torch.rand(50))
    assert set(picks.tolist()) <= {0, 2}


def test_caption_hashes_equal_exactly_for_equal_captions():
    model = fusion_model()
    keys = caption_hashes(model.tokenizer(CAPTIONS))
    assert keys[0] == keys[2] and len(set(keys.tolist())) == len(CAPTIONS) - 1


def test_itm_loss_equals_cross_entropy_of_the_pairs_it_draws():
    model = fusion_model()
    images, tokens = torch.randn(8, 3, 64, 64).double(), model.tokenizer(CAPTIONS)
    out = model(images, tokens)
    got = image_text_matching(model, out, tokens, seed=3)
    # the same draw, by hand
    uniform = torch.rand(2, 8, generator=torch.Generator().manual_seed(3))
    same = caption_hashes(tokens)[:, None] == caption_hashes(tokens)[None]
    scale = out.logit_scale.detach()
    neg_text = sample_negatives(scale * out.image_features @ out.text_features.T, torch.arange(8), same, uniform[0])
    neg_image = sample_negatives(scale * out.text_features @ out.image_features.T, torch.arange(8), same, uniform[1])
    assert not (neg_text == torch.arange(8)).any() and not same[torch.arange(8), neg_text].any()
    logits = []
    for image, text in [(torch.arange(8), torch.arange(8)), (torch.arange(8), neg_text), (neg_image, torch.arange(8))]:
        fused = model.fusion(out.image_tokens[image], out.text_tokens[text], out.text_padding[text],
                             out.text_cls_index[text])
        logits.append(model.heads["itm"](fused.cls))
    want = F.cross_entropy(torch.cat(logits), torch.tensor([1] * 8 + [0] * 16))
    torch.testing.assert_close(got.loss, want)


def test_itm_data_negatives_add_no_match_pairs_and_positive_aware_mining_skips_near_positives():
    model = fusion_model()
    images, tokens = torch.randn(8, 3, 64, 64).double(), model.tokenizer(CAPTIONS)
    out = model(images, tokens)
    negatives, owner = model.tokenizer(["a blue circle.", "a red square above a star."]), torch.tensor([0, 1])
    base = image_text_matching(model, out, tokens, seed=3)
    more = image_text_matching(model, out, tokens, seed=3, data_negatives=(negatives, owner))
    text, padding, cls = model.encode_text_tokens(negatives)
    logits = model.heads["itm"](model.fusion(out.image_tokens[owner], text, padding, cls).cls)
    extra = F.cross_entropy(logits, torch.zeros(2, dtype=torch.long), reduction="sum")
    torch.testing.assert_close(more.loss, (base.loss * 24 + extra) / 26)  # 3B + M pairs


def test_positive_aware_mining_skips_candidates_close_to_the_positive():
    cosines = torch.tensor([[0.9, 0.5, 0.77, 0.75], [0.1, -0.2, 0.0, 0.3]])
    near = near_positives(cosines, torch.tensor([0.8, -0.5]), 0.95)
    assert near.tolist() == [[True, False, True, False], [True, False, False, True]]


def test_mlm_predicts_only_masked_tokens_and_learns():
    model = fusion_model()
    images, tokens = torch.randn(8, 3, 64, 64).double(), model.tokenizer(CAPTIONS)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for step in range(30):
        out = model(images, tokens)
        result = masked_language_modelling(model, out, tokens, probability=0.3,
                                           generator=torch.Generator().manual_seed(step % 3))
        optimizer.zero_grad()
        result.loss.backward()
        optimizer.step()
        losses.append(result.loss.item())
    assert losses[0] > 9.0  # log(49409) = 10.8: chance over the vocabulary
    assert losses[-1] < 0.5 * losses[0]  # memorises the three maskings: the head and [MASK] row work


# -- 2 gloo ranks ---------------------------------------------------------------------------------
class ITMObjective(nn.Module):
    """The ITM loss as a module, so DDP synchronises its gradients."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, images, tokens):
        out = self.model(images, tokens)
        return image_text_matching(self.model, out, tokens, seed=11)


def _itm_worker(rank, world, init_method, inputs, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    model = fusion_model()
    model.load_state_dict(inputs["state"])
    ddp = DistributedDataParallel(ITMObjective(model), find_unused_parameters=True)  # the MLM head rests
    rows = slice(rank * 4, (rank + 1) * 4)
    result = ddp(inputs["images"][rows], inputs["tokens"][rows])
    result.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    torch.save({"loss": result.loss.detach(), "grads": grads}, f"{out_dir}/rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.timeout(300)
def test_itm_across_two_ranks_equals_one_process_with_the_global_batch(tmp_path):
    model = fusion_model()
    inputs = {"state": model.state_dict(), "images": torch.randn(8, 3, 64, 64).double(),
              "tokens": model.tokenizer(CAPTIONS)}
    mp.spawn(_itm_worker, args=(2, f"file://{tmp_path}/init", inputs, str(tmp_path)), nprocs=2)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    want = ITMObjective(model)(inputs["images"], inputs["tokens"]).loss
    want.backward()
    torch.testing.assert_close(sum(r["loss"] for r in results) / 2, want.detach(), rtol=1e-9, atol=1e-12)
    for name, p in model.named_parameters():
        if p.grad is not None:
            for r in results:
                torch.testing.assert_close(r["grads"][name], p.grad, rtol=1e-7, atol=1e-10, msg=name)
