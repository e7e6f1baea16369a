"""`vlp-train` with a fusion transformer, as users run it: each design, the recipes, DDP, resume."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import run_module
from test_train import TRAIN_SAMPLES, VAL_SAMPLES, data_dir, logged, run_cli, vlp_train  # noqa: F401 (fixture)
from vlp.checkpoint import load_model

FAST = ["trainer.max_steps=4", "trainer.val_check_interval=4", "trainer.log_every_n_steps=1",
        "model.fusion.width=64", "model.fusion.heads=2", "model.fusion.layers=1"]


def fast(*overrides: str) -> list[str]:
    """FAST with `overrides` replacing its keys (vlp-train refuses a key given twice)."""
    keys = {o.split("=")[0] for o in overrides}
    return [o for o in FAST if o.split("=")[0] not in keys] + list(overrides)


FUSION_METRICS = ["val/hard_negative_acc", "val/itm_hard_negative_acc", "val/itm_i2t_r@1", "val/itm_t2i_r@1"]


@pytest.mark.parametrize("fusion", ["cross_attention", "merged", "co_attention"])
def test_each_fusion_trains_logs_its_objectives_and_rebuilds_from_its_checkpoint(tmp_path, data_dir, fusion):
    run = tmp_path / "run"
    metrics = vlp_train(run, data_dir, f"fusion={fusion}", *FAST)
    assert metrics["global_step"] == 4 and metrics["val/num_samples"] == VAL_SAMPLES
    for key in FUSION_METRICS:
        assert 0.0 <= metrics[key] <= 1.0, key
    for key in ("train/itc_loss", "train/itm_loss", "train/mlm_loss", "train/itm_acc", "train/mlm_acc"):
        assert len(logged(run, key)) == 4, key
    itc, itm, mlm, total = (logged(run, k)[3] for k in ("train/itc_loss", "train/itm_loss", "train/mlm_loss",
                                                           "train/loss"))
    assert total == pytest.approx(itc + itm + mlm, rel=1e-3)  # weights 1, 1, 1
    model = load_model(run / "checkpoints" / "last.ckpt")
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    assert {k.split(".")[0] for k in model.state_dict()} >= {"image_tower", "text_tower", "fusion", "heads"}
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[f"model.{key}"]), key


def test_objective_weights_and_resume(tmp_path, data_dir):
    first = tmp_path / "first"
    vlp_train(first, data_dir, "fusion=merged", *fast("objectives.itc=0", "objectives.mlm=0.5"))
    assert logged(first, "train/loss")[3] == pytest.approx(
        logged(first, "train/itm_loss")[3] + 0.5 * logged(first, "train/mlm_loss")[3], rel=1e-3)
    resumed = tmp_path / "resumed"
    metrics = vlp_train(resumed, data_dir, "fusion=merged", *fast("objectives.itc=0", "objectives.mlm=0.5",
                        "trainer.max_steps=6", f"ckpt_path={first / 'checkpoints' / 'last.ckpt'}"))
    assert metrics["global_step"] == 6 and min(logged(resumed, "train/itm_loss")) >= 4


def test_ddp_with_fusion_on_two_cpu_processes(tmp_path, data_dir):
    metrics = vlp_train(tmp_path / "run", data_dir, "fusion=co_attention", "trainer=ddp", *fast(
        "trainer.devices=2", "trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.precision=32-true"))
    assert metrics["global_step"] == 2 and metrics["val/num_samples"] == VAL_SAMPLES
    assert all(key in metrics for key in FUSION_METRICS)


REGIONS = ["model.fusion.image_input=regions", "data.max_boxes=2"]


def test_region_tokens_under_ddp_rebuild_from_the_checkpoint(tmp_path, data_dir):
    run = tmp_path / "run"
    metrics = vlp_train(run, data_dir, "fusion=merged", "trainer=ddp", *REGIONS, *fast(
        "trainer.devices=2", "trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.precision=32-true"))
    assert metrics["global_step"] == 2 and all(key in metrics for key in FUSION_METRICS)
    model = load_model(run / "checkpoints" / "last.ckpt")
    assert model.fusion.inputs.region_stage == 2 and "fusion.inputs.box_proj.weight" in model.state_dict()
    # vlp-eval of the checkpoint and of its export reads the boxes the run trained with, unasked
    export = tmp_path / "export"
    run_module("vlp.export", run / "checkpoints" / "last.ckpt", export)
    same_data = [f"paths.data_dir={data_dir}", f"data.prepare.train_samples={TRAIN_SAMPLES}",
                 f"data.prepare.val_samples={VAL_SAMPLES}", "data.prepare.samples_per_shard=256",
                 "data.batch_size=32", "data.num_workers=0", "trainer.precision=32-true"]
    for source in (run / "checkpoints" / "last.ckpt", export):
        run_module("vlp.evaluate", f"model_path={source}", f"hydra.run.dir={tmp_path / source.name}", *same_data)
        evaluated = json.loads((tmp_path / source.name / "metrics.json").read_text())
        assert {k: evaluated[k] for k in FUSION_METRICS} == pytest.approx({k: metrics[k] for k in FUSION_METRICS})


def test_region_tokens_without_boxes_are_refused_in_one_line(tmp_path, data_dir):
    proc = run_cli("debug=fast", "fusion=cross_attention", "model.fusion.image_input=regions",
                   f"paths.data_dir={data_dir}", f"hydra.run.dir={tmp_path}")
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1
    assert "reads region tokens (model.fusion.image_input=regions): set data.max_boxes" in output
    assert "Traceback" not in output


@pytest.mark.parametrize("experiment", ["albef", "visualbert", "uniter", "lxmert", "fusion_synthetic"])
def test_fusion_recipes_run_end_to_end_with_micro_towers_on_cpu(tmp_path, data_dir, experiment):
    small = [] if experiment == "fusion_synthetic" else [
        "data=synthetic", "trainer=cpu", "trainer.accelerator=cpu", "trainer.devices=1", "trainer.strategy=auto",
        "model.towers.arch=vlp-clip-micro"]
    metrics = vlp_train(tmp_path / "run", data_dir, f"experiment={experiment}", *small,
                        *fast("data.batch_size=16", "trainer.limit_val_batches=1"))
    assert metrics["global_step"] == 4 and "val/itm_hard_negative_acc" in metrics


def test_micro_batching_with_fusion_is_refused_in_one_line(tmp_path, data_dir):
    proc = run_cli("debug=fast", "fusion=cross_attention", "micro_batch_size=8", f"paths.data_dir={data_dir}",
                   f"hydra.run.dir={tmp_path}")
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1 and "micro_batch_size does not combine with model.fusion" in output
    assert "Traceback" not in output


@pytest.mark.parametrize("inputs", [[], REGIONS], ids=["patches", "regions"])
def test_hard_negatives_split_by_kind_average_to_the_validation_metrics(tmp_path, data_dir, inputs):
    run = tmp_path / "run"
    metrics = vlp_train(run, data_dir, "fusion=cross_attention", *inputs, *FAST)
    script = Path(__file__).parents[1] / "scripts" / "hard_negative_kinds.py"
    proc = subprocess.run([sys.executable, str(script), str(run / "checkpoints" / "last.ckpt"),
                           "--val-samples", str(VAL_SAMPLES)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = re.findall(r"^(colours swapped|relation reversed|objects swapped) +contrastive +([\d.]+)% +ITM +([\d.]+)%$",
                      proc.stdout, re.MULTILINE)
    assert [kind for kind, _, _ in rows] == ["colours swapped", "relation reversed", "objects swapped"]
    contrastive, itm = (sum(float(row[i]) for row in rows) / 300 for i in (1, 2))  # mean of three percentages
    assert contrastive == pytest.approx(metrics["val/hard_negative_acc"], abs=1e-3)
    assert itm == pytest.approx(metrics["val/itm_hard_negative_acc"], abs=1e-3)
