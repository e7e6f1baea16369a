import math

import open_clip
import pytest
import torch
import torch.nn.functional as F

from vlp.eval import heldout_masks, zeroshot_classifier, zeroshot_metrics

CLASSNAMES = ["cat", "dog", "airplane", "red car", "tree"]
TEMPLATES = ["a photo of a {}.", "a drawing of the {}.", lambda c: f"itap of a {c}."]


@pytest.fixture(scope="module")
def tower():
    """A tiny, randomly initialised open_clip model and the bundled BPE tokenizer (no download)."""
    torch.manual_seed(0)
    model = open_clip.model.CLIP(
        embed_dim=32,
        vision_cfg=dict(image_size=32, layers=1, width=32, patch_size=16, head_width=16),
        text_cfg=dict(context_length=16, vocab_size=49408, width=32, heads=2, layers=1),
    ).eval()
    return model, open_clip.tokenizer.SimpleTokenizer(context_length=16)


def scaled(encode_text):
    """Wrap encode_text so each prompt's feature gets a different, content-dependent norm."""
    return lambda tokens: encode_text(tokens) * (1 + tokens.sum(dim=1, keepdim=True) % 7)


def bruteforce(encode_text, tokenizer, classnames, templates):
    rows = []
    for c in classnames:
        feats = []
        for t in templates:
            text = t(c) if callable(t) else t.format(c)
            feats.append(F.normalize(encode_text(tokenizer([text]))[0], dim=-1))  # (D,)
        rows.append(F.normalize(torch.stack(feats).mean(dim=0), dim=-1))
    return torch.stack(rows)  # (C, D)


@pytest.mark.parametrize("batch_size", [1, 4, 256])  # 15 prompts: 4 splits classes mid-way
def test_classifier_matches_bruteforce(tower, batch_size):
    model, tokenizer = tower
    calls = []
    encode = scaled(model.encode_text)

    def counting(tokens):
        calls.append(len(tokens))
        return encode(tokens)

    got = zeroshot_classifier(counting, tokenizer, CLASSNAMES, TEMPLATES, batch_size=batch_size)
    with torch.no_grad():
        want = bruteforce(encode, tokenizer, CLASSNAMES, TEMPLATES)
    n = len(CLASSNAMES) * len(TEMPLATES)
    assert got.shape == (len(CLASSNAMES), 32)
    assert len(calls) == math.ceil(n / batch_size) and sum(calls) == n
    assert torch.allclose(got, want, atol=1e-6)
    assert torch.allclose(got.norm(dim=-1), torch.ones(len(CLASSNAMES)), atol=1e-6)
    assert not got.requires_grad


def test_classifier_normalises_each_prompt_before_averaging(tower):
    model, tokenizer = tower
    encode = scaled(model.encode_text)
    with torch.no_grad():
        raw = encode(tokenizer([t.format("cat") for t in TEMPLATES[:2]]))  # (2, D)
    # the rescaling is not a no-op: averaging raw features would point elsewhere
    assert not torch.allclose(F.normalize(raw.mean(dim=0), dim=0),
                              F.normalize(F.normalize(raw, dim=-1).mean(dim=0), dim=0), atol=1e-4)
    plain = zeroshot_classifier(model.encode_text, tokenizer, CLASSNAMES, TEMPLATES, batch_size=4)
    rescaled = zeroshot_classifier(encode, tokenizer, CLASSNAMES, TEMPLATES)
    assert torch.allclose(plain, rescaled, atol=1e-6)


def test_classifier_single_template_is_normalised_encoding(tower):
    model, tokenizer = tower
    got = zeroshot_classifier(model.encode_text, tokenizer, CLASSNAMES, ["{}"])
    with torch.no_grad():
        want = F.normalize(model.encode_text(tokenizer(CLASSNAMES)), dim=-1)
    assert torch.allclose(got, want, atol=1e-6)


def test_metrics_known_ranks():
    classifier = torch.eye(6)  # (C, D)
    # every image scores the classes in order 0 > 1 > ... > 5, so the rank of class c is c
    image = F.normalize(torch.tensor([6.0, 5, 4, 3, 2, 1]), dim=0).expand(6, 6)  # (N, D)
    labels = torch.tensor([0, 1, 4, 5, 2, 0])
    got = zeroshot_metrics(image, labels, classifier, ks=(1, 3, 5, 10))
    assert got == pytest.approx({"zeroshot_top1": 2 / 6, "zeroshot_top3": 4 / 6,
                                 "zeroshot_top5": 5 / 6, "zeroshot_top10": 1.0})
    assert all(type(v) is float for v in got.values())


def test_metrics_default_keys_and_ties():
    # a collapsed model (all logits tie) scores what the constant guess "0, 1, 2, ..." would
    image = F.normalize(torch.ones(4, 3), dim=-1)
    got = zeroshot_metrics(image, torch.tensor([0, 1, 2, 1]), torch.eye(3), ks=(1, 2, 5))
    assert got == {"zeroshot_top1": 1 / 4, "zeroshot_top2": 3 / 4, "zeroshot_top5": 1.0}
    assert set(zeroshot_metrics(image, torch.tensor([0, 1, 2, 1]), torch.eye(3))) == {"zeroshot_top1",
                                                                                      "zeroshot_top5"}


def test_nan_features_fail_instead_of_scoring():
    image = torch.full((4, 3), float("nan"))
    with pytest.raises(FloatingPointError, match="image_features hold NaN or inf in 4 of 4 rows"):
        zeroshot_metrics(image, torch.tensor([0, 1, 2, 1]), torch.eye(3))
    with pytest.raises(FloatingPointError, match="classifier"):
        zeroshot_metrics(torch.eye(3), torch.tensor([0, 1, 2]), torch.full((3, 3), float("inf")))


def test_metrics_match_topk():
    g = torch.Generator().manual_seed(0)
    image = F.normalize(torch.randn(200, 16, generator=g), dim=-1)
    classifier = F.normalize(torch.randn(10, 16, generator=g), dim=-1)
    labels = torch.randint(0, 10, (200,), generator=g)
    got = zeroshot_metrics(image, labels, classifier, ks=(1, 5))
    top = (image @ classifier.T).topk(5, dim=1).indices  # (N, 5)
    for k in (1, 5):
        want = (top[:, :k] == labels[:, None]).any(dim=1).float().mean().item()
        assert got[f"zeroshot_top{k}"] == pytest.approx(want)
    assert 0 < got["zeroshot_top1"] < got["zeroshot_top5"] < 1


def test_heldout_masks_split_the_labels_only_when_both_parts_are_present():
    labels = torch.tensor([3, 0, 7, 3, 1])
    masks = heldout_masks(labels, {3, 9})
    assert masks["heldout"].tolist() == [True, False, False, True, False]
    assert masks["seen"].tolist() == [False, True, True, False, True]
    assert heldout_masks(labels, {0, 1, 3, 7}) == {} and heldout_masks(labels, set()) == {}
