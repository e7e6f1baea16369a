"""VLPModel: an image tower and a text tower with a learnable temperature, and an optional fusion."""
import math
from functools import partial
from typing import NamedTuple, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from vlp.models.compile import can_compile, compile_options
from vlp.models.fusion import FusionOutput, input_options
from vlp.models.heads import ITMHead, MLMHead
from vlp.models.regions import check_region_support, feature_map, region_tokens
from vlp.models.text_padding import accept_shorter_batches, trims_exactly
from vlp.models.tokens import (add_mask_token, check_token_support, image_tokens, special_token_ids,
                               text_tokens, token_embedding)
from vlp.models.towers import Towers


class VLPOutput(NamedTuple):
    image_features: torch.Tensor  # (B, D), L2-normalised
    text_features: torch.Tensor  # (B, D), L2-normalised
    logit_scale: torch.Tensor  # scalar multiplier, exp of the learnable log-scale
    logit_bias: Optional[torch.Tensor]  # scalar added to the logits (sigmoid loss); None without
    # the towers' token sequences, only for a model with fusion
    image_tokens: Optional[torch.Tensor] = None  # (B, N, W_img): patch or region tokens
    text_tokens: Optional[torch.Tensor] = None  # (B, L, W_txt)
    text_padding: Optional[torch.Tensor] = None  # (B, L), True at padding
    text_cls_index: Optional[torch.Tensor] = None  # (B,) position of the text's [CLS] (the pooled token)

    @property
    def logit_args(self) -> tuple[torch.Tensor, ...]:
        """What a loss takes after the features: (logit_scale,) or (logit_scale, logit_bias)."""
        return (self.logit_scale,) if self.logit_bias is None else (self.logit_scale, self.logit_bias)


class VLPModel(nn.Module):
    """Dual encoder with an optional fusion transformer.

    State-dict prefixes are stable: `image_tower.`, `text_tower.`, `fusion.`, `heads.`, `logit_scale`,
    `logit_bias`. A model with fusion always has the pretraining heads `heads.itm` and `heads.mlm`,
    and its text tower gets a [MASK] token (`mask_token_id`) if its vocabulary has none.

    Args:
        towers: the two encoders with their preprocessing and tokenizer.
        init_logit_scale: initial temperature multiplier (CLIP: 1/0.07; SigLIP: 10).
        max_logit_scale: the multiplier is clamped here (CLIP: 100).
        init_logit_bias: initial learnable logit bias (SigLIP: -10); None for no bias (CLIP).
        fusion: partial fusion module (`vlp.models.fusion`), completed here with the towers' token
            widths and image token count; None for a pure dual encoder.
        heads: further heads (task heads), by name, kept under `heads.`.
        lock_image: freeze the image tower (LiT), except its last `lock_image_unlocked_groups`
            layer groups; `lock_image_freeze_bn_stats` also freezes BatchNorm statistics.
        lock_text: freeze the text tower, except its last `lock_text_unlocked_layers` layers;
            `lock_text_freeze_layer_norm` keeps LayerNorms frozen too.
        compile: torch.compile each tower in place (state_dict keys unchanged): True, or
            torch.compile's keyword arguments; eager, with a warning, where it cannot compile.
            `compile_options` keeps what was asked for, so a trainer can compile its loss alike.
        channels_last: keep the image tower's weights and inputs channels-last, which
            convolutions (ResNet towers, patch embeddings) run faster in.
        trim_text_padding: let the trainer drop the all-padding columns at the end of a text
            batch where that leaves the features unchanged (`vlp.models.text_padding`): a dual
            encoder with a causal open_clip text tower. `trims_text_padding` says whether it does.
    """

    def __init__(
        self,
        towers: Towers,
        init_logit_scale: float = 1 / 0.07,
        max_logit_scale: float = 100.0,
        init_logit_bias: Optional[float] = None,
        fusion: Optional[partial] = None,
        heads: Optional[dict[str, nn.Module]] = None,
        lock_image: bool = False,
        lock_image_unlocked_groups: int = 0,
        lock_image_freeze_bn_stats: bool = False,
        lock_text: bool = False,
        lock_text_unlocked_layers: int = 0,
        lock_text_freeze_layer_norm: bool = True,
        compile: Union[bool, dict] = False,
        channels_last: bool = False,
        trim_text_padding: bool = True,
    ):
        super().__init__()
        self.image_tower = towers.image
        self.text_tower = towers.text
        self.logit_scale = nn.Parameter(torch.tensor(math.log(init_logit_scale)))
        self.logit_bias = None if init_logit_bias is None else nn.Parameter(torch.tensor(float(init_logit_bias)))
        self.max_logit_scale = max_logit_scale
        self.clamp_logit_scale_()
        self.preprocess = towers.preprocess
        self.tokenizer = towers.tokenizer
        self.fusion = None if fusion is None else self._build_fusion(fusion)
        self.heads = nn.ModuleDict(self._pretraining_heads() | dict(heads or {}))
        # heads and fusion read whole sequences
        self.trims_text_padding = trim_text_padding and not self.heads and trims_exactly(self.text_tower)
        if self.trims_text_padding:
            accept_shorter_batches(self.text_tower)
        if lock_image:  # open_clip's towers know their own layer groups
            try:
                self.image_tower.lock(unlocked_groups=lock_image_unlocked_groups,
                                      freeze_bn_stats=lock_image_freeze_bn_stats)
            except AssertionError as err:  # open_clip's ModifiedResNet locks only whole
                raise ValueError(f"lock_image_unlocked_groups={lock_image_unlocked_groups}: {err} "
                                 "(ResNet image towers lock whole; ViT and timm towers by layer group)") from err
        if lock_text:
            self.text_tower.lock(unlocked_layers=lock_text_unlocked_layers,
                                 freeze_layer_norm=lock_text_freeze_layer_norm)
        self.channels_last = channels_last
        if channels_last:
            self.image_tower.to(memory_format=torch.channels_last)
        self.compile_options = compile_options(compile)
        if self.compile_options is not None and not can_compile(self.compile_options):
            self.compile_options = None
        if self.compile_options is not None:
            self.image_tower.compile(**self.compile_options)
            self.text_tower.compile(**self.compile_options)

    def _build_fusion(self, fusion: partial) -> nn.Module:
        check_token_support(self.image_tower, self.text_tower)
        options = input_options(fusion)
        region_stage = options["region_stage"] if options["image_input"] == "regions" else None
        if region_stage is not None:
            check_region_support(self.image_tower, region_stage)
        # added before locking, so a locked text tower keeps its [MASK] row frozen too
        self.text_vocab_size = token_embedding(self.text_tower).num_embeddings  # without an added [MASK]
        self.mask_token_id = add_mask_token(self.text_tower, self.tokenizer)
        self.special_token_ids = special_token_ids(self.text_tower, self.tokenizer)
        image, text = self._example_tokens(region_stage)
        return fusion(image_width=image.shape[2], text_width=text.shape[2], num_image_tokens=image.shape[1],
                      text_vocab_size=token_embedding(self.text_tower).num_embeddings,
                      text_length=self.tokenizer.context_length)

    @torch.no_grad()
    def _example_tokens(self, region_stage: Optional[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Image and text token sequences of one blank image and one word, to size the fusion's inputs."""
        size = self.preprocess["size"]
        images = torch.zeros(1, 3, *((size, size) if isinstance(size, int) else size))
        modes = self.image_tower.training, self.text_tower.training
        self.image_tower.eval(), self.text_tower.eval()  # BatchNorm must not learn from the blank image
        try:
            image = self._image_sequence(images, images.new_zeros(1, 0, 4), region_stage)[1]
            return image, text_tokens(self.text_tower, self.tokenizer(["a"]))[1]
        finally:
            self.image_tower.train(modes[0]), self.text_tower.train(modes[1])

    def _pretraining_heads(self) -> dict[str, nn.Module]:
        if self.fusion is None:
            return {}
        embedding = token_embedding(self.text_tower)
        return {"itm": ITMHead(self.fusion.width),
                "mlm": MLMHead(self.fusion.width, embedding.embedding_dim, embedding.num_embeddings)}

    def _image_sequence(self, images: torch.Tensor, boxes: Optional[torch.Tensor],
                        region_stage: Optional[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Pooled features (B, D) and the fusion's image tokens: patches, or regions of `region_stage`."""
        if region_stage is None:
            return image_tokens(self.image_tower, images)
        if boxes is None:
            raise ValueError("the fusion reads region tokens (model.fusion.image_input=regions) but the batch "
                             "has no boxes: set data.max_boxes, and give the samples' json a `boxes` list")
        pooled, features = feature_map(self.image_tower, images, region_stage)
        return pooled, region_tokens(features, boxes)

    def _tokens(self, images: torch.Tensor, tokens: torch.Tensor, boxes: Optional[torch.Tensor]) -> tuple:
        """Pooled features and the fusion's token sequences of both towers, one pass each."""
        image_pooled, image_seq = self._image_sequence(images, boxes, self.fusion.inputs.region_stage)
        text_pooled, *text_sequence = self._text_sequence(tokens)
        return image_pooled, text_pooled, image_seq, *text_sequence

    def _text_sequence(self, tokens: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The text tower's pooled features and the fusion's text input: tokens, padding, [CLS] positions."""
        pooled, sequence, padding, cls_index = text_tokens(self.text_tower, tokens)
        return pooled, self.fusion.inputs.add_word_codes(sequence, tokens), padding, cls_index

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return F.normalize(_pooled(self.image_tower(images)), dim=-1)  # (B, D)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.normalize(_pooled(self.text_tower(tokens)), dim=-1)  # (B, D)

    def scale(self) -> torch.Tensor:
        """The logit multiplier, exp of the learnable log-scale (kept in range by `clamp_logit_scale_`)."""
        return self.logit_scale.exp()

    @torch.no_grad()
    def clamp_logit_scale_(self) -> None:
        """Clamps the log-scale parameter to [0, log(max_logit_scale)]; call after each optimiser step.

        As open_clip does: clamping the parameter rather than the forward keeps its gradient, so a
        scale at the cap can come back down.
        """
        self.logit_scale.clamp_(0, math.log(self.max_logit_scale))

    def forward(self, images: torch.Tensor, tokens: torch.Tensor, boxes: Optional[torch.Tensor] = None) -> VLPOutput:
        """Features of images (B, 3, H, W) and token ids (B, L); a fusion that reads region tokens
        needs the images' boxes (B, R, 4) too (`vlp.data.boxes`)."""
        if self.fusion is None:
            return VLPOutput(self.encode_image(images), self.encode_text(tokens), self.scale(), self.logit_bias)
        image_pooled, text_pooled, *sequences = self._tokens(images, tokens, boxes)
        return VLPOutput(F.normalize(image_pooled, dim=-1), F.normalize(text_pooled, dim=-1), self.scale(),
                         self.logit_bias, *sequences)

    def encode_text_tokens(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The fusion's text input (B, L, W_txt): the text tower's token sequence, with the word codes
        where the fusion has them; its padding mask (B, L) and [CLS] positions (B,)."""
        return self._text_sequence(tokens)[1:]

    def fuse(self, images: torch.Tensor, tokens: torch.Tensor, boxes: Optional[torch.Tensor] = None) -> FusionOutput:
        """Fuses images (B, 3, H, W) with token ids (B, L) (and boxes (B, R, 4) for region tokens)."""
        out = self(images, tokens, boxes)
        return self.fusion(out.image_tokens, out.text_tokens, out.text_padding, out.text_cls_index)

    def mlm_logits(self, fused_text: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits (M, V) of fused text tokens (M, W), tied to the token embedding."""
        return self.heads["mlm"](fused_text, token_embedding(self.text_tower).weight)


def _pooled(output):
    """A tower's pooled features; towers built with `output_tokens` (CoCa's) return (pooled, tokens)."""
    return output[0] if isinstance(output, tuple) else output
