"""Image and text towers from open_clip's model zoo.

Any open_clip architecture works by name (`ViT-B-32`, `RN50`, timm- and HF-text-tower
configs); the small in-repo configs in `configs/` are registered on import for tests
and the demo. Weights load from an open_clip pretrained tag or a local checkpoint file.
"""
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional

import open_clip
import torch.nn as nn

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
) -> Towers:
    """Builds both towers of an open_clip architecture.

    Args:
        arch: open_clip model name (`open_clip.list_models()`), or `hf-hub:` / `local-dir:`.
        pretrained: open_clip pretrained tag (e.g. `laion2b_s34b_b79k`) or a local
            checkpoint path; None for random initialisation.
        image_size: overrides the architecture's input resolution.
        context_length: overrides the text context length.
        cache_dir: where tagged weights are downloaded to.
    """
    if ":" not in arch and arch not in open_clip.list_models():
        raise ValueError(
            f"unknown model.towers.arch={arch!r}; open_clip knows {len(open_clip.list_models())} "
            f"architectures, e.g. {', '.join(open_clip.list_models()[:5])}, ... "
            "(open_clip.list_models() lists them all)"
        )
    if pretrained and not Path(pretrained).is_file() and ":" not in arch:
        tags = open_clip.list_pretrained_tags_by_model(arch)
        if pretrained not in tags:
            raise ValueError(
                f"model.towers.pretrained={pretrained!r} is neither a file nor an open_clip tag "
                f"of {arch} (tags: {', '.join(tags) or 'none'})"
            )
    clip = open_clip.create_model(
        arch,
        pretrained=pretrained,
        force_custom_text=True,  # keeps the text tower one module: `clip.text`
        force_image_size=image_size,
        force_context_length=context_length,
        pretrained_text=False,  # never fetch HF text weights implicitly
        cache_dir=cache_dir,
    )
    preprocess = dict(open_clip.get_model_preprocess_cfg(clip))
    return Towers(
        image=clip.visual,
        text=clip.text,
        preprocess=preprocess,
        tokenizer=open_clip.get_tokenizer(arch, context_length=context_length),
    )
