"""CLIP's symmetric InfoNCE loss and SigLIP's sigmoid loss, exact under data parallelism."""

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlp.distributed import all_gather_with_grad, ring_exchange_with_grad, world_info


class ContrastiveOutput(NamedTuple):
    """Result of contrastive_loss.

    Attributes:
        loss: Scalar, mean of image_loss and text_loss.
        image_loss: Scalar cross-entropy of image->text logits.
        text_loss: Scalar cross-entropy of text->image logits.
        accuracy: Scalar image->text top-1 accuracy of this rank's rows, detached.
    """

    loss: Tensor
    image_loss: Tensor
    text_loss: Tensor
    accuracy: Tensor


def contrastive_loss(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: Tensor,
    *,
    label_smoothing: float = 0.0,
) -> ContrastiveOutput:
    """Symmetric cross-entropy between matching image and text features (CLIP's InfoNCE).

    When torch.distributed runs W > 1 ranks, features are gathered from all ranks with
    gradient and each rank scores its own B image rows against all W*B texts and its own
    B text rows against all W*B images (labels arange(B) + rank*B); a rank never builds
    more than (B, W*B) logits. Contract: W ranks with batch B each give the same loss
    (mean over ranks) and, after DDP's gradient averaging, the same gradients as a single
    process with the concatenated batch of W*B. Batch sizes must be equal on all ranks.

    Args:
        image_features: (B, D) L2-normalised image embeddings.
        text_features: (B, D) L2-normalised text embeddings; row i matches image row i.
        logit_scale: Scalar multiplier of the cosine similarities (already exponentiated).
        label_smoothing: Passed to F.cross_entropy for both directions.

    Returns:
        ContrastiveOutput with the loss, both directions and the local top-1 accuracy.
    """
    rank, world = world_info()
    B, D = image_features.shape
    if world > 1:  # one collective for both modalities
        both = all_gather_with_grad(torch.cat([image_features, text_features], dim=1))  # (W*B, 2D)
        all_image, all_text = both.split(D, dim=1)  # (W*B, D) each
    else:
        all_image, all_text = image_features, text_features
    logits_per_image = logit_scale * image_features @ all_text.T  # (B, W*B)
    logits_per_text = logit_scale * text_features @ all_image.T  # (B, W*B)
    labels = torch.arange(B, device=image_features.device) + rank * B  # (B,)
    image_loss = F.cross_entropy(logits_per_image, labels, label_smoothing=label_smoothing)
    text_loss = F.cross_entropy(logits_per_text, labels, label_smoothing=label_smoothing)
    accuracy = (logits_per_image.detach().argmax(dim=1) == labels).float().mean()
    return ContrastiveOutput((image_loss + text_loss) / 2, image_loss, text_loss, accuracy)


class ContrastiveLoss(nn.Module):
    """Module form of contrastive_loss, for configs to instantiate.

    Args:
        label_smoothing: Passed to contrastive_loss.
    """

    def __init__(self, label_smoothing: float = 0.0):
        super().__init__()
        self.label_smoothing = label_smoothing

    def forward(
        self, image_features: Tensor, text_features: Tensor, logit_scale: Tensor
    ) -> ContrastiveOutput:
        """Returns contrastive_loss(image_features, text_features, logit_scale)."""
        return contrastive_loss(
            image_features, text_features, logit_scale, label_smoothing=self.label_smoothing
        )

    def extra_repr(self) -> str:
        return f"label_smoothing={self.label_smoothing}"


class SigmoidOutput(NamedTuple):
    """Result of sigmoid_loss.

    Attributes:
        loss: Scalar, the sum of the pairwise sigmoid losses over this rank's batch size.
        accuracy: Scalar fraction of this rank's matching pairs with a positive logit, detached.
    """

    loss: Tensor
    accuracy: Tensor


def sigmoid_loss(
    image_features: Tensor, text_features: Tensor, logit_scale: Tensor, logit_bias: Tensor
) -> SigmoidOutput:
    """SigLIP's loss: every image-text pair is its own binary match / no-match decision.

    Logits are logit_scale * image @ text.T + logit_bias, labels +1 for matching pairs and
    -1 for all others, and the loss is -sum(log_sigmoid(labels * logits)) / B, as in the
    SigLIP paper and open_clip's SigLipLoss.

    When torch.distributed runs W > 1 ranks, text features travel around the ring of ranks
    (ring_exchange_with_grad) and each rank scores its B images against its own B texts,
    then against each other rank's B texts in turn (all negatives), adding up the loss as
    blocks arrive; no rank builds a (W*B, W*B) matrix or gathers all texts at once (autograd
    keeps each block and its (B, B) logits for the backward). Each rank divides its sum
    over B*W*B pairs by its own B, so the ranks' losses add up to W times the single-process
    loss (its (W*B)**2 pairs over W*B), and the exchange's backward gives each rank the
    gradients of that sum. Contract: W ranks with batch B each give the same loss (mean
    over ranks) and, after DDP's gradient averaging, the same gradients as a single process
    with the concatenated batch of W*B. Batch sizes must be equal on all ranks.

    Args:
        image_features: (B, D) L2-normalised image embeddings.
        text_features: (B, D) L2-normalised text embeddings; row i matches image row i.
        logit_scale: Scalar multiplier of the cosine similarities (already exponentiated).
        logit_bias: Scalar added to every logit.

    Returns:
        SigmoidOutput with the loss and the local accuracy on matching pairs.
    """
    B = image_features.shape[0]
    image = logit_scale * image_features  # (B, D), scaled once for all text blocks
    logits = image @ text_features.T + logit_bias  # (B, B)
    labels = 2 * torch.eye(B, device=logits.device, dtype=logits.dtype) - 1  # (B, B)
    loss = -F.logsigmoid(labels * logits).sum()
    for other in ring_exchange_with_grad(text_features):  # (B, D) from each other rank
        loss = loss - F.logsigmoid(-(image @ other.T + logit_bias)).sum()
    accuracy = (logits.detach().diagonal() > 0).float().mean()
    return SigmoidOutput(loss / B, accuracy)


class SigmoidLoss(nn.Module):
    """Module form of sigmoid_loss, for configs to instantiate."""

    def forward(
        self, image_features: Tensor, text_features: Tensor, logit_scale: Tensor, logit_bias: Tensor
    ) -> SigmoidOutput:
        """Returns sigmoid_loss(image_features, text_features, logit_scale, logit_bias)."""
        return sigmoid_loss(image_features, text_features, logit_scale, logit_bias)
