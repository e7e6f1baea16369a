"""Retrieval re-ranked by a fusion model's image-text matching score (ALBEF), and hard-negative accuracy."""
from typing import Callable

import torch
from torch import Tensor


@torch.no_grad()
def rerank_hits(similarity: Tensor, queries: Tensor, score: Callable[[Tensor, Tensor], Tensor], k: int) -> Tensor:
    """Whether each query's match wins after its top-k candidates are re-scored.

    Row i of `similarity` scores query i against all candidates; candidate i is its match. The
    top-k candidates by similarity are re-scored with `score`; a query is a hit when its match
    is among them and scores strictly above every other one (a tie counts against the match).

    Args:
        similarity: (N, N) contrastive similarities, queries x candidates.
        queries: (Q,) indices of the queries to evaluate (e.g. this rank's share).
        score: (query indices (P,), candidate indices (P,)) -> (P,) re-ranking scores.
        k: candidates re-scored per query.

    Returns:
        (Q,) bool hits.
    """
    k = min(k, similarity.shape[1])
    top = similarity[queries].topk(k, dim=1).indices  # (Q, k)
    scores = score(queries[:, None].expand_as(top).flatten(), top.flatten()).view_as(top).float()
    if not torch.isfinite(scores).all():
        raise ValueError("non-finite re-ranking scores: the model has diverged")
    is_match = top == queries[:, None]  # (Q, k)
    match_score = torch.where(is_match, scores, -torch.inf).amax(dim=1, keepdim=True)  # (Q, 1)
    beaten = ((scores >= match_score) & ~is_match).any(dim=1)
    return is_match.any(dim=1) & ~beaten


def hard_negative_correct(true_scores: Tensor, negative_scores: Tensor) -> Tensor:
    """(M,) bool: the true caption scores strictly above its hard negative (ties count as wrong).

    Raises:
        ValueError: a score is NaN or infinite (a diverged model must not look right).
    """
    if not (torch.isfinite(true_scores).all() and torch.isfinite(negative_scores).all()):
        raise ValueError("non-finite scores in hard-negative evaluation: the model has diverged")
    return true_scores > negative_scores
