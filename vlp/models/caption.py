"""Captioning with CoCa: open_clip's multimodal text decoder as the VLPModel head `heads.caption`.

The towers of a CoCa architecture (`coca_ViT-B-32`, `vlp-coca-micro`) return token sequences beside
their pooled features: the image tower's attentional pooler gives (pooled, image tokens), the text
tower's appended [CLS] gives (pooled, text tokens). The decoder cross-attends from the causal text
tokens to the image tokens and predicts the next token, as in open_clip's `CoCa.forward`.
"""
from typing import NamedTuple

import open_clip
import torch
import torch.nn as nn
import torch.nn.functional as F
from open_clip.coca_model import _build_text_decoder_tower

PAD_ID = 0  # open_clip's tokenizer pads with 0; CoCaLoss ignores it


def coca_text_decoder(arch: str) -> nn.Module:
    """open_clip's multimodal text decoder for a CoCa architecture, randomly initialised.

    Args:
        arch: an open_clip architecture with a `multimodal_cfg` (the `coca_*` family, `vlp-coca-micro`).

    Raises:
        ValueError: the architecture has no multimodal decoder.
    """
    cfg = open_clip.get_model_config(arch)
    if not cfg or "multimodal_cfg" not in cfg:
        raise ValueError(f"model.heads.caption needs a CoCa architecture (coca_*, vlp-coca-micro); "
                         f"model.towers.arch={arch!r} has no multimodal_cfg")
    # open_clip's own builder, so the decoder (and its state dict) is exactly CoCa's
    decoder = _build_text_decoder_tower(cfg["text_cfg"]["vocab_size"], cfg["multimodal_cfg"],
                                        quick_gelu=cfg.get("quick_gelu", False))
    # open_clip leaves the vocabulary projection as torch.empty (its init_parameters is never called):
    # initialise it as that method intends, so no run starts from whatever memory held
    nn.init.normal_(decoder.text_projection, std=decoder.width ** -0.5)
    return decoder


class CaptionOutput(NamedTuple):
    image_features: torch.Tensor  # (B, D), L2-normalised, for the contrastive loss
    text_features: torch.Tensor  # (B, D), L2-normalised
    logits: torch.Tensor  # (M, V): next-token logits at the M positions whose next token is not padding
    labels: torch.Tensor  # (M,): those next tokens


def encode_image_tokens(model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(pooled image features (B, D) normalised, image tokens (B, N, W)) from a CoCa image tower."""
    output = model.image_tower(images)
    if not isinstance(output, tuple):
        raise ValueError("captioning needs an image tower that returns tokens (a CoCa architecture, e.g. "
                         "model.towers.arch=vlp-coca-micro or coca_ViT-B-32)")
    pooled, tokens = output
    return F.normalize(pooled, dim=-1), tokens


def decoder_states(decoder: nn.Module, image_tokens: torch.Tensor, text_tokens: torch.Tensor) -> torch.Tensor:
    """(B, L, W) outputs of open_clip's MultimodalTransformer before its vocabulary projection.

    Its `forward`, minus the projection: projecting only the positions a loss or a generation step
    needs saves most of the work, since the vocabulary (49k tokens) dwarfs a small decoder.
    """
    length = text_tokens.shape[1]
    x, memory = text_tokens, image_tokens
    if not decoder.batch_first:
        x, memory = x.permute(1, 0, 2), memory.permute(1, 0, 2)
    for block, cross_attn in zip(decoder.resblocks, decoder.cross_attn):
        x = block(x, attn_mask=decoder.attn_mask[:length, :length])
        x = cross_attn(x, k_x=memory, v_x=memory)
    if not decoder.batch_first:
        x = x.permute(1, 0, 2)
    return decoder.ln_final(x)


def text_states(model: nn.Module, image_tokens: torch.Tensor, tokens: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(text features (B, D) normalised, decoder states (B, L, W)) of the decoder reading `tokens` (B, L)."""
    pooled, token_embs = model.text_tower(tokens)
    return F.normalize(pooled, dim=-1), decoder_states(model.heads["caption"], image_tokens, token_embs)


def vocabulary_logits(model: nn.Module, states: torch.Tensor) -> torch.Tensor:
    """Decoder states (..., W) -> next-token logits (..., V)."""
    return states @ model.heads["caption"].text_projection


def caption_forward(model: nn.Module, images: torch.Tensor, tokens: torch.Tensor, pad_id: int = PAD_ID
                    ) -> CaptionOutput:
    """Teacher-forced pass: contrastive features and next-token logits where the next token is text."""
    image_features, image_tokens = encode_image_tokens(model, images)
    text_features, states = text_states(model, image_tokens, tokens)
    labels = tokens[:, 1:]
    keep = labels != pad_id
    return CaptionOutput(image_features, text_features, vocabulary_logits(model, states[:, :-1][keep]), labels[keep])


def caption_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy (open_clip's CoCaLoss caption term, unweighted; padding already dropped)."""
    return F.cross_entropy(logits, labels)
