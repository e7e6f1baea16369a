"""Optimiser parameter groups and the learning-rate schedule (pure torch)."""
import math

import torch.nn as nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters split into decayed and not decayed.

    Biases, norm weights and other 1-d parameters, and the logit scale are not decayed
    (open_clip's rule); frozen parameters are left out.
    """
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "logit_" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def cosine_with_warmup(optimizer: Optimizer, total_steps: int, warmup_steps: int = 0,
                       min_lr_ratio: float = 0.0) -> LambdaLR:
    """Linear warmup from ~0 to the base LR, then cosine decay to `min_lr_ratio` x base, per step."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, factor)
