"""Image and text towers from open_clip's model zoo.

Any open_clip architecture works by name (`ViT-B-32`, `RN50`, timm- and HF-text-tower
configs); the small in-repo configs in `configs/` are registered on import for tests
and the demo. Weights load from an open_clip pretrained tag, a local checkpoint file, or a
vlp checkpoint or export (`vlp.models.weights`).
"""
import copy
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional

import open_clip
import torch.nn as nn
from open_clip.tokenizer import DEFAULT_CONTEXT_LENGTH, HFTokenizer

from vlp.models.weights import is_vlp_weights, read_state_dict, weights_loaded_later

CONFIG_DIR = Path(__file__).parent / "configs"
open_clip.add_model_config(CONFIG_DIR)


class Towers(NamedTuple):
    """What a VLPModel needs from a model zoo: two encoders and how to feed them."""

    image: nn.Module  # (B, 3, H, W) -> (B, D)
    text: nn.Module  # (B, L) token ids -> (B, D)
    preprocess: dict[str, Any]  # open_clip PreprocessCfg fields: size, mean, std, ...
    tokenizer: Callable  # list[str] -> (B, L) token ids


def open_clip_towers(
    arch: str,
    pretrained: Optional[str] = None,
    *,
    image_size: Optional[int] = None,
    context_length: Optional[int] = None,
    cache_dir: Optional[str] = None,
    text_model: Optional[str] = None,
) -> Towers:
    """Builds both towers of an open_clip architecture.

    Args:
        arch: open_clip model name (`open_clip.list_models()`), or `hf-hub:` / `local-dir:`.
        pretrained: open_clip pretrained tag (e.g. `laion2b_s34b_b79k`), a local open_clip
            checkpoint file, or a vlp checkpoint (`.ckpt`) or `vlp-export` folder (its towers);
            None for random initialisation.
        image_size: overrides the architecture's input resolution.
        context_length: overrides the text context length.
        cache_dir: where tagged weights are downloaded to.
        text_model: a Hugging Face model id or local folder (config and tokenizer files) replacing
            the architecture's HF text tower and tokenizer, e.g. a copy of bert-base-uncased for
            `vlp-align-base` on a machine without the hub.
    """
    if ":" not in arch and arch not in open_clip.list_models():
        raise ValueError(
            f"unknown model.towers.arch={arch!r}; open_clip knows {len(open_clip.list_models())} "
            f"architectures, e.g. {', '.join(open_clip.list_models()[:5])}, ... "
            "(open_clip.list_models() lists them all)"
        )
    from_vlp = bool(pretrained) and is_vlp_weights(pretrained)
    text_cfg = hf_text_cfg(arch, text_model, context_length) if text_model else None
    if pretrained and not Path(pretrained).exists() and ":" not in arch:
        tags = open_clip.list_pretrained_tags_by_model(arch)
        if pretrained not in tags:
            raise ValueError(
                f"model.towers.pretrained={pretrained!r} is neither a file nor an open_clip tag "
                f"of {arch} (tags: {', '.join(tags) or 'none'})"
            )
    with weights_loaded_later() if from_vlp else nullcontext():
        clip = open_clip.create_model(
            arch,
            pretrained=None if from_vlp else pretrained,
            force_custom_text=True,  # keeps the text tower one module: `clip.text`
            force_image_size=image_size,
            force_context_length=context_length,
            pretrained_text=False,  # never fetch HF text weights implicitly
            cache_dir=cache_dir,
            **({"text_cfg": text_cfg} if text_model else {}),
        )
    if from_vlp:
        _load_towers(clip, pretrained)
    preprocess = dict(open_clip.get_model_preprocess_cfg(clip))
    return Towers(
        image=clip.visual,
        text=clip.text,
        preprocess=preprocess,
        tokenizer=HFTokenizer(text_model, context_length=text_cfg.get("context_length", DEFAULT_CONTEXT_LENGTH))
        if text_model
        else open_clip.get_tokenizer(arch, context_length=context_length),
    )


def has_resnet_image_tower(model_cfg: dict) -> bool:
    """Whether an open_clip model config builds a ModifiedResNet image tower (its `layers` is a list per stage)."""
    return isinstance(model_cfg["vision_cfg"].get("layers"), (list, tuple))


def hf_text_cfg(arch: str, text_model: str, context_length: Optional[int] = None) -> dict[str, Any]:
    """The text config of `arch` with its Hugging Face tower and tokenizer read from `text_model`.

    Raises:
        ValueError: `arch` has no Hugging Face text tower.
    """
    text_cfg = copy.deepcopy((open_clip.get_model_config(arch) or {}).get("text_cfg", {}))
    if "hf_model_name" not in text_cfg:
        raise ValueError(f"model.towers.text_model={text_model!r}: {arch} has no Hugging Face text tower")
    text_cfg.update(hf_model_name=text_model, hf_tokenizer_name=text_model, hf_model_pretrained=False)
    if context_length:
        text_cfg["context_length"] = context_length
    return text_cfg


def _load_towers(clip: nn.Module, path: str) -> None:
    """Both towers' weights from a vlp checkpoint or export; they must fit the architecture exactly."""
    state = read_state_dict(path)
    for prefix, tower in (("image_tower.", clip.visual), ("text_tower.", clip.text)):
        try:
            tower.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
        except RuntimeError as err:
            first = str(err).splitlines()[1].strip() if len(str(err).splitlines()) > 1 else str(err)
            raise ValueError(f"model.towers.pretrained={path}: its {prefix.rstrip('.')} does not fit "
                             f"model.towers.arch ({first})") from err
