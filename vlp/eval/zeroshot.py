"""Zero-shot classification: class prototypes from prompt templates, and top-k accuracy."""

import torch
import torch.nn.functional as F

from vlp.eval.finite import require_finite


@torch.no_grad()
def zeroshot_classifier(encode_text, tokenizer, classnames, templates, batch_size=256):
    """Build one normalised text prototype per class by averaging over prompt templates.

    Every (class, template) prompt is encoded and L2-normalised, the prompts of a class are
    averaged and the mean is normalised again. Prompts of all classes are batched together, so
    encode_text is called ceil(C * T / batch_size) times.

    Args:
        encode_text: Maps (n, L) token ids to (n, D) text features, not necessarily normalised.
            Tokens arrive on the CPU; move them to the model's device inside this callable.
        tokenizer: Maps a list of strings to (n, L) token ids, e.g. an open_clip tokenizer.
        classnames: C class names.
        templates: T prompt templates, each a format string with one "{}" or a callable
            taking the class name.
        batch_size: Prompts encoded per call.

    Returns:
        (C, D) L2-normalised zero-shot classifier weights.
    """
    texts = [t(c) if callable(t) else t.format(c) for c in classnames for t in templates]
    feats = torch.cat([
        F.normalize(encode_text(tokenizer(texts[i:i + batch_size])), dim=-1)  # (B, D)
        for i in range(0, len(texts), batch_size)
    ])  # (C * T, D), class-major
    feats = feats.view(len(classnames), len(templates), -1).mean(dim=1)  # (C, D)
    return F.normalize(feats, dim=-1)


@torch.no_grad()
def zeroshot_metrics(image_features, labels, classifier, ks=(1, 5)):
    """Zero-shot top-k accuracy.

    An image is correct at k if its true class is among the first k of a stable descending sort
    of the class scores (ties go to the lower class index, as in retrieval_metrics), so a
    collapsed model scores what the constant guess "class 0" would. Top-k with k >= C is 1.0.

    Args:
        image_features: (N, D) L2-normalised image embeddings.
        labels: (N,) long class indices into classifier.
        classifier: (C, D) class prototypes, e.g. from zeroshot_classifier.
        ks: Cut-offs k for top-k accuracy.

    Returns:
        Python floats in [0, 1]: "zeroshot_top{k}" for each k.

    Raises:
        FloatingPointError: features or classifier hold NaN or inf (a diverged model).
    """
    require_finite(image_features=image_features, classifier=classifier)
    logits = image_features @ classifier.T  # (N, C)
    labels = labels.to(logits.device)[:, None]  # (N, 1)
    pos = logits.gather(1, labels)  # (N, 1)
    earlier = torch.arange(logits.shape[1], device=logits.device)[None, :] < labels  # (N, C)
    ranks = ((logits > pos) | ((logits == pos) & earlier)).sum(dim=1)  # (N,)
    return {f"zeroshot_top{k}": (ranks < k).float().mean().item() for k in ks}


def heldout_masks(labels: torch.Tensor, heldout) -> dict[str, torch.Tensor]:
    """{"heldout": mask, "seen": mask} over `labels` in and not in the label set `heldout`, when
    both parts hold samples; {} otherwise (one part alone is the whole metric already)."""
    is_heldout = torch.isin(labels, torch.tensor(sorted(heldout), dtype=labels.dtype, device=labels.device))
    if is_heldout.all() or not is_heldout.any():
        return {}
    return {"heldout": is_heldout, "seen": ~is_heldout}
