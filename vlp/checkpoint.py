"""Rebuild a trained VLPModel from a checkpoint alone (it carries its resolved config)."""
import copy
from pathlib import Path
from typing import NamedTuple, Union

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
    model = instantiate(model_cfg)
    state = {k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}
    model.load_state_dict(state)
    return model.eval()


class LoadReport(NamedTuple):
    """What `load_weights` did: keys it loaded and the ones it could not."""

    path: str
    loaded: list[str]
    missing: list[str]  # in the model, not in the file: left as initialised
    unexpected: list[str]  # in the file, not in the model: ignored
    mismatched: list[str]  # in both with different shapes: left as initialised

    def __str__(self) -> str:
        parts = [f"loaded {len(self.loaded)} of {len(self.loaded) + len(self.missing) + len(self.mismatched)} "
                 f"tensors from {self.path}"]
        for name, keys in (("missing in the file, initialised fresh", self.missing),
                           ("shape mismatch, initialised fresh", self.mismatched),
                           ("unexpected, ignored", self.unexpected)):
            if keys:
                shown = ", ".join(keys[:6]) + (f" (+{len(keys) - 6} more)" if len(keys) > 6 else "")
                parts.append(f"{name}: {shown}")
        return "; ".join(parts)


def load_weights(model: torch.nn.Module, path: Union[str, Path]) -> LoadReport:
    """Copies a vlp checkpoint's model weights into `model` where names and shapes match (`init_from`).

    Weights only: no optimiser state, schedule or step. New modules (e.g. a task head the source
    lacked) keep their fresh initialisation; `str(report)` says in one line what did not match.
    """
    if not Path(path).is_file():
        raise FileNotFoundError(f"init_from={path} does not exist")
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    if "state_dict" not in checkpoint:
        raise ValueError(f"init_from={path} is not a checkpoint written by vlp-train (no state_dict)")
    state = {k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}
    own = model.state_dict()
    loadable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    model.load_state_dict(loadable, strict=False)
    return LoadReport(path=str(path), loaded=sorted(loadable), missing=sorted(k for k in own if k not in state),
                      unexpected=sorted(k for k in state if k not in own),
                      mismatched=sorted(k for k in state if k in own and own[k].shape != state[k].shape))
