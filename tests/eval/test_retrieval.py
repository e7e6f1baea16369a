import pytest
import torch
import torch.nn.functional as F

from vlp.eval import retrieval_metrics


def reference(image, text, ks):
    """Full N x N similarity matrix + stable argsort; rank = position of the match in the sorted row."""
    sims = image @ text.T  # (N, N)
    out = {}
    for name, s in (("i2t", sims), ("t2i", sims.T)):
        order = s.argsort(dim=1, descending=True, stable=True)  # (N, N)
        ranks = (order == torch.arange(len(s))[:, None]).float().argmax(dim=1)  # (N,)
        for k in ks:
            out[f"{name}_r@{k}"] = (ranks < k).float().mean().item()
    out["retrieval_mean_r"] = sum(out.values()) / len(out)
    return out


def paired(n, d, noise, seed=0):
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(n, d, generator=g, dtype=torch.float64)
    text = image + noise * torch.randn(n, d, generator=g, dtype=torch.float64)
    return F.normalize(image, dim=-1), F.normalize(text, dim=-1)


@pytest.mark.parametrize("chunk_size", [1, 7, 37, 1024])  # 37 % 7 != 0; 1024 > N
def test_matches_bruteforce(chunk_size):
    image, text = paired(37, 16, noise=1.5)
    ks = (1, 5, 10, 100)
    got = retrieval_metrics(image, text, ks=ks, chunk_size=chunk_size)
    want = reference(image, text, ks)
    assert got.keys() == want.keys()
    assert got == pytest.approx(want, abs=1e-12)
    assert 0 < got["i2t_r@1"] < got["i2t_r@10"] < 1  # a non-trivial case
    assert got["i2t_r@100"] == got["t2i_r@100"] == 1.0  # k > N is clipped
    assert all(type(v) is float for v in got.values())


def test_default_keys():
    image, text = paired(12, 8, noise=1.0)
    got = retrieval_metrics(image.float(), text.float())
    recalls = {f"{d}_r@{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)}
    assert set(got) == recalls | {"retrieval_mean_r"}
    assert got["retrieval_mean_r"] == pytest.approx(sum(got[k] for k in recalls) / 6)


def test_identical_pairs_are_perfect():
    image = F.normalize(torch.randn(50, 32), dim=-1)
    got = retrieval_metrics(image, image.clone(), chunk_size=16)
    assert all(v == 1.0 for v in got.values())


def test_permuted_texts_known_recall():
    # image i = e_i, text j = e_perm[j]: a fixed point's match scores 1 and ranks first; any other
    # match scores 0 behind the one candidate scoring 1 and behind the tied zeros before it (each
    # non-fixed point has one at index 0 or 1), so it is never in the top 2.
    perm = torch.tensor([0, 2, 1, 3, 5, 6, 4, 7])  # fixed points: 0, 3, 7
    image, text = torch.eye(8), torch.eye(8)[perm]
    got = retrieval_metrics(image, text, ks=(1, 2), chunk_size=3)
    assert got == {"i2t_r@1": 3 / 8, "i2t_r@2": 3 / 8, "t2i_r@1": 3 / 8, "t2i_r@2": 3 / 8,
                   "retrieval_mean_r": 3 / 8}
    assert got == reference(image, text, (1, 2))


def test_a_collapsed_model_scores_chance():
    # every similarity is equal: ties go by position, so query i ranks its match i-th
    feats = F.normalize(torch.ones(8, 4), dim=-1)
    got = retrieval_metrics(feats, feats, ks=(1, 4), chunk_size=3)
    assert got["i2t_r@1"] == got["t2i_r@1"] == 1 / 8
    assert got["i2t_r@4"] == got["t2i_r@4"] == 4 / 8


def test_ties_break_by_position_like_a_stable_argsort():
    image, text = paired(20, 4, noise=0.5)
    text[::3] = text[0]  # a tie block: rows 0, 3, 6, ... share one caption embedding
    got = retrieval_metrics(image, text, ks=(1, 2, 5), chunk_size=6)
    for name, sims in (("i2t", image @ text.T), ("t2i", text @ image.T)):
        order = sims.argsort(dim=1, descending=True, stable=True)  # (N, N)
        ranks = (order == torch.arange(20)[:, None]).float().argmax(dim=1)
        for k in (1, 2, 5):
            assert got[f"{name}_r@{k}"] == pytest.approx((ranks < k).float().mean().item())


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_features_fail_instead_of_scoring(bad):
    image, text = paired(10, 4, noise=0.1)
    image[3, 1] = bad
    with pytest.raises(FloatingPointError, match=r"image_features hold NaN or inf in 1 of 10 rows"):
        retrieval_metrics(image, text)
    with pytest.raises(FloatingPointError, match="text_features"):
        retrieval_metrics(text, torch.full_like(text, bad))


def test_reversed_texts_known_recall():
    # Points at equally spaced angles on a quarter circle, texts in reverse order, so the match of
    # image i is the point N-1-i, d = |2i - (N-1)| steps away. Its rank is the number of points
    # fewer than d steps from i, plus the point d steps away on the other side when it comes
    # first (a tie, for i = 2): ranks [5, 4, 2, 1, 4, 5] for N = 6.
    angles = torch.linspace(0, torch.pi / 2, 6, dtype=torch.float64)
    image = torch.stack([angles.cos(), angles.sin()], dim=1)  # (N, 2)
    got = retrieval_metrics(image, image.flip(0), ks=(1, 2, 5, 6), chunk_size=4)
    for d in ("i2t", "t2i"):
        assert [got[f"{d}_r@{k}"] for k in (1, 2, 5, 6)] == pytest.approx([0, 1 / 6, 4 / 6, 1])
