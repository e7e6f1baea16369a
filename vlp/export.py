"""`vlp-export SOURCE OUT_DIR`: a trained vlp model in open_clip's local-dir format.

    vlp-export runs/demo/checkpoints/last.ckpt exports/demo
    python -c "import open_clip; open_clip.create_model_and_transforms('local-dir:exports/demo')"

OUT_DIR receives `open_clip_config.json` (`model_cfg`, `preprocess_cfg`, and under `vlp_config`
vlp's model config and `data.max_boxes`), `open_clip_model.safetensors` (the two towers, a CoCa's
caption decoder and `logit_scale` [+ `logit_bias`] under open_clip's names) and, for Hugging Face
tokenizers, the tokenizer files. open_clip, and tools built on it such as clip_benchmark, load the folder without
vlp. open_clip has no fusion module or other heads: a model that has them also gets
`vlp_model.safetensors`, the whole VLPModel, which `vlp.load`, `init_from` and `vlp-eval` read.
"""
import argparse
import copy
import json
import math
import sys
from pathlib import Path
from typing import Any, Union

import open_clip
import torch
from open_clip.tokenizer import HFTokenizer
from safetensors.torch import save_file

from vlp.checkpoint import CONFIG_KEY, load_model, run_config
from vlp.models import VLPModel
from vlp.models.towers import has_resnet_image_tower, hf_text_cfg
from vlp.models.weights import OPEN_CLIP_CONFIG, OPEN_CLIP_WEIGHTS, VLP_WEIGHTS

# open_clip's names; a CoCa's decoder (vlp's heads.caption) is open_clip's text_decoder
_TOWER_PREFIXES = {"image_tower.": "visual.", "text_tower.": "text.", "heads.caption.": "text_decoder."}


def export(source: Union[str, Path], out_dir: Union[str, Path]) -> Path:
    """Writes the model of a vlp checkpoint (or export) to `out_dir` in open_clip's local-dir format.

    Raises:
        KeyError: `source` was not written by vlp.
        ValueError: the architecture cannot be described to open_clip without vlp (an `hf-hub:` arch).
    """
    out_dir = Path(out_dir)
    run = run_config(source)
    model = load_model(source)  # which also checks that the saved config names only vlp's classes
    cfg = run["model"]
    open_clip_state, rest = open_clip_state_dict(model)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(open_clip_state, out_dir / OPEN_CLIP_WEIGHTS)
    if rest:  # fusion, heads: open_clip cannot hold them
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out_dir / VLP_WEIGHTS)
    model_cfg = open_clip_model_cfg(cfg["towers"], model)
    if isinstance(model.tokenizer, HFTokenizer):  # open_clip reads a local-dir's HF tokenizer from the folder
        model.tokenizer.save_pretrained(str(out_dir))
    # the boxes per sample a region-token model reads, so vlp-eval of the folder needs no data.max_boxes
    saved = {"model": cfg, "data": {"max_boxes": run.get("data", {}).get("max_boxes", 0)}}
    config = {"model_cfg": model_cfg, "preprocess_cfg": dict(model.preprocess), CONFIG_KEY: saved}
    (out_dir / OPEN_CLIP_CONFIG).write_text(json.dumps(config, indent=2))
    return out_dir


def open_clip_state_dict(model: VLPModel) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The towers (and a CoCa's decoder) and temperature under open_clip's (custom-text CLIP or CoCa)
    names, and the keys left out."""
    state, rest = {}, []
    for key, value in model.state_dict().items():
        prefix = next((p for p in _TOWER_PREFIXES if key.startswith(p)), None)
        if prefix:
            name = _TOWER_PREFIXES[prefix] + key[len(prefix):]
            state[name] = value.contiguous()
            if name.endswith(".running_mean"):  # a frozen BatchNorm (LiT) has no counter; open_clip's has one
                state.setdefault(name.removesuffix("running_mean") + "num_batches_tracked", torch.tensor(0))
        elif key not in ("logit_scale", "logit_bias"):
            rest.append(key)
    # open_clip does not clamp: export the multiplier vlp uses, so the logits agree
    state["logit_scale"] = torch.tensor(math.log(model.scale().item()))
    if model.logit_bias is not None:
        state["logit_bias"] = model.logit_bias.detach().clone()
    return state, rest


def open_clip_model_cfg(towers_cfg: dict[str, Any], model: VLPModel) -> dict[str, Any]:
    """open_clip's model config of the towers, with vlp's overrides applied (resolution, context, bias)."""
    arch = towers_cfg["arch"]
    if arch.startswith("local-dir:"):
        base = json.loads((Path(arch.removeprefix("local-dir:")) / OPEN_CLIP_CONFIG).read_text())["model_cfg"]
    elif ":" in arch:
        raise ValueError(f"cannot export model.towers.arch={arch!r}: only open_clip names and local-dir: "
                         "folders describe the architecture offline")
    else:
        base = open_clip.get_model_config(arch)
    cfg = copy.deepcopy(base)
    cfg["custom_text"] = True  # vlp's text tower is one module, `text.`: open_clip's CustomTextCLIP
    if towers_cfg.get("image_size"):
        cfg["vision_cfg"]["image_size"] = towers_cfg["image_size"]
    if towers_cfg.get("context_length"):
        cfg["text_cfg"]["context_length"] = towers_cfg["context_length"]
    if towers_cfg.get("text_model"):
        cfg["text_cfg"] = hf_text_cfg(arch, towers_cfg["text_model"], towers_cfg.get("context_length"))
    if model.logit_bias is not None:
        cfg["init_logit_bias"] = float(model.logit_bias)  # gives open_clip's model the parameter
    return cfg


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="vlp-export", description=__doc__.splitlines()[0])
    parser.add_argument("source", help="vlp-train checkpoint (.ckpt) or vlp-export folder")
    parser.add_argument("out_dir", help="folder to write (created); load it with open_clip as local-dir:OUT_DIR")
    args = parser.parse_args(argv)
    try:
        out_dir = export(args.source, args.out_dir)
    except (FileNotFoundError, KeyError, ValueError) as err:
        parser.exit(1, f"vlp-export: error: {err}\n")
    left_out = " (fusion and heads: only in vlp_model.safetensors)" if (out_dir / VLP_WEIGHTS).exists() else ""
    print(f"exported {args.source} to {out_dir}{left_out}; open_clip loads it as "
          f"open_clip.create_model_and_transforms('local-dir:{out_dir}')", file=sys.stdout)
    model_cfg = json.loads((out_dir / OPEN_CLIP_CONFIG).read_text())["model_cfg"]
    if "multimodal_cfg" in model_cfg and has_resnet_image_tower(model_cfg):
        print("note: open_clip's CoCa cannot run a ResNet image tower (it expects tokens from it): "
              "caption with vlp (vlp.load, vlp-caption)", file=sys.stdout)


if __name__ == "__main__":
    main()
