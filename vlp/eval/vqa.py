"""VQA accuracy over answer scores (pure functions over tensors)."""
from collections import defaultdict
from typing import Sequence

import torch


def vqa_accuracy(logits: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """(N,) accuracy of each question's predicted answer: its score min(#humans / 3, 1).

    Args:
        logits: (N, K) classifier outputs over the answer vocabulary.
        scores: (N, K) VQA accuracy of each vocabulary answer (`vlp.data.vqa.answer_scores`).
    """
    return scores.gather(1, logits.argmax(dim=1, keepdim=True))[:, 0]


def vqa_metrics(accuracy: Sequence[float], answer_types: Sequence[str]) -> dict[str, float]:
    """`vqa_acc` over all questions and `vqa_acc_<type>` per answer type (types with a name only)."""
    if not accuracy:
        return {}
    by_type = defaultdict(list)
    for acc, answer_type in zip(accuracy, answer_types):
        if answer_type:
            by_type["".join(c if c.isalnum() else "_" for c in answer_type)].append(acc)
    metrics = {"vqa_acc": sum(accuracy) / len(accuracy)}
    metrics |= {f"vqa_acc_{t}": sum(v) / len(v) for t, v in sorted(by_type.items())}
    return metrics
