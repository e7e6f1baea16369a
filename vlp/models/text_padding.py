"""Text batches only as long as their longest caption, for text towers where that changes nothing.

open_clip pads every caption to the context length (77 for CLIP), and captions are short: most
of a text tower's work is on padding. In a causal text tower that pools at the end-of-text token
no position before it attends to what follows, so dropping the all-padding columns at the end of
a batch gives the same features and gradients for less work. The trainer trims each batch on the
host before it moves to the device (no synchronisation), to a multiple of 8 (tensor-core shapes,
and few distinct shapes for torch.compile); the tower takes its causal mask at the batch's length.
"""
import numpy as np
import torch
import torch.nn as nn
from open_clip.transformer import TextTransformer

MULTIPLE = 8


def trims_exactly(text_tower: nn.Module) -> bool:
    """Whether shorter batches give `text_tower` the same pooled features: an open_clip text
    transformer with a causal mask that pools at the end-of-text token, without a class token."""
    return (isinstance(text_tower, TextTransformer) and text_tower.attn_mask is not None
            and text_tower.cls_emb is None and text_tower.pool_type in ("argmax", "eos"))


def trim_padding(tokens: torch.Tensor, pad_id: int = 0) -> torch.Tensor:
    """(B, L) token ids on the host, less the all-padding columns at the end, kept to a multiple of 8.

    Read through numpy: a batch still on the host costs no device synchronisation, and a device
    tensor is refused rather than read. The model's tokenizer keeps the full length, which plain
    open_clip models need.
    """
    used = np.flatnonzero((tokens.numpy() != pad_id).any(axis=0))
    length = int(used[-1]) + 1 if len(used) else 1
    return tokens[:, :min(tokens.shape[1], -(-length // MULTIPLE) * MULTIPLE)]


def accept_shorter_batches(text_tower: TextTransformer) -> None:
    """Makes `text_tower` slice its causal mask to each batch's length.

    The full mask stays a buffer (it moves with the model; non-persistent, so the state dict is as
    it was); the slice in use is a plain attribute: as a buffer, DDP would broadcast it, and the
    ranks' batches differ in length.
    """
    full = text_tower._buffers.pop("attn_mask")
    text_tower.register_buffer("full_attn_mask", full, persistent=False)
    text_tower.attn_mask = full
    text_tower.register_forward_pre_hook(_slice_causal_mask)


def _slice_causal_mask(text_tower: TextTransformer, args: tuple) -> None:
    length = args[0].shape[1]
    text_tower.attn_mask = text_tower.full_attn_mask[:length, :length]
