"""`vlp-train`: contrastive pretraining, or a downstream task (`task=vqa|caption`), from a Hydra config.

    vlp-train                                   # small CLIP on the synthetic data, on CPU
    vlp-train model=clip_tiny trainer.max_steps=200
    vlp-train trainer=ddp trainer.devices=2      # 2 processes (gloo on CPU, NCCL on GPU)
    vlp-train ckpt_path=runs/x/checkpoints/last.ckpt   # resume
    vlp-train init_from=runs/x/checkpoints/last.ckpt   # a new run from its weights
    vlp-train hydra.run.dir=runs/x ckpt_path=auto      # resume runs/x from its last checkpoint, if any
    vlp-train -m optim.lr=1e-4,3e-4             # sweep
"""
import gc
import json
import logging
import os
import sys
import traceback
import warnings
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Optional

import vlp.lightning_import  # noqa: F401  (first: Lightning without scipy.signal, see there)
import hydra
import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from vlp.checkpoint import load_weights, weights_loaded_later
from vlp.cli import BadInput, TrainingStarted, reject_repeated_overrides
from vlp.config import CONF_DIR, register_configs
from vlp.datamodule import check_boxes
from vlp.guards import StopOnNonFiniteLoss
from vlp.loggers import build_loggers
from vlp.models.attention import attention_kernels
from vlp.resume import AtomicCheckpointIO, RankRngStates, ResumePoint, global_step, resolve_ckpt_path
from vlp.rundir import keep_launch_config, remove_interrupted_writes
from vlp.sweep import in_sweep, record_failure, reject_lightning_spawner

log = logging.getLogger("vlp.train")  # not "__main__" under `python -m`: the vlp logging config applies
register_configs()
# conf/hydra/launcher/submitit_*.yaml show the plugin's keys under the plugin's own names, which
# Hydra validates against the plugin's schema of the same name (and warns that this is old style)
warnings.filterwarnings("ignore", message=r"\s*'hydra/launcher/submitit_\w+' is validated against ConfigStore schema")
# the module's on_before_batch_transfer (text padding) is meant to apply with vlp's datamodule
warnings.filterwarnings("ignore", message="You have overridden `on_before_batch_transfer` in `LightningModule`")


def train(cfg: DictConfig) -> dict[str, float]:
    """Fits, validates at the final step, writes `<run dir>/metrics.json` and returns its metrics.

    Raises:
        BadInput: bad input found before training started (missing shards, unset keys, bad values).
    """
    training = TrainingStarted()
    with training.input_errors_as_bad_input():  # one line until training starts, a traceback after
        if cfg.micro_batch_size is not None and cfg.micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be positive or null, got {cfg.micro_batch_size}")
        if cfg.float32_matmul_precision not in MATMUL_PRECISIONS:
            raise ValueError(f"float32_matmul_precision={cfg.float32_matmul_precision!r}: choose one of "
                             f"{', '.join(MATMUL_PRECISIONS)}")
        if cfg.micro_batch_size and cfg.trainer.gradient_clip_val:
            raise ValueError("micro_batch_size cannot be combined with trainer.gradient_clip_val yet "
                             "(Lightning clips gradients only when it steps the optimiser itself)")
        pl.seed_everything(cfg.seed, workers=True)
        run_dir = Path(cfg.paths.run_dir)
        ckpt_path = resolve_ckpt_path(cfg.ckpt_path, run_dir)
        keep_launch_config(run_dir)
        remove_interrupted_writes(run_dir)
        with weights_loaded_later() if cfg.init_from else nullcontext():
            model = instantiate(cfg.model)
        if cfg.init_from:  # weights only: this run's optimiser and schedule start fresh at step 0
            log.info("init_from: %s", load_weights(model, cfg.init_from))
        check_boxes(model, cfg.data.get("max_boxes"))
        datamodule = instantiate(cfg.data, preprocess=model.preprocess, tokenizer=model.tokenizer, _convert_="all")
        task = instantiate(cfg.task, _partial_=True)  # the task's LightningModule (conf/task/): pretrain, vqa, caption
        lit = task(
            model,
            loss=instantiate(cfg.loss),
            optimizer=instantiate(cfg.optim),
            scheduler=instantiate(cfg.scheduler) if cfg.scheduler else None,
            config=OmegaConf.to_container(cfg, resolve=True),
            param_group_options=OmegaConf.to_container(cfg.param_groups),
            micro_batch_size=cfg.micro_batch_size,
            objectives=OmegaConf.to_container(cfg.objectives),
            seed=cfg.seed,
        )
        callbacks = [instantiate(c) for c in cfg.callbacks.values() if c]
        callbacks += [StopOnNonFiniteLoss(), RankRngStates(), ResumePoint(), training]
        loggers = build_loggers(cfg.logger, str(run_dir), resume_step=global_step(ckpt_path) if ckpt_path else 0)
        trainer = instantiate(cfg.trainer, logger=loggers or False, callbacks=callbacks,
                              plugins=[AtomicCheckpointIO()], **fusion_ddp_options(cfg))
        reject_lightning_spawner(trainer)
        with float32_matmul_precision(cfg.float32_matmul_precision), \
                attention_kernels(trainer.strategy.root_device.type, str(trainer.precision),
                                  cfg.float32_matmul_precision):
            trainer.fit(lit, datamodule=datamodule, ckpt_path=ckpt_path)
    if datamodule.val_set is not None and lit.validated_at_step != trainer.global_step:
        with float32_matmul_precision(cfg.float32_matmul_precision):
            trainer.validate(lit, datamodule=datamodule, verbose=False)
    metrics = {"global_step": trainer.global_step}
    metrics |= {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    if trainer.is_global_zero:
        (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
        print(summary(metrics, run_dir))
    return metrics


MATMUL_PRECISIONS = ("highest", "high", "medium")  # torch.set_float32_matmul_precision's


@contextmanager
def float32_matmul_precision(precision: str):
    """torch's float32 matmul precision for the run, the process's own restored after it.

    "medium" lets torch pick faster kernels for float32 matrix products: TF32 on NVIDIA GPUs (which
    open_clip_train enables there too), oneDNN's bf16-capable ones on CPUs. On this project's
    CPU (AVX-512 bf16) they ran 1.7-2.8x faster at 4e-7 relative error against plain float32's
    2.5e-7 (bf16 inputs would give 2e-3; BENCHMARKS.md).
    """
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def fusion_ddp_options(cfg: DictConfig) -> dict:
    """A fusion model has parameters that no objective reaches (the image stream's last layer feeds
    no [CLS]), so DDP must look for parameters without gradient."""
    if cfg.model.fusion is not None and cfg.trainer.strategy == "ddp":
        return {"strategy": "ddp_find_unused_parameters_true"}
    return {}


def summary(metrics: dict[str, float], run_dir: Path) -> str:
    """The final validation results, for people."""
    lines = [f"\nvlp-train finished at step {metrics['global_step']}; run directory: {run_dir}"]
    for key in sorted(k for k in metrics if k.startswith("val/")):
        value = metrics[key]
        lines.append(f"  {key:<24} {value:8.1%}" if key != "val/num_samples" else f"  {key:<24} {value:8.0f}")
    lines.append(f"  metrics: {run_dir / 'metrics.json'}; last checkpoint: {run_dir / 'checkpoints' / 'last.ckpt'}")
    return "\n".join(lines)


def main() -> None:
    """`vlp-train`: checks the command line, then runs the Hydra application."""
    try:
        reject_repeated_overrides(sys.argv[1:])
    except BadInput as err:
        sys.exit(f"vlp-train: {err}")
    hydra_app()


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def hydra_app(cfg: DictConfig) -> Optional[float]:
    try:
        metrics = train(cfg)
    except BadInput as err:
        if in_sweep():
            return record_failure(Path(cfg.paths.run_dir), err, str(err))
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        # bad input (a missing shard, an unset key, a wrong value): the message, not a traceback
        log.error("%s (HYDRA_FULL_ERROR=1 shows the traceback)", err)
        sys.exit(1)
    except Exception as err:
        if in_sweep():  # a failed trial is recorded as failed; the sweep goes on
            return record_failure(Path(cfg.paths.run_dir), err, traceback.format_exc())
        raise
    finally:
        # the trainer, model and optimiser hold reference cycles: freed now, not at the next full
        # collection, so a sweep's next trial (or the exit) starts without them
        gc.collect()
    return metrics.get(cfg.optimized_metric) if cfg.optimized_metric else None


if __name__ == "__main__":
    main()
