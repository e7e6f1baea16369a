"""`vlp-train task=caption|vqa` end to end as users run them: training, validation metrics,
checkpoints that rebuild, init_from, 2-process gloo DDP, `vlp-caption`, a CoCa export that open_clip
runs, and `scripts/caption_shape_probe.py`."""
import json
import re
import subprocess
import sys
from pathlib import Path

import open_clip
import pytest
import torch
from hydra.utils import instantiate
from open_clip.loss import CoCaLoss
from test_train import TRAIN_SAMPLES, VAL_SAMPLES, run_cli
from test_train import vlp_train as _vlp_train

from vlp.checkpoint import load_model, load_weights
from vlp.data.synthetic import write_dataset
from vlp.export import export
from vlp.models.caption import caption_forward, caption_loss

FUSION = ["fusion=cross_attention", "model.fusion.width=64", "model.fusion.layers=1"]
FAST = ["trainer.max_steps=4", "trainer.val_check_interval=4", "trainer.precision=32-true", "data.batch_size=16"]


def vlp_train(*args):
    """`vlp-train` with a long timeout: a fusion model's start-up is slow on a busy 2-core machine."""
    return _vlp_train(*args, timeout=1800)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_dataset(root / "synthetic", train_samples=TRAIN_SAMPLES, val_samples=VAL_SAMPLES, samples_per_shard=256)
    return root


@pytest.fixture(scope="module")
def pretrained_fusion(tmp_path_factory, data_dir):
    """A few steps of fusion pretraining: the checkpoint VQA starts from."""
    run = tmp_path_factory.mktemp("pretrain")
    vlp_train(run, data_dir, *FUSION, *FAST, "trainer.limit_val_batches=1")
    return run / "checkpoints" / "last.ckpt"


def _questions(data_dir) -> int:
    """Questions in the validation shards, by reading their json."""
    import webdataset as wds
    samples = wds.tarfile_to_samples()(dict(url=str(u)) for u in sorted((data_dir / "synthetic").glob("val-*.tar")))
    return sum(len(json.loads(s["json"])["qa"]) for s in samples)


@pytest.mark.parametrize("ddp", [[], ["trainer=ddp", "trainer.devices=2"]], ids=["1-process", "ddp"])
def test_vqa_fine_tunes_from_a_fusion_checkpoint(tmp_path, data_dir, pretrained_fusion, ddp):
    run = tmp_path / "vqa"
    proc_metrics = vlp_train(run, data_dir, "task=vqa", *FUSION, *FAST, *ddp, f"init_from={pretrained_fusion}")
    assert proc_metrics["global_step"] == 4
    assert proc_metrics["val/num_samples"] == _questions(data_dir)  # every question once, over all ranks
    assert 0.0 <= proc_metrics["val/vqa_acc"] <= 1.0
    assert {"val/vqa_acc_colour", "val/vqa_acc_shape", "val/vqa_acc_count", "val/vqa_majority_acc",
            "val/vqa_acc_labelled", "val/vqa_majority_acc_labelled"} <= set(proc_metrics)
    log = (run / "train.log").read_text()
    assert "missing in the file, initialised fresh: heads.vqa." in log  # init_from names the new head
    answers = json.loads((run / "answers.json").read_text())
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert checkpoint["vlp_answers"] == answers and "red" in answers and "two" in answers
    model = load_model(run / "checkpoints" / "last.ckpt")  # rebuilds with its answer head
    assert model.heads["vqa"].mlp[-1].out_features == 16


def test_vqa_reads_region_tokens(tmp_path, data_dir):
    metrics = vlp_train(tmp_path / "vqa", data_dir, "task=vqa", *FUSION, *FAST, "model.fusion.image_input=regions",
                        "data.max_boxes=2")
    assert metrics["global_step"] == 4 and metrics["val/num_samples"] == _questions(data_dir)
    assert 0.0 <= metrics["val/vqa_acc"] <= 1.0


def test_init_from_loads_matching_weights_exactly_and_reports_the_new_head(tmp_path, data_dir, pretrained_fusion):
    source = load_model(pretrained_fusion)
    config = torch.load(pretrained_fusion, map_location="cpu", weights_only=False)["vlp_config"]["model"]
    config["heads"] = {"vqa": {"_target_": "vlp.models.heads.VQAHead", "width": 64, "num_answers": 16}}
    torch.manual_seed(123)  # a different initialisation from the source's
    model = instantiate(config)
    report = load_weights(model, pretrained_fusion)
    assert report.missing == sorted(k for k in model.state_dict() if k.startswith("heads.vqa."))
    assert not report.unexpected and not report.mismatched
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in source.state_dict().items())
    assert "heads.vqa.mlp.0.weight" in str(report)


def test_vqa_without_fusion_fails_at_start_up_naming_the_fix(tmp_path, data_dir):
    proc = run_cli("task=vqa", "debug=fast", f"paths.data_dir={data_dir}", f"hydra.run.dir={tmp_path}", timeout=1800)
    assert proc.returncode == 1
    assert "VQA needs a fusion model: add fusion=cross_attention|merged|co_attention" in proc.stdout + proc.stderr


# the recipe's ResNet CoCa in one process, open_clip's ViT CoCa (task=caption's default) under DDP
@pytest.mark.parametrize("overrides", [["experiment=caption_synthetic"],
                                       ["task=caption", "trainer=ddp", "trainer.devices=2"]],
                         ids=["1-process-resnet-recipe", "ddp-vit"])
def test_caption_trains_validates_and_vlp_caption_prints_captions(tmp_path, data_dir, overrides):
    run = tmp_path / "caption"
    metrics = vlp_train(run, data_dir, *FAST, *overrides, "task.generation.max_len=6")
    for key in ("val/caption_bleu4", "val/caption_cider", "val/caption_attr_acc"):
        assert 0.0 <= metrics[key] < 1.0  # four steps of training name no colour and shape right
    if "experiment=caption_synthetic" in overrides:
        _recipe_validates_heldout_and_seen_pairs_apart(metrics)
    else:
        assert metrics["val/num_samples"] == VAL_SAMPLES and "val/caption_attr_acc_seen" not in metrics
    checkpoint = run / "checkpoints" / "last.ckpt"
    assert type(load_model(checkpoint).heads["caption"]).__name__ == "MultimodalTransformer"
    if "trainer=ddp" in overrides:
        _open_clip_runs_the_exported_coca(checkpoint, tmp_path / "export")
        return
    shards = sorted((data_dir / "synthetic").glob("val-*.tar"))[0]
    proc = subprocess.run([sys.executable, "-m", "vlp.caption", str(checkpoint), str(shards), "--max-len", "6",
                           "--num-beams", "2"], capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == VAL_SAMPLES and all(line.startswith("val_") and "\t" in line for line in lines)
    _caption_shape_probe_reads_three_sets(checkpoint)
    exported = subprocess.run([sys.executable, "-m", "vlp.export", str(checkpoint), str(tmp_path / "export")],
                              capture_output=True, text=True, timeout=600)
    assert exported.returncode == 0, exported.stderr[-3000:]
    assert "note: open_clip's CoCa cannot run a ResNet image tower" in exported.stdout


def _recipe_validates_heldout_and_seen_pairs_apart(metrics):
    """The recipe adds the val_seen shards; each single-object metric is the two halves' weighted mean."""
    heldout, seen = VAL_SAMPLES // 2, 256  # val's even indices; write_dataset's default val_seen_samples
    assert metrics["val/num_samples"] == VAL_SAMPLES + seen
    for key in ("val/caption_attr_acc", "val/zeroshot_top1", "val/zeroshot_top5"):
        halves = (metrics[f"{key}_heldout"] * heldout + metrics[f"{key}_seen"] * seen) / (heldout + seen)
        assert metrics[key] == pytest.approx(halves, abs=1e-6)
    assert metrics["val/zeroshot_top5_seen"] > 0  # not an empty half


def _open_clip_runs_the_exported_coca(checkpoint, out_dir):
    """open_clip's CoCa loads a vlp-export folder, decoder included, and computes the same caption loss."""
    export(checkpoint, out_dir)
    coca = open_clip.create_model(f"local-dir:{out_dir}").eval()  # a strict load: the decoder must be there
    model = load_model(checkpoint).eval()
    images, tokens = torch.randn(2, 3, 64, 64), model.tokenizer(["a red circle .", "two shapes : a blue star ."])
    with torch.no_grad():
        ref, out = coca(images, tokens), caption_forward(model, images, tokens)
    expected = CoCaLoss(caption_loss_weight=1.0, clip_loss_weight=0.0)(
        ref["image_features"], ref["text_features"], ref["logits"], ref["labels"], ref["logit_scale"])[1]
    torch.testing.assert_close(caption_loss(out.logits, out.labels), expected)


def _caption_shape_probe_reads_three_sets(checkpoint):
    script = Path(__file__).parents[1] / "scripts" / "caption_shape_probe.py"
    proc = subprocess.run([sys.executable, str(script), str(checkpoint), "--images", "8"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = re.findall(r"^(.+?) +shape right +([\d.]+)% +mean p\(true shape\) ([\d.]+) +\(8 images\)$",
                      proc.stdout, re.MULTILINE)
    assert [name for name, _, _ in rows] == ["held-out pairs, true colour", "training pairs, true colour",
                                             "held-out pairs, seen colour"]
    for _, right, p_true in rows:  # a share of the 8 images, and a mean probability
        assert float(right) % 12.5 == 0 and 0 <= float(p_true) <= 1
