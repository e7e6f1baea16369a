"""ITM re-ranked retrieval hits and hard-negative accuracy, on hand-made scores."""
import pytest
import torch

from vlp.eval import hard_negative_correct, rerank_hits


def test_rerank_hits_rescoring_fixes_the_order():
    similarity = torch.tensor([[0.5, 0.9, 0.1], [0.9, 0.8, 0.0], [0.0, 0.1, 0.2]])
    itm = torch.tensor([[5.0, 1.0, 0.0], [2.0, 3.0, 0.0], [9.0, 9.0, 1.0]])  # (query, candidate)
    hits = rerank_hits(similarity, torch.arange(3), lambda q, c: itm[q, c], k=2)
    # 0: top-2 {1, 0}, ITM prefers 0: hit; 1: top-2 {0, 1}, ITM prefers 1: hit;
    # 2: top-2 {2, 1}, ITM prefers 1: miss
    assert hits.tolist() == [True, True, False]


def test_rerank_match_outside_top_k_and_ties_are_misses():
    similarity = torch.tensor([[0.1, 0.9, 0.8], [0.5, 0.5, 0.0], [0.0, 0.0, 1.0]])
    constant = lambda q, c: torch.zeros(len(q))  # a collapsed ITM head
    assert rerank_hits(similarity, torch.arange(3), constant, k=2).tolist() == [False, False, False]


def test_rerank_rejects_non_finite_scores():
    with pytest.raises(ValueError, match="non-finite"):
        rerank_hits(torch.eye(2), torch.arange(2), lambda q, c: torch.full((len(q),), float("nan")), k=2)


def test_hard_negative_ties_count_as_wrong_and_nan_fails():
    assert hard_negative_correct(torch.tensor([1.0, 0.5, 0.2]), torch.tensor([0.0, 0.5, 0.3])).tolist() == [
        True, False, False]
    with pytest.raises(ValueError, match="diverged"):
        hard_negative_correct(torch.tensor([float("nan")]), torch.tensor([0.0]))
