"""Cross-modal fusion transformers over image tokens and text tokens.

Three classic designs, built from torch.nn's transformer layers (scaled-dot-product attention):

- `CrossAttentionFusion` (ALBEF, BLIP): text tokens self-attend, then cross-attend to image tokens.
- `MergedFusion` (VisualBERT, UNITER, ViLT): one stream, self-attention over [text; image].
- `CoAttentionFusion` (LXMERT): two streams; each cross-attends to the other, then self-attends.

Each is built by `VLPModel` from a partial (Hydra `_partial_: true`) that it completes with the
towers' token widths, text vocabulary and the number of image tokens; what the fusion reads
(`image_input`, `region_stage`, `word_codes`: see `_Inputs`) is the same for all three. Every
design returns fused text tokens, fused image tokens where it has them, and the fused [CLS]: the
fused text token at the position the text tower pools (BERT's [CLS], CLIP's end of text), as in
all three papers, where the text encoder's [CLS] is both the contrastive feature and the fused [CLS].
"""
import inspect
from functools import partial
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
from torch import Tensor

from vlp.models.regions import GEOMETRY


class FusionOutput(NamedTuple):
    """What every design returns from (image tokens (B, N, W_img), text tokens (B, L, W_txt),
    text padding (B, L), cls_index (B,): the position of the text's [CLS])."""

    text: Tensor  # (B, L, W) fused text tokens
    image: Optional[Tensor]  # (B, N, W) fused image tokens; None where the design keeps none
    cls: Tensor  # (B, W) the fused [CLS]


class _Inputs(nn.Module):
    """Per-modality projections to the fusion width, and where each token is.

    Image tokens (`image_input`):
    - `patches`: the tower's last feature map or patch tokens, with learned positions. The
      projected content is layer-normed and the positions start at a fifth of its scale: a
      feature map's values are far larger than a 0.02-scale embedding, which left where a thing
      is invisible to the attention (tests/models/test_fusion.py).
    - `regions`: one token per box (`vlp.models.regions`) and one for the whole image, pooled
      from the tower's feature map at `region_stage`. As in UNITER and LXMERT, the projected
      features and the projected box are layer-normed apart and added, so neither drowns the other.

    Text tokens are the text tower's outputs, which carry its positions. With `word_codes`, the
    model adds to them a fixed random code for each token id and each position
    (`add_word_codes`): a text tower trained contrastively from scratch gives words that a bag of
    words never needs apart ("left", "right") nearly the same outputs, and the fusion cannot learn
    relations from those (BENCHMARKS.md). The codes are rebuilt from a fixed seed rather than
    saved, and kept out of the buffers, which DDP would broadcast every step.
    """

    def __init__(self, image_width: int, text_width: int, width: int, num_image_tokens: int,
                 image_input: str = "patches", region_stage: int = 2, word_codes: bool = False,
                 text_vocab_size: int = 0, text_length: int = 0):
        super().__init__()
        if image_input not in ("patches", "regions"):
            raise ValueError(f"model.fusion.image_input={image_input!r}: expected patches or regions")
        self.word_codes = self.position_codes = None
        if word_codes:
            generator = torch.Generator().manual_seed(0)
            self.word_codes = torch.randn(text_vocab_size, text_width, generator=generator)
            self.position_codes = torch.randn(text_length, text_width, generator=generator)
        self.region_stage = region_stage if image_input == "regions" else None
        if self.region_stage is None:
            self.image_proj = nn.Linear(image_width, width)
            self.image_pos = nn.Parameter(torch.randn(num_image_tokens, width) * 0.2)
        else:
            self.image_proj = nn.Linear(image_width - GEOMETRY, width)
            self.box_proj, self.box_norm = nn.Linear(GEOMETRY, width), nn.LayerNorm(width)
        self.image_norm = nn.LayerNorm(width)
        self.text_proj = nn.Linear(text_width, width)

    def forward(self, image: Tensor, text: Tensor) -> tuple[Tensor, Tensor]:
        if self.region_stage is not None:
            features, box = image.split([image.shape[-1] - GEOMETRY, GEOMETRY], dim=-1)
            image = self.image_norm(self.image_proj(features)) + self.box_norm(self.box_proj(box))
        elif image.shape[1] != len(self.image_pos):
            raise ValueError(f"the fusion was built for {len(self.image_pos)} image tokens, got "
                             f"{image.shape[1]} (a different image size than the model's?)")
        else:
            image = self.image_norm(self.image_proj(image)) + self.image_pos
        return image, self.text_proj(text)

    def add_word_codes(self, text: Tensor, ids: Tensor) -> Tensor:
        """Text tower outputs (B, L, W_txt) plus the codes of their token ids (B, L) and positions."""
        if self.word_codes is None:
            return text
        if self.word_codes.device != ids.device:
            self.word_codes, self.position_codes = self.word_codes.to(ids.device), self.position_codes.to(ids.device)
        return text + (self.word_codes[ids] + self.position_codes[: ids.shape[1]]).to(text.dtype)


def input_options(fusion: partial) -> dict:
    """`image_input` and `region_stage` of a fusion partial, defaults filled in: what the model
    must compute for it before building it."""
    defaults = inspect.signature(_Inputs.__init__).parameters
    return {name: fusion.keywords.get(name, defaults[name].default) for name in ("image_input", "region_stage")}


class _Fusion(nn.Module):
    """What the three designs share: sizes, input projections and the final norms."""

    def __init__(self, image_width: int, text_width: int, num_image_tokens: int, width: int, heads: int,
                 dropout: float, **inputs):
        super().__init__()
        if width % heads:
            raise ValueError(f"model.fusion.width={width} is not divisible by model.fusion.heads={heads}")
        self.width, self.heads, self.dropout = width, heads, dropout
        self.inputs = _Inputs(image_width, text_width, width, num_image_tokens, **inputs)
        self.text_norm = nn.LayerNorm(width)

    def _layer(self, layer_type: type) -> nn.Module:
        """A pre-norm torch.nn transformer layer of this fusion's size."""
        return layer_type(self.width, self.heads, 4 * self.width, self.dropout, activation="gelu",
                          batch_first=True, norm_first=True)

    def _output(self, text: Tensor, image: Optional[Tensor], cls_index: Tensor) -> FusionOutput:
        text = self.text_norm(text)
        return FusionOutput(text, image, text[torch.arange(len(text), device=text.device), cls_index])


class CrossAttentionFusion(_Fusion):
    """ALBEF/BLIP: per layer, text self-attention, cross-attention to the image, MLP."""

    def __init__(self, image_width: int, text_width: int, num_image_tokens: int, width: int = 256,
                 heads: int = 4, layers: int = 2, dropout: float = 0.0, **inputs):
        super().__init__(image_width, text_width, num_image_tokens, width, heads, dropout, **inputs)
        # a decoder layer without causal mask is exactly this block: self-attn, cross-attn, MLP
        self.layers = nn.ModuleList(self._layer(nn.TransformerDecoderLayer) for _ in range(layers))

    def forward(self, image: Tensor, text: Tensor, text_padding: Tensor, cls_index: Tensor) -> FusionOutput:
        image, text = self.inputs(image, text)
        for layer in self.layers:
            text = layer(text, image, tgt_key_padding_mask=text_padding)
        return self._output(text, None, cls_index)


class MergedFusion(_Fusion):
    """VisualBERT/UNITER/ViLT: bidirectional self-attention over [text; image] with type embeddings."""

    def __init__(self, image_width: int, text_width: int, num_image_tokens: int, width: int = 256,
                 heads: int = 4, layers: int = 2, dropout: float = 0.0, **inputs):
        super().__init__(image_width, text_width, num_image_tokens, width, heads, dropout, **inputs)
        self.type_embedding = nn.Parameter(torch.randn(2, width) * 0.02)  # text, image
        self.layers = nn.ModuleList(self._layer(nn.TransformerEncoderLayer) for _ in range(layers))
        self.image_norm = nn.LayerNorm(width)

    def forward(self, image: Tensor, text: Tensor, text_padding: Tensor, cls_index: Tensor) -> FusionOutput:
        image, text = self.inputs(image, text)
        L = text.shape[1]
        x = torch.cat([text + self.type_embedding[0], image + self.type_embedding[1]], dim=1)  # (B, L+N, W)
        padding = torch.cat([text_padding, text_padding.new_zeros(image.shape[:2])], dim=1)  # (B, L+N)
        for layer in self.layers:
            x = layer(x, src_key_padding_mask=padding)
        return self._output(x[:, :L], self.image_norm(x[:, L:]), cls_index)


class _CoAttentionLayer(nn.Module):
    """LXMERT's cross-modality layer: both streams cross-attend to each other's input, then each
    self-attends and runs its MLP (one torch.nn encoder layer per stream)."""

    def __init__(self, fusion: _Fusion):
        super().__init__()
        W, H, p = fusion.width, fusion.heads, fusion.dropout
        self.text_cross_norm, self.image_cross_norm = nn.LayerNorm(W), nn.LayerNorm(W)
        self.text_cross = nn.MultiheadAttention(W, H, dropout=p, batch_first=True)
        self.image_cross = nn.MultiheadAttention(W, H, dropout=p, batch_first=True)
        self.text_self = fusion._layer(nn.TransformerEncoderLayer)
        self.image_self = fusion._layer(nn.TransformerEncoderLayer)

    def forward(self, text: Tensor, image: Tensor, text_padding: Tensor) -> tuple[Tensor, Tensor]:
        t, i = self.text_cross_norm(text), self.image_cross_norm(image)
        text = text + self.text_cross(t, i, i, need_weights=False)[0]
        image = image + self.image_cross(i, t, t, key_padding_mask=text_padding, need_weights=False)[0]
        return self.text_self(text, src_key_padding_mask=text_padding), self.image_self(image)


class CoAttentionFusion(_Fusion):
    """LXMERT: two streams exchanging information through co-attention in every layer."""

    def __init__(self, image_width: int, text_width: int, num_image_tokens: int, width: int = 256,
                 heads: int = 4, layers: int = 2, dropout: float = 0.0, **inputs):
        super().__init__(image_width, text_width, num_image_tokens, width, heads, dropout, **inputs)
        self.layers = nn.ModuleList(_CoAttentionLayer(self) for _ in range(layers))
        self.image_norm = nn.LayerNorm(width)

    def forward(self, image: Tensor, text: Tensor, text_padding: Tensor, cls_index: Tensor) -> FusionOutput:
        image, text = self.inputs(image, text)
        for layer in self.layers:
            text, image = layer(text, image, text_padding)
        return self._output(text, self.image_norm(image), cls_index)
