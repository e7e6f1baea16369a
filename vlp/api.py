"""The notebook entry point, in open_clip's spirit: one call gives a trained model and what it needs.

    import vlp
    model, preprocess, tokenizer = vlp.load("runs/demo/checkpoints/last.ckpt")   # or a vlp-export folder
    with torch.no_grad():
        image_features = model.encode_image(preprocess(pil_image)[None])   # (1, D), L2-normalised
        text_features = model.encode_text(tokenizer(["a red circle"]))     # (1, D)
"""
from pathlib import Path
from typing import Callable, Union

import torch
from open_clip.transform import PreprocessCfg, image_transform_v2

from vlp.checkpoint import load_model
from vlp.models import VLPModel


def load(path: Union[str, Path], device: Union[str, torch.device] = "cpu") -> tuple[VLPModel, Callable, Callable]:
    """Loads a vlp checkpoint (`.ckpt`) or `vlp-export` folder without running code from the file.

    Returns:
        (model in eval mode on `device`, image transform PIL -> (3, H, W) tensor, tokenizer list[str] -> (B, L)).
    """
    model = load_model(path).to(device)
    preprocess = image_transform_v2(PreprocessCfg(**model.preprocess), is_train=False)
    return model, preprocess, model.tokenizer
