"""Rebuild a trained VLPModel from a checkpoint alone (it carries its resolved config)."""
import copy
from pathlib import Path
from typing import Union

import torch
from hydra.utils import instantiate

from vlp.models import VLPModel

CONFIG_KEY = "vlp_config"  # where checkpoints keep the resolved run config


def load_model(path: Union[str, Path]) -> VLPModel:
    """Returns the model of a vlp checkpoint, weights loaded, in eval mode.

    Raises:
        KeyError: the file is not a vlp checkpoint (no saved config).
    """
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    if CONFIG_KEY not in checkpoint:
        raise KeyError(f"{path} holds no '{CONFIG_KEY}': not a checkpoint written by vlp-train")
    model_cfg = copy.deepcopy(checkpoint[CONFIG_KEY]["model"])
    model_cfg["towers"]["pretrained"] = None  # the weights come from the checkpoint
    model_cfg["compile"] = False  # a training switch; compile the returned model as you need
    model = instantiate(model_cfg)
    state = {k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}
    model.load_state_dict(state)
    return model.eval()
