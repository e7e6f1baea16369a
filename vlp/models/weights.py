"""A trained model's weights from any file vlp writes, in VLPModel's state-dict layout.

Accepted paths (the same for `init_from`, `model.towers.pretrained`, `vlp.load` and `vlp-eval`):

- a vlp-train checkpoint (`.ckpt`): the `model.` entries of its Lightning `state_dict`;
- a folder written by `vlp-export` (open_clip's local-dir format): `vlp_model.safetensors` when
  present (the whole model, fusion and heads included), else `open_clip_model.safetensors`;
- a `.safetensors` file in either layout.

open_clip's layout (`visual.`, `text.`, a CoCa's `text_decoder.`) is renamed to vlp's (`image_tower.`,
`text_tower.`, `heads.caption.`).
Tensors are read with `torch.load(weights_only=True)` or safetensors: reading never runs code from the file.
"""
import logging
import pickle
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple, Union

import torch
import torch.nn as nn
from open_clip.model import convert_to_custom_text_state_dict
from safetensors.torch import load_file

OPEN_CLIP_CONFIG = "open_clip_config.json"  # open_clip's local-dir format, as vlp-export writes it
OPEN_CLIP_WEIGHTS = "open_clip_model.safetensors"
VLP_WEIGHTS = "vlp_model.safetensors"  # the whole VLPModel (fusion and heads too), beside the open_clip files
_OPEN_CLIP_PREFIXES = {"visual.": "image_tower.", "text.": "text_tower.", "text_decoder.": "heads.caption."}


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
                parts.append(f"{name}: {_abbreviate(keys)}")
        return "; ".join(parts)


def _abbreviate(keys: list[str], limit: int = 6) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")


def is_vlp_weights(path: Union[str, Path]) -> bool:
    """Whether `path` is a vlp checkpoint or export (as opposed to an open_clip tag or file)."""
    path = Path(path)
    return (path.is_dir() and (path / OPEN_CLIP_CONFIG).is_file()) or (path.is_file() and path.suffix == ".ckpt")


def load_torch_file(path: Path):
    """`torch.load` that never runs code from the file (weights only).

    Raises:
        ValueError: naming the file, when it is damaged (e.g. cut short by a crash while saving)
            or holds objects other than tensors and plain containers.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as err:
        raise ValueError(f"{path} is not a checkpoint vlp can read: damaged, or holding more than tensors "
                         f"(vlp never runs code from a file; torch.load weights_only=True: {type(err).__name__})"
                         ) from err


def read_state_dict(path: Union[str, Path]) -> dict[str, torch.Tensor]:
    """Reads the weights at `path` (see the module docstring) as a VLPModel state dict.

    Raises:
        FileNotFoundError: `path` does not exist, or is a folder without weights.
        ValueError: the file is damaged or holds no model weights.
    """
    path = Path(path)
    if path.is_dir():
        files = [path / name for name in (VLP_WEIGHTS, OPEN_CLIP_WEIGHTS) if (path / name).is_file()]
        if not files:
            raise FileNotFoundError(f"{path} holds neither {VLP_WEIGHTS} nor {OPEN_CLIP_WEIGHTS} (see vlp-export)")
        path = files[0]
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint or exported model at {path}")
    if path.suffix == ".safetensors":
        state = load_file(path)
    else:
        state = load_torch_file(path)
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):  # Lightning or open_clip_train
            state = state["state_dict"]
            if any(k.startswith("model.") for k in state):
                state = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
            else:
                state = {k.removeprefix("module."): v for k, v in state.items()}
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} holds no model weights")
    return _to_vlp_layout(state)


def _to_vlp_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if "positional_embedding" in state:  # open_clip's CLIP keeps its text tower at the top level
        state = convert_to_custom_text_state_dict(state)
    out = {}
    for key, value in state.items():
        prefix = next((p for p in _OPEN_CLIP_PREFIXES if key.startswith(p)), None)
        out[_OPEN_CLIP_PREFIXES[prefix] + key[len(prefix):] if prefix else key] = value
    return out


def load_weights(model: nn.Module, path: Union[str, Path]) -> LoadReport:
    """Copies the weights at `path` into `model` where names and shapes match; the rest stays as initialised.

    Weights only: no optimiser state, schedule or step. New modules (e.g. heads the source lacked)
    keep their fresh initialisation; `str(report)` says in one line what did not match.
    """
    state = read_state_dict(path)
    own = model.state_dict()
    loadable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    model.load_state_dict(loadable, strict=False)
    return LoadReport(
        path=str(path),
        loaded=sorted(loadable),
        missing=sorted(k for k in own if k not in state),
        unexpected=sorted(k for k in state if k not in own),
        mismatched=sorted(k for k in state if k in own and own[k].shape != state[k].shape),
    )


class _DropRandomInitWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()


@contextmanager
def weights_loaded_later():
    """Silences open_clip's "No pretrained weights loaded ..." while building a model whose weights follow."""
    root, quiet = logging.getLogger(), _DropRandomInitWarning()
    root.addFilter(quiet)  # open_clip logs on the root logger
    try:
        yield
    finally:
        root.removeFilter(quiet)
