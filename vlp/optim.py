"""Optimiser parameter groups and the learning-rate schedule (pure torch)."""
import math
import re

import torch.nn as nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

TOWERS = ("image_tower.", "text_tower.")
# block index inside a tower: open_clip transformers (resblocks.N), timm (blocks.N, stages.N,
# layers.N), ResNets (layerN); parameters before the first block count as layer 0 (stem,
# embeddings), the rest as the last layer (final norm, pooling, projection)
BLOCK = re.compile(r"(?:resblocks|blocks|stages|layers)\.(\d+)\.|layer(\d+)\.")
STEM = re.compile(r"embed|stem|ln_pre|class_|^conv\d|^bn\d")


def param_groups(model: nn.Module, weight_decay: float, lr: float, image_lr_scale: float = 1.0,
                 text_lr_scale: float = 1.0, layer_decay: float = 1.0) -> list[dict]:
    """Trainable parameters grouped by weight decay and learning rate.

    Biases, norm weights and other 1-d parameters, and the logit scale and bias are not decayed
    (open_clip's rule); frozen parameters are left out. A tower's learning rate is `lr` times
    its scale, times `layer_decay ** (depth - layer)` for layer-wise decay (1.0: off), where
    layer 0 is the tower's stem and embeddings and `depth` its head.
    """
    depths = {t: _depth(model, t) for t in TOWERS}
    groups: dict[tuple[float, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        scale = 1.0
        for tower, tower_scale in zip(TOWERS, (image_lr_scale, text_lr_scale)):
            if name.startswith(tower):
                depth = depths[tower]
                scale = tower_scale * layer_decay ** (depth - _layer(name[len(tower):], depth))
        decay = p.ndim >= 2 and "logit_" not in name
        group = groups.setdefault((scale, decay), {"params": [], "lr": lr * scale,
                                                   "weight_decay": weight_decay if decay else 0.0})
        group["params"].append(p)
    return list(groups.values())


def _layer(name: str, depth: int) -> int:
    match = BLOCK.search(name)
    if match:
        return int(match.group(1) or match.group(2)) + 1
    return 0 if STEM.search(name) else depth


def _depth(model: nn.Module, tower: str) -> int:
    """Number of blocks of a tower + 1: the layer index of its head."""
    blocks = {BLOCK.search(n[len(tower):]).groups() for n, _ in model.named_parameters()
              if n.startswith(tower) and BLOCK.search(n[len(tower):])}
    return len(blocks) + 1


def cosine_with_warmup(optimizer: Optimizer, total_steps: int, warmup_steps: int = 0,
                       min_lr_ratio: float = 0.0) -> LambdaLR:
    """Linear warmup from ~0 to the base LR, then cosine decay to `min_lr_ratio` x base, per step."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, factor)
