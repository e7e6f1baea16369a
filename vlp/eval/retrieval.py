"""Image-text retrieval recall@k from paired embeddings, computed in chunks of queries."""

import torch


def _ranks(queries, candidates, chunk_size):
    """Rank of each query's match (candidate with the same index) among all candidates.

    The rank is the number of candidates scoring strictly higher than the match, so ties are
    resolved in favour of the match (optimistic) and the best possible rank is 0.

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
        pos = sims[rows, rows + start]  # (B,) the match, read from the same matmul as the rest
        ranks.append((sims > pos[:, None]).sum(dim=1))  # (B,)
    return torch.cat(ranks)  # (N,)


@torch.no_grad()
def retrieval_metrics(image_features, text_features, ks=(1, 5, 10), chunk_size=1024):
    """Image-to-text and text-to-image recall@k for N paired embeddings.

    A query counts as a hit at k if fewer than k candidates score strictly higher than its match
    (ties favour the match). Recall@k with k >= N is therefore 1.0.

    Args:
        image_features: (N, D) L2-normalised image embeddings.
        text_features: (N, D) L2-normalised text embeddings; row i is the caption of image i.
        ks: Cut-offs k for recall@k.
        chunk_size: Queries scored at once, bounding memory to O(chunk_size * N).

    Returns:
        Python floats in [0, 1]: "i2t_r@k" and "t2i_r@k" for each k, and "retrieval_mean_r", the
        mean of all those recalls.
    """
    assert image_features.shape == text_features.shape, (image_features.shape, text_features.shape)
    metrics = {}
    for name, queries, candidates in (("i2t", image_features, text_features),
                                      ("t2i", text_features, image_features)):
        ranks = _ranks(queries, candidates, chunk_size)  # (N,)
        for k in ks:
            metrics[f"{name}_r@{k}"] = (ranks < k).float().mean().item()
    metrics["retrieval_mean_r"] = sum(metrics.values()) / len(metrics)
    return metrics
