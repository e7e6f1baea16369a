"""Structured config schema: a typo or a wrong type fails when Hydra composes, naming the key.

The YAML files in `conf/` fill this schema; `train.yaml` lists it first in its defaults.
Keys that Lightning's `Trainer` takes but the schema lacks can still be added with `+trainer.KEY=...`.
"""
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import II, MISSING

from vlp.rundir import register_run_name_resolver

_PACKAGE = Path(__file__).resolve().parent
# installed (pip install ., a wheel): the package data vlp/conf; a source tree: conf/ beside vlp/
CONF_DIR = str(next((d for d in (_PACKAGE / "conf", _PACKAGE.parent / "conf") if (d / "train.yaml").is_file()),
                    _PACKAGE / "conf"))


@dataclass
class TowersConf:
    _target_: str = "vlp.models.open_clip_towers"
    arch: str = MISSING  # any name in open_clip.list_models(), or hf-hub:/local-dir:
    pretrained: Optional[str] = None  # open_clip tag or local checkpoint file
    image_size: Optional[int] = None
    context_length: Optional[int] = None
    cache_dir: Optional[str] = None
    text_model: Optional[str] = None  # HF text tower + tokenizer from this id or local folder (HF archs)


@dataclass
class ModelConf:
    _target_: str = "vlp.models.VLPModel"
    towers: TowersConf = field(default_factory=TowersConf)
    init_logit_scale: float = 1 / 0.07
    max_logit_scale: float = 100.0
    init_logit_bias: Optional[float] = None  # set for the sigmoid loss
    fusion: Any = None  # a partial fusion module: the `fusion=` group (cross_attention, merged, co_attention)
    heads: Dict[str, Any] = field(default_factory=dict)  # task heads; a fusion model adds itm and mlm itself
    lock_image: bool = False  # LiT: freeze the image tower ...
    lock_image_unlocked_groups: int = 0  # ... but its last N layer groups
    lock_image_freeze_bn_stats: bool = False
    lock_text: bool = False
    lock_text_unlocked_layers: int = 0
    lock_text_freeze_layer_norm: bool = True
    compile: Any = False  # torch.compile the towers and the loss: true, or its options ({mode: max-autotune})
    channels_last: bool = False  # channels-last image tower: faster convolutions (ResNet towers)
    trim_text_padding: bool = True  # text batches as long as their longest caption (exact; causal text towers)


@dataclass
class ObjectivesConf:
    """Loss weights (ITM and MLM act only with model.fusion) and their settings."""

    itc: float = 1.0  # the contrastive loss (`loss` group)
    itm: float = 1.0
    mlm: float = 1.0
    itm_across_ranks: bool = True  # ITM hard negatives from the global batch; false: this rank's only
    itm_false_negative_ratio: Optional[float] = None  # e.g. 0.95: skip candidates scoring > 95% of the positive
    itm_data_negatives: bool = True  # the shards' `negatives` captions are ITM no-match pairs too
    mlm_probability: float = 0.15
    rerank_k: int = 16  # validation re-scores the top-k retrieval candidates with ITM (0: off)


@dataclass
class TrainShardsConf:
    urls: Any = MISSING  # brace pattern, folder, glob, or a list of them
    num_samples: Optional[int] = None  # one epoch; from sizes.json beside the shards when null
    resampled: bool = True
    shuffle_buffer: int = 1000


@dataclass
class ValShardsConf:
    urls: Any = None  # no validation when null


@dataclass
class DataConf:
    _target_: str = "vlp.datamodule.VLPDataModule"
    train: TrainShardsConf = field(default_factory=TrainShardsConf)
    val: ValShardsConf = field(default_factory=ValShardsConf)
    batch_size: int = 64  # per device
    num_workers: int = 2  # per device
    # open_clip AugmentationCfg fields, e.g. +data.augment.scale=[0.5,1.0] (a dict, not None: Hydra
    # cannot add a key to a None node, so no override could set them)
    augment: Dict[str, Any] = field(default_factory=dict)
    zeroshot: Optional[str] = None  # JSON with classnames and templates
    prepare: Any = None  # callable run once per node before reading
    image_key: str = "jpg;png;jpeg;webp"
    caption_key: str = "txt"
    label_key: str = "cls"
    seed: int = II("seed")
    prefetch_factor: int = 4  # batches each worker prepares ahead
    max_boxes: int = 0  # region boxes per sample (json `boxes`), for model.fusion.image_input=regions


@dataclass
class VQADataConf(DataConf):
    """Data for `task=vqa`: one example per question of a sample's `{key}.json` `qa` list."""

    _target_: str = "vlp.tasks.vqa_data.VQADataModule"
    num_answers: int = 1000  # top-k answers of the training shards: the classifier's width
    answers_file: Optional[str] = None  # a json answer list to use instead (e.g. a run's answers.json)
    qa_key: str = "json"


@dataclass
class OptimConf:
    _target_: str = "torch.optim.AdamW"
    _partial_: bool = True
    lr: float = 5e-4
    weight_decay: float = 0.2
    betas: List[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-6
    fused: Optional[bool] = None


@dataclass
class ParamGroupsConf:
    """Learning rates per tower (multipliers of optim.lr) and layer-wise decay (1.0: off)."""

    image_lr_scale: float = 1.0
    text_lr_scale: float = 1.0
    layer_decay: float = 1.0


@dataclass
class SchedulerConf:
    _target_: str = "vlp.optim.cosine_with_warmup"
    _partial_: bool = True
    warmup_steps: int = 100
    min_lr_ratio: float = 0.0


@dataclass
class TrainerConf:
    """The most used `pytorch_lightning.Trainer` arguments, typed; passed to it as they are."""

    _target_: str = "pytorch_lightning.Trainer"
    accelerator: str = "auto"
    devices: Any = 1
    strategy: Any = "auto"
    num_nodes: int = 1
    precision: Any = "32-true"
    max_steps: int = -1
    max_epochs: Optional[int] = None
    val_check_interval: Any = None
    check_val_every_n_epoch: Optional[int] = 1
    limit_train_batches: Any = None
    limit_val_batches: Any = None
    num_sanity_val_steps: int = 0
    log_every_n_steps: int = 50
    gradient_clip_val: Optional[float] = None
    gradient_clip_algorithm: Optional[str] = None
    accumulate_grad_batches: int = 1
    deterministic: Any = None
    benchmark: Optional[bool] = None
    enable_progress_bar: bool = True
    enable_model_summary: bool = True
    fast_dev_run: Any = False
    profiler: Any = None
    default_root_dir: Optional[str] = II("paths.run_dir")  # where Lightning's SLURM requeue saves hpc_ckpt_N.ckpt
    sync_batchnorm: bool = False


@dataclass
class PathsConf:
    data_dir: str = "${oc.env:VLP_DATA_DIR,data}"
    run_dir: str = "${hydra:runtime.output_dir}"


@dataclass
class TrainConf:
    model: ModelConf = field(default_factory=ModelConf)
    data: DataConf = field(default_factory=DataConf)
    task: Dict[str, Any] = field(default_factory=dict)  # the LightningModule (conf/task/); tasks differ in arguments
    loss: Dict[str, Any] = field(default_factory=dict)  # losses differ in their arguments
    objectives: ObjectivesConf = field(default_factory=ObjectivesConf)
    optim: OptimConf = field(default_factory=OptimConf)
    param_groups: ParamGroupsConf = field(default_factory=ParamGroupsConf)
    scheduler: Optional[SchedulerConf] = field(default_factory=SchedulerConf)
    trainer: TrainerConf = field(default_factory=TrainerConf)
    logger: Optional[Dict[str, Any]] = None
    callbacks: Dict[str, Any] = field(default_factory=dict)
    paths: PathsConf = field(default_factory=PathsConf)
    seed: int = 0
    ckpt_path: Optional[str] = None  # resume from this checkpoint
    init_from: Optional[str] = None  # weights only (vlp .ckpt or vlp-export folder): a new run from step 0
    micro_batch_size: Optional[int] = None  # contrastive-exact micro-batching (feature cache), per device
    float32_matmul_precision: str = "medium"  # torch's: highest | high | medium (faster float32 products)
    optimized_metric: Optional[str] = "val/zeroshot_top1"  # what `vlp-train` returns to sweepers
    tags: List[str] = field(default_factory=list)


@dataclass
class EvalConf:
    """`vlp-eval`: the model comes from `model_path`, else from the `model` group (an open_clip tag)."""

    model: ModelConf = field(default_factory=ModelConf)
    data: DataConf = field(default_factory=DataConf)
    trainer: TrainerConf = field(default_factory=TrainerConf)
    paths: PathsConf = field(default_factory=PathsConf)
    model_path: Optional[str] = None  # vlp .ckpt or vlp-export folder
    image_folder: Optional[str] = None  # ImageNet-style class/xxx.jpg folder for zero-shot classification
    zeroshot: Optional[str] = II("data.zeroshot")  # prompts: JSON file or a built-in set (imagenet)
    seed: int = 0


def register_configs() -> None:
    ConfigStore.instance().store(name="train_schema", node=TrainConf)
    ConfigStore.instance().store(name="eval_schema", node=EvalConf)
    ConfigStore.instance().store(group="data", name="vqa_schema", node=VQADataConf)
    register_run_name_resolver()  # conf/hydra/default.yaml names the run directory with it
