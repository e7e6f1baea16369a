"""Rebuild a trained VLPModel from a checkpoint or export alone (both carry the model's config).

Loading never runs code from the file: tensors are read with `torch.load(weights_only=True)` or
safetensors, and the saved config may only name vlp's own classes (`_target_: vlp.…`).
"""
import copy
import json
from pathlib import Path
from typing import Any, Union

from hydra.utils import instantiate

from vlp.models import VLPModel
from vlp.models.weights import OPEN_CLIP_CONFIG, LoadReport, load_torch_file, load_weights, weights_loaded_later

__all__ = ["CONFIG_KEY", "load_model", "load_weights", "LoadReport", "model_config", "run_config",
           "weights_loaded_later"]

CONFIG_KEY = "vlp_config"  # where checkpoints keep the resolved run config (exports: in open_clip_config.json)


def model_config(path: Union[str, Path]) -> dict[str, Any]:
    """The `model` section of the run config saved in a vlp checkpoint or `vlp-export` folder.

    Raises:
        KeyError: the file or folder was not written by vlp.
    """
    config = run_config(path)
    _check_targets(config["model"], Path(path))
    return config["model"]


def run_config(path: Union[str, Path]) -> dict[str, Any]:
    """The resolved run config saved in a vlp checkpoint or `vlp-export` folder (a copy).

    Raises:
        KeyError: the file or folder was not written by vlp.
    """
    path = Path(path)
    if path.is_dir():
        config = json.loads((path / OPEN_CLIP_CONFIG).read_text()).get(CONFIG_KEY)
    elif path.suffix == ".safetensors":
        raise KeyError(f"{path} holds weights without a model config: load a vlp checkpoint or vlp-export "
                       "folder, or give the file to init_from= / model.towers.pretrained=")
    else:
        saved = load_torch_file(path)
        config = saved.get(CONFIG_KEY) if isinstance(saved, dict) else None
    if not config or "model" not in config:
        raise KeyError(f"{path} holds no '{CONFIG_KEY}': not a checkpoint written by vlp-train or vlp-export")
    return copy.deepcopy(config)


def _check_targets(node: Any, path: Path) -> None:
    """A saved config may only instantiate vlp's classes: a crafted file must not call arbitrary code."""
    if isinstance(node, dict):
        target = node.get("_target_")
        if target is not None and not str(target).startswith("vlp."):
            raise ValueError(f"{path}: the saved model config names {target!r}; only vlp.* classes are rebuilt")
        for value in node.values():
            _check_targets(value, path)
    elif isinstance(node, list):
        for value in node:
            _check_targets(value, path)


def load_model(path: Union[str, Path]) -> VLPModel:
    """Returns the model of a vlp checkpoint (`.ckpt`) or `vlp-export` folder, weights loaded, in eval mode.

    Raises:
        FileNotFoundError: nothing at `path`.
        KeyError: not written by vlp (no saved config).
        ValueError: the file is damaged, or its weights do not fit the saved config.
    """
    model_cfg = model_config(path)
    model_cfg["towers"]["pretrained"] = None  # the weights come from the file
    model_cfg["compile"] = False  # a training switch; compile the returned model as you need
    with weights_loaded_later():
        model = instantiate(model_cfg)
    report = load_weights(model, path)
    # unexpected keys too: a checkpoint of a newer vlp would otherwise lose those weights silently
    if report.missing or report.mismatched or report.unexpected:
        raise ValueError(f"{path} does not fit its own config: {report}")
    return model.eval()

