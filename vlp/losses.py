"""CLIP's symmetric InfoNCE loss and SigLIP's sigmoid loss, exact under data parallelism.

Both are memory-lean at large batch: a custom autograd function scores a chunk of rows at
a time and keeps only its inputs and per-row statistics for the backward, which recomputes
each chunk's logits instead of keeping the (B, N) matrix and its softmax / log-sigmoid.
"""

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlp.distributed import all_gather_with_grad, ring_exchange_with_grad, world_info


def _chunks(n: int, size: int) -> list[slice]:
    """Slices of up to size rows covering range(n)."""
    return [slice(start, min(start + size, n)) for start in range(0, n, size)]


def _logits(queries: Tensor, keys: Tensor) -> Tensor:
    """queries @ keys.T in the matmul's dtype (autocast's, if on), then in at least float32."""
    logits = queries @ keys.T  # (C, N)
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def _matmul_dtype(a: Tensor, b: Tensor) -> torch.dtype:
    """The dtype of a @ b.T here: autocast's when it is on, which the backward is not."""
    return (a[:1] @ b[:1].T).dtype


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Per-row cross-entropy of queries @ keys.T with labels first_label + arange(B).

    The forward keeps the row log-sum-exps; the backward recomputes each chunk's logits once
    for softmax - target. Both passes multiply in the dtype the forward's matmul had, so the
    recomputed logits are the forward's also under autocast (which the backward runs without).
    """

    @staticmethod
    def forward(ctx, queries, keys, first_label, label_smoothing, chunk_size):
        B, N = queries.shape[0], keys.shape[0]
        labels = torch.arange(B, device=queries.device) + first_label  # (B,)
        losses, lses, preds = [], [], []
        for rows in _chunks(B, chunk_size):
            logits = _logits(queries[rows], keys)  # (C, N)
            lse = logits.logsumexp(dim=1)  # (C,)
            target = logits.gather(1, labels[rows, None]).squeeze(1)  # (C,)
            # smoothed target (1 - eps) * onehot + eps / N, as in F.cross_entropy
            smooth = label_smoothing * logits.mean(dim=1)  # (C,)
            losses.append(lse - (1 - label_smoothing) * target - smooth)
            lses.append(lse)
            preds.append(logits.argmax(dim=1))
        ctx.save_for_backward(queries, keys, labels, torch.cat(lses))
        ctx.dtype = _matmul_dtype(queries, keys)
        ctx.label_smoothing, ctx.chunk_size, ctx.num_classes = label_smoothing, chunk_size, N
        preds = torch.cat(preds)  # (B,)
        ctx.mark_non_differentiable(preds)
        return torch.cat(losses), preds

    @staticmethod
    def backward(ctx, grad_losses, _):
        queries, keys, labels, lse = ctx.saved_tensors
        q, k = queries.to(ctx.dtype), keys.to(ctx.dtype)
        grad_q = torch.empty_like(queries)
        grad_k = torch.zeros_like(keys, dtype=lse.dtype)
        for rows in _chunks(q.shape[0], ctx.chunk_size):
            g = _logits(q[rows], k).sub_(lse[rows, None]).exp_()  # (C, N) softmax
            g[torch.arange(g.shape[0], device=g.device), labels[rows]] -= 1 - ctx.label_smoothing
            g.sub_(ctx.label_smoothing / ctx.num_classes).mul_(grad_losses[rows, None])
            g = g.to(ctx.dtype)
            grad_q[rows] = g @ k
            grad_k += g.T @ q[rows]
        return grad_q, grad_k.to(keys.dtype), None, None, None


class _ChunkedSigmoid(torch.autograd.Function):
    """Sum over pairs of -log_sigmoid(label * (image @ text.T + bias)), a chunk of rows at a time.

    Labels are -1, except +1 on the diagonal when positives is set. Saves only the inputs;
    the backward recomputes each chunk's logits once, in the forward's matmul dtype.
    """

    @staticmethod
    def forward(ctx, image, text, bias, positives, chunk_size):
        loss = 0.0
        for rows in _chunks(image.shape[0], chunk_size):
            signed = _ChunkedSigmoid.signed(image[rows], text, bias, rows, positives)  # (C, N)
            loss = loss - F.logsigmoid(signed).sum()
        ctx.save_for_backward(image, text, bias)
        ctx.dtype = _matmul_dtype(image, text)
        ctx.positives, ctx.chunk_size = positives, chunk_size
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        image, text, bias = ctx.saved_tensors
        x, t = image.to(ctx.dtype), text.to(ctx.dtype)
        grad_x = torch.empty_like(image)
        grad_t = torch.zeros_like(text, dtype=torch.promote_types(ctx.dtype, torch.float32))
        grad_bias = 0.0
        for rows in _chunks(x.shape[0], ctx.chunk_size):
            # d(-log_sigmoid(y * z))/dz = -y * sigmoid(-y * z)
            g = _ChunkedSigmoid.signed(x[rows], t, bias, rows, ctx.positives).neg_().sigmoid_()
            if ctx.positives:  # (C, N)
                g.diagonal(rows.start).neg_()
            g.mul_(grad_loss)
            grad_bias += g.sum()
            g = g.to(ctx.dtype)
            grad_x[rows] = g @ t
            grad_t += g.T @ x[rows]
        return grad_x, grad_t.to(text.dtype), grad_bias.to(bias.dtype), None, None

    @staticmethod
    def signed(image: Tensor, text: Tensor, bias: Tensor, rows: slice, positives: bool) -> Tensor:
        """(C, N) label * logit for image rows `rows` of the block."""
        signed = _logits(image, text).add_(bias).neg_()  # (C, N)
        if positives:
            signed.diagonal(rows.start).neg_()
        return signed


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
    chunk_size: int = 4096,
) -> ContrastiveOutput:
    """Symmetric cross-entropy between matching image and text features (CLIP's InfoNCE).

    When torch.distributed runs W > 1 ranks, features are gathered from all ranks with
    gradient and each rank scores its own B image rows against all W*B texts and its own
    B text rows against all W*B images (labels arange(B) + rank*B); a rank never builds
    more than (B, W*B) logits. Contract: W ranks with batch B each give the same loss
    (mean over ranks) and, after DDP's gradient averaging, the same gradients as a single
    process with the concatenated batch of W*B. Batch sizes must be equal on all ranks.

    Each direction's logits are built chunk_size rows at a time and not kept: autograd saves
    the features and one log-sum-exp per row, and the backward recomputes each chunk's
    logits (one more matmul per direction), so at most a (chunk_size, W*B) matrix or two
    are alive at once instead of several (B, W*B) ones.

    Args:
        image_features: (B, D) L2-normalised image embeddings.
        text_features: (B, D) L2-normalised text embeddings; row i matches image row i.
        logit_scale: Scalar multiplier of the cosine similarities (already exponentiated).
        label_smoothing: As F.cross_entropy's, for both directions.
        chunk_size: Rows of logits computed at a time.

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
    args = (rank * B, label_smoothing, chunk_size)  # labels arange(B) + rank * B
    image_losses, preds = _ChunkedCrossEntropy.apply(logit_scale * image_features, all_text, *args)
    text_losses, _ = _ChunkedCrossEntropy.apply(logit_scale * text_features, all_image, *args)
    image_loss, text_loss = image_losses.mean(), text_losses.mean()  # (B,) -> scalar
    labels = torch.arange(B, device=image_features.device) + rank * B  # (B,)
    accuracy = (preds == labels).float().mean()
    return ContrastiveOutput((image_loss + text_loss) / 2, image_loss, text_loss, accuracy)


class ContrastiveLoss(nn.Module):
    """Module form of contrastive_loss, for configs to instantiate.

    Args:
        label_smoothing: Passed to contrastive_loss.
        chunk_size: Passed to contrastive_loss.
    """

    def __init__(self, label_smoothing: float = 0.0, chunk_size: int = 4096):
        super().__init__()
        self.label_smoothing, self.chunk_size = label_smoothing, chunk_size

    def forward(
        self, image_features: Tensor, text_features: Tensor, logit_scale: Tensor
    ) -> ContrastiveOutput:
        """Returns contrastive_loss(image_features, text_features, logit_scale)."""
        return contrastive_loss(
            image_features,
            text_features,
            logit_scale,
            label_smoothing=self.label_smoothing,
            chunk_size=self.chunk_size,
        )

    def extra_repr(self) -> str:
        return f"label_smoothing={self.label_smoothing}, chunk_size={self.chunk_size}"


class SigmoidOutput(NamedTuple):
    """Result of sigmoid_loss.

    Attributes:
        loss: Scalar, the sum of the pairwise sigmoid losses over this rank's batch size.
        accuracy: Scalar fraction of this rank's matching pairs with a positive logit, detached.
    """

    loss: Tensor
    accuracy: Tensor


def sigmoid_loss(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: Tensor,
    logit_bias: Tensor,
    *,
    chunk_size: int = 4096,
) -> SigmoidOutput:
    """SigLIP's loss: every image-text pair is its own binary match / no-match decision.

    Logits are logit_scale * image @ text.T + logit_bias, labels +1 for matching pairs and
    -1 for all others, and the loss is -sum(log_sigmoid(labels * logits)) / B, as in the
    SigLIP paper and open_clip's SigLipLoss.

    When torch.distributed runs W > 1 ranks, text features travel around the ring of ranks
    (ring_exchange_with_grad) and each rank scores its B images against its own B texts,
    then against each other rank's B texts in turn (all negatives), adding up the loss as
    blocks arrive; no rank builds a (W*B, W*B) matrix or gathers all texts at once. Each
    block's logits are built chunk_size rows at a time and not kept: autograd saves each
    block's features only and the backward recomputes the logits, so at most a (chunk_size,
    B) matrix or two are alive at once. Each rank divides its sum
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
        chunk_size: Rows of logits computed at a time.

    Returns:
        SigmoidOutput with the loss and the local accuracy on matching pairs.
    """
    B = image_features.shape[0]
    image = logit_scale * image_features  # (B, D), scaled once for all text blocks
    loss = _ChunkedSigmoid.apply(image, text_features, logit_bias, True, chunk_size)
    for other in ring_exchange_with_grad(text_features):  # (B, D) from each other rank
        loss = loss + _ChunkedSigmoid.apply(image, other, logit_bias, False, chunk_size)
    with torch.no_grad():
        accuracy = ((image * text_features).sum(dim=1) + logit_bias > 0).float().mean()
    return SigmoidOutput(loss / B, accuracy)


class SigmoidLoss(nn.Module):
    """Module form of sigmoid_loss, for configs to instantiate.

    Args:
        chunk_size: Passed to sigmoid_loss.
    """

    def __init__(self, chunk_size: int = 4096):
        super().__init__()
        self.chunk_size = chunk_size

    def forward(
        self, image_features: Tensor, text_features: Tensor, logit_scale: Tensor, logit_bias: Tensor
    ) -> SigmoidOutput:
        """Returns sigmoid_loss(image_features, text_features, logit_scale, logit_bias)."""
        return sigmoid_loss(
            image_features, text_features, logit_scale, logit_bias, chunk_size=self.chunk_size
        )

    def extra_repr(self) -> str:
        return f"chunk_size={self.chunk_size}"
