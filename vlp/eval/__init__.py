"""Evaluation as pure functions over embeddings: retrieval recall@k (and its ITM re-ranking),
zero-shot accuracy and hard-negative accuracy."""

from vlp.eval.rerank import hard_negative_correct, rerank_hits
from vlp.eval.retrieval import retrieval_metrics
from vlp.eval.zeroshot import heldout_masks, zeroshot_classifier, zeroshot_metrics

__all__ = ["hard_negative_correct", "heldout_masks", "rerank_hits", "retrieval_metrics", "zeroshot_classifier", "zeroshot_metrics"]
