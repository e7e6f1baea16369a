"""Evaluation as pure functions over embeddings: retrieval recall@k and zero-shot accuracy."""

from vlp.eval.retrieval import retrieval_metrics
from vlp.eval.zeroshot import zeroshot_classifier, zeroshot_metrics

__all__ = ["retrieval_metrics", "zeroshot_classifier", "zeroshot_metrics"]
