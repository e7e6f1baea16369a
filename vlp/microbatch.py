"""Contrastive-exact micro-batching with a feature cache (GradCache; Gao et al., 2021).

Gradient accumulation changes a contrastive objective: each micro-batch only sees its own
negatives. Here the loss is computed once over the whole batch (and, through the loss, over
all ranks) on features encoded without gradient; then each micro-batch is encoded again with
gradient and back-propagated with its slice of the cached feature gradients. The result is
the full-batch gradient at the activation memory of one micro-batch, for the price of one
extra forward pass.
"""
from contextlib import nullcontext
from typing import Callable, ContextManager, NamedTuple

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from vlp.models.model import VLPOutput


class _RngState(NamedTuple):
    """Random state, so the second encoding draws the same dropout masks as the first."""

    cpu: Tensor
    cuda: list

    @classmethod
    def capture(cls) -> "_RngState":
        return cls(torch.get_rng_state(), torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [])

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda:
            torch.cuda.set_rng_state_all(self.cuda)


def _at_least_float32(t: Tensor) -> Tensor:
    return t.to(torch.promote_types(t.dtype, torch.float32))


def check_micro_batchable(model: nn.Module) -> None:
    """Raises ValueError, in one line, if micro-batching cannot give `model` its full-batch gradient.

    BatchNorm normalises each micro-batch with that micro-batch's statistics, and its
    gradient couples the rows of the whole batch, which a feature cache cannot reproduce.
    """
    norms = [name for name, m in model.named_modules() if isinstance(m, _BatchNorm)]
    if norms:
        raise ValueError(
            f"micro_batch_size cannot be used with BatchNorm layers ({len(norms)}, e.g. {norms[0]}): each micro-batch "
            "would be normalised with its own statistics, so the gradient would not be the full batch's; use a "
            "tower without BatchNorm (e.g. model=clip_micro) or freeze them (model.lock_image=true "
            "model.lock_image_freeze_bn_stats=true)")


def feature_cached_backward(
    model: Callable[[Tensor, Tensor], VLPOutput],
    loss_fn: Callable,
    images: Tensor,
    tokens: Tensor,
    micro_batch_size: int,
    backward: Callable[[Tensor], None] = Tensor.backward,
    no_sync: Callable[[], ContextManager] = nullcontext,
    loss_scale: float = 1.0,
):
    """Accumulates the gradient of `loss_fn` over the whole batch, one micro-batch at a time.

    Args:
        model: (images, tokens) -> VLPOutput; under DDP the DDP-wrapped model.
        loss_fn: (image_features, text_features, logit_scale[, logit_bias]) -> output with `.loss`.
        images: (B, 3, H, W) batch.
        tokens: (B, L) batch.
        micro_batch_size: rows encoded with gradient at a time.
        backward: runs the backward of a scalar (Lightning: `manual_backward`).
        no_sync: context in which DDP skips its gradient all-reduce; every micro-batch but the
            last runs in it, so gradients are synchronised once per batch.
        loss_scale: float16 loss scale (a GradScaler's `get_scale()`): the loss's own backward
            runs scaled, so the feature gradients do not underflow in float16, and they are
            cached unscaled in float32. `backward` must scale its input the same way.

    The model must not hold BatchNorm layers (see `check_micro_batchable`).

    Returns:
        The loss output over the whole batch (detached).
    """
    chunks = list(zip(images.split(micro_batch_size), tokens.split(micro_batch_size)))
    states, outputs = [], []
    with torch.no_grad():
        for chunk_images, chunk_tokens in chunks:
            states.append(_RngState.capture())
            outputs.append(model(chunk_images, chunk_tokens))
    cached = [torch.cat([getattr(o, f) for o in outputs]).detach().requires_grad_() for f in
              ("image_features", "text_features")]  # (B, D) each
    logits = [t.detach().requires_grad_() for t in outputs[0].logit_args]  # scale[, bias]
    loss = loss_fn(*cached, *logits)
    (loss.loss * loss_scale).backward()  # feature gradients (a distributed loss's collectives run here)
    image_grads, text_grads = ((_at_least_float32(t.grad) / loss_scale).split(micro_batch_size) for t in cached)
    for i, ((chunk_images, chunk_tokens), state) in enumerate(zip(chunks, states)):
        last = i == len(chunks) - 1
        state.restore()
        with nullcontext() if last else no_sync():
            out = model(chunk_images, chunk_tokens)
            # a scalar whose gradient w.r.t. the parameters is the cached chain rule
            surrogate = (out.image_features * image_grads[i]).sum() + (out.text_features * text_grads[i]).sum()
            for value, cached_logit in zip(out.logit_args, logits):
                surrogate = surrogate + value * (_at_least_float32(cached_logit.grad) / loss_scale if last else 0.0)
            backward(surrogate)
    return type(loss)(*(t.detach() for t in loss))
