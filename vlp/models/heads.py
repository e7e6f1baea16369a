"""Heads on the fused tokens: image-text matching (ITM), masked language modelling (MLM), VQA answers."""
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


class ITMHead(nn.Module):
    """Fused [CLS] (B, W) -> logits (B, 2) of (no match, match)."""

    def __init__(self, width: int):
        super().__init__()
        self.proj = nn.Linear(width, 2)

    def forward(self, cls: Tensor) -> Tensor:
        return self.proj(cls)


class MLMHead(nn.Module):
    """Fused text tokens (M, W) -> vocabulary logits (M, V), BERT's head with the output layer tied
    to the text tower's token embedding (passed in, so its weight lives once in the state dict).

    Args:
        width: fusion width W.
        embedding_width: width E of the text tower's token embedding.
        vocab_size: rows V of that embedding ([MASK] included).
    """

    def __init__(self, width: int, embedding_width: int, vocab_size: int):
        super().__init__()
        self.dense = nn.Linear(width, embedding_width)
        self.norm = nn.LayerNorm(embedding_width)
        self.bias = nn.Parameter(torch.zeros(vocab_size))

    def forward(self, tokens: Tensor, embedding: Tensor) -> Tensor:
        return self.norm(F.gelu(self.dense(tokens))) @ embedding.T + self.bias  # (M, V)


class VQAHead(nn.Module):
    """Fused [CLS] (B, W) -> answer logits (B, K): the two-layer answer classifier of LXMERT / ALBEF.

    Args:
        width: fusion width W (`model.fusion.width`); None (a model without fusion) raises.
        num_answers: answer vocabulary size K.
    """

    def __init__(self, width: Optional[int], num_answers: int):
        super().__init__()
        if width is None:
            raise ValueError("VQA needs a fusion model: add fusion=cross_attention|merged|co_attention "
                             "(the answer head reads the fused [CLS])")
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.LayerNorm(2 * width),
                                 nn.Linear(2 * width, num_answers))

    def forward(self, cls: Tensor) -> Tensor:
        return self.mlp(cls)
