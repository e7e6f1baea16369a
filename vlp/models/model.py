"""VLPModel: an image tower and a text tower with a learnable temperature."""
import math
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from vlp.models.towers import Towers


class VLPOutput(NamedTuple):
    image_features: torch.Tensor  # (B, D), L2-normalised
    text_features: torch.Tensor  # (B, D), L2-normalised
    logit_scale: torch.Tensor  # scalar multiplier, exp of the learnable log-scale
    logit_bias: Optional[torch.Tensor]  # scalar added to the logits (sigmoid loss); None without

    @property
    def logit_args(self) -> tuple[torch.Tensor, ...]:
        """What a loss takes after the features: (logit_scale,) or (logit_scale, logit_bias)."""
        return (self.logit_scale,) if self.logit_bias is None else (self.logit_scale, self.logit_bias)


class VLPModel(nn.Module):
    """Dual encoder. State-dict prefixes are stable: `image_tower.`, `text_tower.`, `logit_scale`, `logit_bias`.

    Args:
        towers: the two encoders with their preprocessing and tokenizer.
        init_logit_scale: initial temperature multiplier (CLIP: 1/0.07; SigLIP: 10).
        max_logit_scale: the multiplier is clamped here (CLIP: 100).
        init_logit_bias: initial learnable logit bias (SigLIP: -10); None for no bias (CLIP).
        fusion: cross-modal fusion module; None for a pure dual encoder.
        lock_image: freeze the image tower (LiT), except its last `lock_image_unlocked_groups`
            layer groups; `lock_image_freeze_bn_stats` also freezes BatchNorm statistics.
        lock_text: freeze the text tower, except its last `lock_text_unlocked_layers` layers;
            `lock_text_freeze_layer_norm` keeps LayerNorms frozen too.
    """

    def __init__(
        self,
        towers: Towers,
        init_logit_scale: float = 1 / 0.07,
        max_logit_scale: float = 100.0,
        init_logit_bias: Optional[float] = None,
        fusion: Optional[nn.Module] = None,
        lock_image: bool = False,
        lock_image_unlocked_groups: int = 0,
        lock_image_freeze_bn_stats: bool = False,
        lock_text: bool = False,
        lock_text_unlocked_layers: int = 0,
        lock_text_freeze_layer_norm: bool = True,
    ):
        super().__init__()
        self.image_tower = towers.image
        self.text_tower = towers.text
        self.fusion = fusion
        self.logit_scale = nn.Parameter(torch.tensor(math.log(init_logit_scale)))
        self.logit_bias = None if init_logit_bias is None else nn.Parameter(torch.tensor(float(init_logit_bias)))
        self.max_logit_scale = max_logit_scale
        self.clamp_logit_scale_()
        self.preprocess = towers.preprocess
        self.tokenizer = towers.tokenizer
        if lock_image:  # open_clip's towers know their own layer groups
            self.image_tower.lock(unlocked_groups=lock_image_unlocked_groups,
                                  freeze_bn_stats=lock_image_freeze_bn_stats)
        if lock_text:
            self.text_tower.lock(unlocked_layers=lock_text_unlocked_layers,
                                 freeze_layer_norm=lock_text_freeze_layer_norm)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_tower(images), dim=-1)  # (B, D)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_tower(tokens), dim=-1)  # (B, D)

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

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> VLPOutput:
        return VLPOutput(self.encode_image(images), self.encode_text(tokens), self.scale(), self.logit_bias)
