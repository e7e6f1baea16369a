"""`vlp-eval`: zero-shot classification and retrieval of a trained model, as validation in training does it.

    vlp-eval model_path=runs/demo/checkpoints/last.ckpt      # a vlp checkpoint, on the data group's val shards
    vlp-eval model_path=exports/demo                         # a vlp-export folder
    vlp-eval model=clip_vit_b32 model.towers.pretrained=laion2b_s34b_b79k data=wds \\
        image_folder=/data/imagenet/val zeroshot=imagenet    # an open_clip tag on an ImageNet folder

Webdataset shards (`data.val.urls`) go through the same LightningModule validation as `vlp-train`
(retrieval recall@k and, with prompts, zero-shot top-k on the labelled samples: `val/...` keys), so
the numbers equal those of training on the same data, on one device or many (`trainer=ddp`); an image
folder gives `folder/zeroshot_top1|5`, computed on one device (rank 0).
Prints a table and writes `<run dir>/metrics.json`.
"""
import json
import logging
import os
import sys
from pathlib import Path
from typing import Optional

import vlp.lightning_import  # noqa: F401  (first: Lightning without scipy.signal, see there)
import hydra
import torch
import torch.nn as nn
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue
from open_clip.transform import PreprocessCfg, image_transform_v2
from pytorch_lightning.utilities.rank_zero import rank_zero_only

from vlp.checkpoint import load_model, run_config
from vlp.config import CONF_DIR, register_configs
from vlp.datamodule import check_boxes
from vlp.eval.folder import folder_zeroshot_metrics, image_folder
from vlp.eval.prompts import load_prompts
from vlp.lit import VLPLitModule

log = logging.getLogger(__name__)
register_configs()


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Evaluates the configured model on the val shards and/or the image folder; writes metrics.json."""
    if not cfg.data.val.urls and not cfg.image_folder:
        raise ValueError("nothing to evaluate: set data.val.urls (webdataset shards) and/or image_folder")
    if cfg.image_folder and not cfg.zeroshot:
        raise ValueError("image_folder needs zero-shot prompts: zeroshot=imagenet or a JSON file")
    model = load_model(cfg.model_path) if cfg.model_path else instantiate(cfg.model).eval()
    if cfg.image_folder:  # checked before the shards run
        prompts = load_prompts(cfg.zeroshot)
        transform = image_transform_v2(PreprocessCfg(**model.preprocess), is_train=False)
        dataset = image_folder(cfg.image_folder, transform, len(prompts[0]))
    metrics = shard_metrics(model, cfg) if cfg.data.val.urls else {}
    if rank_zero_only.rank != 0:  # under DDP the other ranks only helped with the shards
        return metrics
    if cfg.image_folder:
        gpu = cfg.trainer.accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available()
        found = folder_zeroshot_metrics(model.to("cuda" if gpu else "cpu"), dataset, *prompts, cfg.data.batch_size,
                                        cfg.data.num_workers, cfg.trainer.enable_progress_bar)
        metrics |= {f"folder/{k}": v for k, v in found.items()}
    run_dir = Path(cfg.paths.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
    print(table(metrics, cfg.model_path or cfg.model.towers.arch, run_dir))
    return metrics


def shard_metrics(model: nn.Module, cfg: DictConfig) -> dict[str, float]:
    """Lightning validation of `model` on `data.val.urls`, exactly as `vlp-train` validates."""
    data = OmegaConf.to_container(cfg.data, resolve=True, throw_on_missing=False)
    data["train"] = {}  # evaluation reads no training shards
    data["zeroshot"] = cfg.zeroshot
    if cfg.model_path and not data.get("max_boxes"):  # a region-token model reads the boxes it trained with
        data["max_boxes"] = run_config(cfg.model_path).get("data", {}).get("max_boxes", 0)
    check_boxes(model, data.get("max_boxes"))
    datamodule = instantiate(data, preprocess=model.preprocess, tokenizer=model.tokenizer, _convert_="all")
    trainer = instantiate(cfg.trainer, logger=False, callbacks=[])
    [results] = trainer.validate(VLPLitModule(model, loss=None, optimizer=None), datamodule=datamodule,
                                 verbose=False)
    return {k: float(v) for k, v in results.items()}


def table(metrics: dict[str, float], source: str, run_dir: Path) -> str:
    """The results, for people: percentages, and sample counts as counts."""
    lines = [f"\nvlp-eval of {source}"]
    for key in sorted(metrics):
        count = key.endswith("num_samples")
        lines.append(f"  {key:<26} {metrics[key]:8.0f}" if count else f"  {key:<26} {metrics[key]:8.1%}")
    lines.append(f"  metrics: {run_dir / 'metrics.json'}")
    return "\n".join(lines)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="eval")
def main(cfg: DictConfig) -> Optional[float]:
    try:
        metrics = evaluate(cfg)
    except (FileNotFoundError, KeyError, MissingMandatoryValue, ValueError) as err:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        log.error("%s: %s (HYDRA_FULL_ERROR=1 shows the traceback)", type(err).__name__, err)
        sys.exit(1)
    return metrics.get("val/zeroshot_top1", metrics.get("folder/zeroshot_top1"))


if __name__ == "__main__":
    main()
