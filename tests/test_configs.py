"""Every config composes and instantiates; mistakes fail at compose time naming the culprit."""
from pathlib import Path

import open_clip
import pytest
import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate
from omegaconf import OmegaConf, open_dict

from vlp.config import register_configs
from vlp.datamodule import VLPDataModule
from vlp.lit import VLPLitModule
from vlp.models import VLPModel

CONF = Path(__file__).parents[1] / "conf"
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
register_configs()


def compose_train(overrides=(), run_dir="/tmp/vlp-test-run"):
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=list(overrides), return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)  # resolves ${hydra:...} as a real run would
    with open_dict(cfg):
        cfg.paths.run_dir = run_dir
        del cfg.hydra
    return cfg


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes_and_instantiates(experiment, tmp_path, tiny_hf_arch):
    overrides = [f"experiment={experiment}", f"data.train.urls={tmp_path}"]
    if experiment == "align":  # same recipe with a tiny local BERT: tests never download
        assert compose_train(overrides).model.towers.arch == "vlp-align-base"
        overrides.append(f"model.towers.arch={tiny_hf_arch}")
    cfg = compose_train(overrides, str(tmp_path))
    model = instantiate(cfg.model)
    assert isinstance(model, VLPModel)
    datamodule = instantiate(cfg.data, preprocess=model.preprocess, tokenizer=model.tokenizer, _convert_="all")
    assert isinstance(datamodule, VLPDataModule)
    task = instantiate(cfg.task, _partial_=True)  # the task's LightningModule, as vlp-train builds it
    lit = task(model, loss=instantiate(cfg.loss), optimizer=instantiate(cfg.optim),
               scheduler=instantiate(cfg.scheduler))
    assert isinstance(lit, VLPLitModule) and lit.model is model
    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    trainer_cfg.update(accelerator="cpu", devices=1, strategy="auto")  # CI has one CPU device
    assert isinstance(instantiate(trainer_cfg, logger=False), pl.Trainer)
    assert all(instantiate(c) for c in cfg.callbacks.values())


def test_a_pretrained_coca_brings_its_decoder_to_task_caption(tmp_path):
    torch.manual_seed(0)
    coca = open_clip.create_model("vlp-coca-micro")
    torch.nn.init.normal_(coca.text_decoder.text_projection)  # open_clip leaves it uninitialised
    path = tmp_path / "coca.pt"
    torch.save(coca.state_dict(), path)
    model = instantiate(compose_train(["task=caption", f"model.towers.pretrained={path}"]).model)
    for name, module in (("visual", model.image_tower), ("text_decoder", model.heads["caption"])):
        for key, value in getattr(coca, name).state_dict().items():
            torch.testing.assert_close(module.state_dict()[key], value)


def test_default_config_is_the_small_model_on_synthetic_data_on_cpu():
    cfg = compose_train()
    assert cfg.model.towers.arch.startswith("vlp-clip")
    assert "synthetic" in cfg.data.train.urls
    assert cfg.trainer.accelerator == "cpu"
    assert cfg.trainer.precision == "bf16-mixed"


def test_the_fusion_demo_trains_on_relation_rich_data_and_its_vqa_recipe_on_the_questions(tmp_path):
    fusion = compose_train(["experiment=fusion_synthetic", f"paths.data_dir={tmp_path}"]).data
    prepare = instantiate(fusion.prepare)
    assert (prepare.keywords["two_objects"], prepare.keywords["relation_captions"]) == (0.8, True)
    folder = str(tmp_path / "synthetic_relations")  # its own folder: the default data stays as it is
    assert prepare.keywords["out_dir"] == folder
    assert all(str(path).startswith(folder) for path in (fusion.train.urls, fusion.val.urls, fusion.zeroshot))
    vqa = compose_train(["experiment=vqa_synthetic", f"paths.data_dir={tmp_path}"]).data  # builds on fusion_synthetic
    assert vqa.num_answers == 16 and vqa.train.urls.startswith(str(tmp_path / "synthetic" / "train"))
    assert not instantiate(vqa.prepare).keywords["relation_captions"]


@pytest.mark.parametrize("override,culprit", [
    ("trainer.max_step=5", "max_step"),  # typo of a key
    ("data.batchsize=8", "batchsize"),
    ("model=clip_huge", "clip_huge"),  # unknown group option
    ("trainer.max_steps=many", "max_steps"),  # wrong type
    ("data.batch_size=1.5", "batch_size"),
])
def test_bad_overrides_fail_at_compose_time_naming_the_key(override, culprit):
    with pytest.raises(ConfigCompositionException) as err:
        compose_train([override])
    assert culprit in str(err.value) + str(err.value.__cause__)


def test_unknown_architecture_is_named():
    cfg = compose_train(["model.towers.arch=ViT-Q-99"])
    with pytest.raises(Exception, match="ViT-Q-99"):
        instantiate(cfg.model)


def test_pretrained_must_be_a_known_tag_or_a_file():
    cfg = compose_train(["model.towers.pretrained=no_such_tag"])
    with pytest.raises(Exception, match="no_such_tag"):
        instantiate(cfg.model)


@pytest.mark.parametrize("loss", sorted(p.stem for p in (CONF / "loss").glob("*.yaml")))
def test_every_loss_option_trains_one_step(loss):
    cfg = compose_train([f"loss={loss}"])
    model, loss_fn = instantiate(cfg.model), instantiate(cfg.loss)
    out = model(torch.randn(4, 3, 64, 64), model.tokenizer(["a red circle", "a blue star", "two", "shapes"]))
    loss_fn(out.image_features, out.text_features, *out.logit_args).loss.backward()
    assert model.logit_scale.grad is not None


def test_siglip_initialises_scale_10_and_bias_minus_10():
    model = instantiate(compose_train(["loss=siglip"]).model)
    assert model.logit_scale.exp().item() == pytest.approx(10.0)
    assert model.logit_bias.item() == pytest.approx(-10.0)


def test_align_recipe_is_efficientnet_bert_with_label_smoothing():
    cfg = compose_train(["experiment=align", "data.train.urls=/data"])
    assert cfg.loss.label_smoothing == 0.1
    arch = open_clip.get_model_config(cfg.model.towers.arch)
    assert arch["vision_cfg"]["timm_model_name"].startswith("efficientnet")
    assert arch["text_cfg"]["hf_model_name"] == "bert-base-uncased"


def test_augmentation_is_set_from_the_command_line(tmp_path):
    cfg = compose_train(["+data.augment.scale=[0.5,1.0]", "+data.augment.gray_scale_prob=0.2"], str(tmp_path))
    model = instantiate(cfg.model)
    datamodule = instantiate(cfg.data, preprocess=model.preprocess, tokenizer=model.tokenizer, _convert_="all")
    steps = datamodule.train_decoder.transform.transforms
    crop = next(t for t in steps if type(t).__name__ == "RandomResizedCrop")
    assert list(crop.scale) == [0.5, 1.0]
    assert any(isinstance(t, open_clip.transform.gray_scale) for t in steps)
