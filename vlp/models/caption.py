"""Captioning with CoCa: open_clip's multimodal text decoder as the VLPModel head `heads.caption`.

The towers of a CoCa architecture (`coca_ViT-B-32`, `vlp-coca-micro`) return token sequences beside
their pooled features: the image tower's attentional pooler gives (pooled, image tokens), the text
tower's appended [CLS] gives (pooled, text tokens). The decoder cross-attends from the causal text
tokens to the image tokens and predicts the next token, as in open_clip's `CoCa.forward`.
"""
import logging
from pathlib import Path
from typing import NamedTuple, Optional

import open_clip
import torch
import torch.nn as nn
import torch.nn.functional as F
from open_clip.coca_model import _build_text_decoder_tower
from open_clip.modified_resnet import AttentionPool2d, ModifiedResNet

from vlp.models.towers import has_resnet_image_tower
from vlp.models.weights import read_state_dict

log = logging.getLogger(__name__)

PAD_ID = 0  # open_clip's tokenizer pads with 0; CoCaLoss ignores it


def coca_text_decoder(arch: str, pretrained: Optional[str] = None, cache_dir: Optional[str] = None) -> nn.Module:
    """open_clip's multimodal text decoder for a CoCa architecture, randomly initialised or pretrained.

    Args:
        arch: an open_clip architecture with a `multimodal_cfg` (the `coca_*` family, `vlp-coca-micro`,
            `vlp-coca-rn-micro`).
        pretrained: what `model.towers.pretrained` names (an open_clip tag, an open_clip checkpoint file,
            a vlp checkpoint or export): its decoder weights when it has them, else a logged fresh start.
        cache_dir: where tagged weights are downloaded to.

    Raises:
        ValueError: the architecture has no multimodal decoder, or its ResNet's tokens do not fit it.
    """
    cfg = open_clip.get_model_config(arch)
    if not cfg or "multimodal_cfg" not in cfg:
        raise ValueError(f"model.heads.caption needs a CoCa architecture (coca_*, vlp-coca-micro); "
                         f"model.towers.arch={arch!r} has no multimodal_cfg")
    width = cfg["multimodal_cfg"].get("width", 512)
    if has_resnet_image_tower(cfg) and cfg["embed_dim"] != width:
        raise ValueError(f"{arch}: a ResNet image tower's tokens come out at embed_dim={cfg['embed_dim']}, "
                         f"but the decoder reads width {width} (multimodal_cfg.width): make them equal")
    # open_clip's own builder, so the decoder (and its state dict) is exactly CoCa's
    decoder = _build_text_decoder_tower(cfg["text_cfg"]["vocab_size"], cfg["multimodal_cfg"],
                                        quick_gelu=cfg.get("quick_gelu", False))
    # open_clip leaves the vocabulary projection as torch.empty (its init_parameters is never called):
    # initialise it as that method intends, so no run starts from whatever memory held
    nn.init.normal_(decoder.text_projection, std=decoder.width ** -0.5)
    if pretrained:
        _load_pretrained_decoder(decoder, arch, pretrained, cache_dir)
    return decoder


def _load_pretrained_decoder(decoder: nn.Module, arch: str, pretrained: str, cache_dir: Optional[str]) -> None:
    path = pretrained
    if not Path(pretrained).exists():
        cfg = open_clip.get_pretrained_cfg(arch, pretrained)
        if not cfg:
            raise ValueError(f"model.towers.pretrained={pretrained!r} is neither a file nor an open_clip tag of {arch}")
        path = open_clip.download_pretrained(cfg, cache_dir=cache_dir)
    prefix = "heads.caption."  # read_state_dict renames open_clip's text_decoder. to vlp's name
    state = {k.removeprefix(prefix): v for k, v in read_state_dict(path).items() if k.startswith(prefix)}
    if not state:
        log.info("%s holds no CoCa decoder: model.heads.caption starts from random weights", pretrained)
        return
    decoder.load_state_dict(state)  # strict: the weights of this architecture's decoder, all of them


class CaptionOutput(NamedTuple):
    image_features: torch.Tensor  # (B, D), L2-normalised, for the contrastive loss
    text_features: torch.Tensor  # (B, D), L2-normalised
    logits: torch.Tensor  # (M, V): next-token logits at the M positions whose next token is not padding
    labels: torch.Tensor  # (M,): those next tokens


def encode_image_tokens(model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(pooled image features (B, D) normalised, image tokens (B, N, D)) from a CoCa image tower.

    A CoCa ViT's attentional pooler returns both. CLIP's ResNet (`ModifiedResNet`, e.g.
    `vlp-coca-rn-micro`) gives its attention pool read at every position of the last feature map.
    """
    tower = model.image_tower
    if isinstance(tower, ModifiedResNet):
        feature_map = tower.forward_intermediates(images, indices=1, intermediates_only=True)["image_intermediates"][-1]
        tokens = attention_pool_tokens(tower.attnpool, feature_map)
        return F.normalize(tokens[:, 0], dim=-1), tokens[:, 1:]
    output = tower(images)
    if not isinstance(output, tuple):
        raise ValueError("captioning needs an image tower that returns tokens (a CoCa architecture, e.g. "
                         "model.towers.arch=vlp-coca-micro, vlp-coca-rn-micro or coca_ViT-B-32)")
    pooled, tokens = output
    return F.normalize(pooled, dim=-1), tokens


def attention_pool_tokens(pool: AttentionPool2d, feature_map: torch.Tensor) -> torch.Tensor:
    """(B, 1 + H*W, D): CLIP's ResNet attention pool with every position as a query, not only the mean.

    Row 0 is the pool's own output (the pooled features); row 1 + i is position i read the same way,
    projected to the embedding width like the tokens of a CoCa ViT's attentional pooler.
    """
    x = feature_map.flatten(2).transpose(1, 2)  # (B, H*W, C)
    x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1) + pool.positional_embedding.to(x.dtype)
    heads = [projection(x).unflatten(-1, (pool.num_heads, -1)).transpose(1, 2)
             for projection in (pool.q_proj, pool.k_proj, pool.v_proj)]
    return pool.c_proj(F.scaled_dot_product_attention(*heads).transpose(1, 2).flatten(2))


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
