"""Token sequences from open_clip towers, for the fusion layers; and the [MASK] token for MLM.

A fusion transformer reads sequences, not pooled vectors. Every open_clip image tower (ViT,
ModifiedResNet, timm) and the built-in text tower offer `forward_intermediates`, which returns
the pooled features and the last block's output in one pass; Hugging Face text towers give
their last hidden state. ResNet and timm feature maps (B, C, H, W) become (B, H*W, C) tokens.
"""
from typing import Callable

import torch
import torch.nn as nn
from open_clip.hf_model import HFTextEncoder
from open_clip.transformer import TextTransformer
from torch import Tensor


def check_token_support(image_tower: nn.Module, text_tower: nn.Module) -> None:
    """Raises at start-up, naming the tower, if a fusion model cannot get its token sequences."""
    if not hasattr(image_tower, "forward_intermediates"):
        raise ValueError(f"the image tower {type(image_tower).__name__} cannot return patch tokens "
                         "(no forward_intermediates), so it cannot feed model.fusion")
    if not isinstance(text_tower, (TextTransformer, HFTextEncoder)):
        raise ValueError(f"the text tower {type(text_tower).__name__} cannot return token outputs, "
                         "so it cannot feed model.fusion")


def image_tokens(tower: nn.Module, images: Tensor) -> tuple[Tensor, Tensor]:
    """(pooled (B, D), tokens (B, N, W_img)) of an open_clip image tower, in one forward pass."""
    out = tower.forward_intermediates(images, indices=1, normalize_intermediates=True)
    tokens = out["image_intermediates"][-1]
    if tokens.ndim == 4:  # (B, C, H, W) feature map, row-major positions
        tokens = tokens.flatten(2).transpose(1, 2)
    return out["image_features"], tokens


def text_tokens(tower: nn.Module, text: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(pooled (B, D), tokens (B, L, W_txt), padding (B, L) True at padding, cls_index (B,)) of a
    text tower; `cls_index` is the position it pools: its [CLS] (CLIP: end of text, BERT: [CLS])."""
    if isinstance(tower, HFTextEncoder):
        padding = text == tower.config.pad_token_id
        attention = (~padding).long()
        out = tower.transformer(input_ids=text, attention_mask=attention)
        cls_index = torch.full_like(text[:, 0], getattr(tower.pooler, "cls_token_position", 0))
        return tower.proj(tower.pooler(out, attention)), out.last_hidden_state, padding, cls_index
    out = tower.forward_intermediates(text, indices=1, normalize_intermediates=True, output_fmt="NLC")
    return out["text_features"], out["text_intermediates"][-1], text == tower.pad_id, _pool_index(tower, text)


def _pool_index(tower: TextTransformer, text: Tensor) -> Tensor:
    """(B,) position of the token open_clip's text tower pools (`text_global_pool`)."""
    if tower.pool_type == "argmax":  # the end of text has the highest id, an added [MASK] aside
        return text.masked_fill(text >= tower.vocab_size, -1).argmax(dim=-1)
    if tower.pool_type == "eos":
        return (text == tower.eos_id).int().argmax(dim=-1)
    return torch.full_like(text[:, 0], text.shape[1] - 1 if tower.pool_type == "last" else 0)


def token_embedding(tower: nn.Module) -> nn.Embedding:
    """The text tower's input token embedding (tied to the MLM head's output layer)."""
    if isinstance(tower, HFTextEncoder):
        return tower.transformer.get_input_embeddings()
    return tower.token_embedding


def add_mask_token(tower: nn.Module, tokenizer: Callable) -> int:
    """Returns the [MASK] token id, adding one embedding row to a tower whose vocabulary has none.

    CLIP's BPE vocabulary has no [MASK]: the text tower gets one more row (pretrained rows kept,
    the new one initialised like the others) and [MASK] is id `vocab_size`. BERT-style
    tokenizers already have one. Idempotent: a tower that already has the row is left alone.
    """
    hf = getattr(tokenizer, "tokenizer", None)
    if getattr(hf, "mask_token_id", None) is not None:
        return hf.mask_token_id
    embedding = tower.token_embedding
    vocab = tower.vocab_size
    if embedding.num_embeddings == vocab:
        grown = nn.Embedding(vocab + 1, embedding.embedding_dim).to(embedding.weight)
        with torch.no_grad():
            grown.weight[:vocab] = embedding.weight
            nn.init.normal_(grown.weight[vocab:], std=0.02)  # open_clip's token-embedding init
        tower.token_embedding = grown
    return vocab


def special_token_ids(tower: nn.Module, tokenizer: Callable) -> list[int]:
    """Ids MLM must never mask: padding, start/end of text, and any other special token."""
    hf = getattr(tokenizer, "tokenizer", None)
    if hf is not None and hasattr(hf, "all_special_ids"):
        return sorted(set(hf.all_special_ids))
    ids = {tower.pad_id, getattr(tokenizer, "sot_token_id", None), getattr(tokenizer, "eot_token_id", None)}
    return sorted(i for i in ids if i is not None)
