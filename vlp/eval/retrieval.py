"""Image-text retrieval recall@k from paired embeddings, computed in chunks of queries."""

import torch

from vlp.eval.finite import require_finite


def _ranks(queries, candidates, chunk_size):
    """Rank of each query's match (candidate with the same index) among all candidates.

    The rank is the match's position in a stable descending sort: candidates scoring higher, plus
    those scoring the same that come earlier. Ties never favour the match, so a collapsed model
    (all similarities equal) scores recall@k = k / N, chance.

    Args:
        queries: (N, D) normalised query embeddings.
        candidates: (N, D) normalised candidate embeddings; row i matches query i.
        chunk_size: Number of queries scored at once; memory is O(chunk_size * N).

    Returns:
        (N,) long tensor of ranks.
    """
    ranks = []
    for start in range(0, len(queries), chunk_size):
        sims = queries[start:start + chunk_size] @ candidates.T  # (B, N)
        rows = torch.arange(len(sims), device=sims.device)
        match = rows + start  # (B,) column of each query's match
        pos = sims[rows, match][:, None]  # (B, 1) the match, read from the same matmul as the rest
        earlier = torch.arange(sims.shape[1], device=sims.device)[None, :] < match[:, None]  # (B, N)
        ranks.append(((sims > pos) | ((sims == pos) & earlier)).sum(dim=1))  # (B,)
    return torch.cat(ranks)  # (N,)


@torch.no_grad()
def retrieval_metrics(image_features, text_features, ks=(1, 5, 10), chunk_size=1024):
    """Image-to-text and text-to-image recall@k for N paired embeddings.

    A query counts as a hit at k if its match is among the first k of a stable descending sort of
    the candidates (ties go to the earlier candidate, never to the match by default), so a
    collapsed model scores chance, k / N. Recall@k with k >= N is 1.0.

    Args:
        image_features: (N, D) L2-normalised image embeddings.
        text_features: (N, D) L2-normalised text embeddings; row i is the caption of image i.
        ks: Cut-offs k for recall@k.
        chunk_size: Queries scored at once, bounding memory to O(chunk_size * N).

    Returns:
        Python floats in [0, 1]: "i2t_r@k" and "t2i_r@k" for each k, and "retrieval_mean_r", the
        mean of all those recalls.

    Raises:
        FloatingPointError: the features hold NaN or inf (a diverged model).
    """
    assert image_features.shape == text_features.shape, (image_features.shape, text_features.shape)
    require_finite(image_features=image_features, text_features=text_features)
    metrics = {}
    for name, queries, candidates in (("i2t", image_features, text_features),
                                      ("t2i", text_features, image_features)):
        ranks = _ranks(queries, candidates, chunk_size)  # (N,)
        for k in ks:
            metrics[f"{name}_r@{k}"] = (ranks < k).float().mean().item()
    metrics["retrieval_mean_r"] = sum(metrics.values()) / len(metrics)
    return metrics
