"""`vlp-train` end to end, as users run it: learning, checkpoints, resume, DDP, loggers."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vlp.checkpoint import load_model
from vlp.data.synthetic import write_dataset

TRAIN_SAMPLES, VAL_SAMPLES = 1024, 64


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_dataset(root / "synthetic", train_samples=TRAIN_SAMPLES, val_samples=VAL_SAMPLES, samples_per_shard=256)
    return root


def vlp_train(run_dir, data_dir, *overrides, timeout=600):
    """Runs the CLI; returns metrics.json."""
    cli(f"hydra.run.dir={run_dir}", f"paths.data_dir={data_dir}", *overrides, timeout=timeout)
    return json.loads((Path(run_dir) / "metrics.json").read_text())


def cli(*args, timeout=600):
    """Runs `vlp-train` with small-data defaults and checks that it succeeded."""
    proc = run_cli(*args, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def run_cli(*args, timeout=600):
    """Runs `vlp-train` with small-data defaults; flags (e.g. -m) go first, as Hydra wants."""
    flags, overrides = [a for a in args if a.startswith("-")], [a for a in args if not a.startswith("-")]
    defaults = [f"data.prepare.train_samples={TRAIN_SAMPLES}", f"data.prepare.val_samples={VAL_SAMPLES}",
                "data.prepare.samples_per_shard=256", f"data.train.num_samples={TRAIN_SAMPLES}",
                "data.batch_size=32", "data.num_workers=0", "logger=csv", "trainer.enable_progress_bar=false",
                "trainer.enable_model_summary=false", "scheduler.warmup_steps=5"]
    given = {o.split("=", 1)[0] for o in overrides}  # vlp-train rejects a key given twice
    cmd = [sys.executable, "-m", "vlp.train", *flags, *(d for d in defaults if d.split("=", 1)[0] not in given),
           *overrides]
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONWARNINGS": "ignore", "HYDRA_FULL_ERROR": "0"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def logged(run_dir, key) -> dict[int, float]:
    """step -> value of a metric from the CSV log."""
    with open(Path(run_dir) / "csv" / "metrics.csv") as f:
        return {int(r["step"]): float(r[key]) for r in csv.DictReader(f) if r.get(key)}


def test_training_lowers_the_loss_and_writes_checkpoint_and_metrics(tmp_path, data_dir):
    run = tmp_path / "run"
    # CLIP from scratch sits near ln(batch) for its first ~50 steps, then learns colour words
    metrics = vlp_train(run, data_dir, "trainer.max_steps=150", "trainer.val_check_interval=150",
                        "trainer.log_every_n_steps=1", "logger=[csv,tensorboard]", "data.batch_size=64")
    losses = list(logged(run, "train/loss").values())
    assert len(losses) == 150
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10 - 1.0
    assert metrics["global_step"] == 150
    for key in ("val/i2t_r@1", "val/t2i_r@1", "val/i2t_r@5", "val/t2i_r@10", "val/zeroshot_top1",
                "val/zeroshot_top5", "train/samples_per_second", "train/skipped_samples"):
        assert key in metrics
    assert metrics["val/num_samples"] == VAL_SAMPLES
    assert metrics["train/skipped_samples"] == 0
    # learned something that transfers to held-out compositions (chance: 5/32 and 1/64)
    assert metrics["val/zeroshot_top5"] > 3 * 5 / 32
    assert metrics["val/i2t_r@1"] > 3 / VAL_SAMPLES
    # the checkpoint alone rebuilds the trained model
    model = load_model(run / "checkpoints" / "last.ckpt")
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    assert torch.equal(model.logit_scale, state["model.logit_scale"])
    # ... and one with weights this model lacks (a newer vlp's) is refused, not loaded in part
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    checkpoint["state_dict"]["model.fusion.inputs.image_norm.weight"] = torch.ones(4)
    torch.save(checkpoint, tmp_path / "newer.ckpt")
    with pytest.raises(ValueError, match="unexpected, ignored: fusion.inputs.image_norm.weight"):
        load_model(tmp_path / "newer.ckpt")
    assert (run / ".hydra" / "config.yaml").exists()
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))


def test_resume_continues_from_the_saved_step(tmp_path, data_dir):
    common = ["trainer.log_every_n_steps=1", "trainer.val_check_interval=100", "trainer.limit_val_batches=1",
              "callbacks.checkpoint.every_n_train_steps=10"]
    straight, first, resumed = tmp_path / "straight", tmp_path / "first", tmp_path / "resumed"
    vlp_train(straight, data_dir, "trainer.max_steps=30", *common)
    # stops after 10 steps, as an interrupted run would
    vlp_train(first, data_dir, "trainer.max_steps=30", *common, "trainer.limit_train_batches=10",
              "trainer.max_epochs=1")
    assert torch.load(first / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 10
    metrics = vlp_train(resumed, data_dir, "trainer.max_steps=30", *common,
                        f"ckpt_path={first / 'checkpoints' / 'last.ckpt'}")
    assert metrics["global_step"] == 30
    lr_resumed, lr_straight = logged(resumed, "lr"), logged(straight, "lr")
    assert min(lr_resumed) >= 10  # no step was repeated
    # optimiser and schedule state came back: the learning rates match the uninterrupted run
    assert all(abs(lr_resumed[s] - lr_straight[s]) < 1e-9 for s in lr_resumed)


@pytest.mark.parametrize("options", [["loss=clip"], ["loss=siglip"], ["model.lock_image=true"],
                                     ["micro_batch_size=12", "loss=siglip", "model=clip_micro"]],
                         ids=["clip", "siglip", "lit", "micro-batched"])
def test_ddp_on_two_cpu_processes_counts_every_validation_sample_once(tmp_path, data_dir, options):
    metrics = vlp_train(tmp_path / "run", data_dir, "trainer=ddp", "trainer.devices=2", "trainer.max_steps=4",
                        "trainer.val_check_interval=4", "trainer.precision=32-true", *options)
    assert metrics["global_step"] == 4
    assert metrics["val/num_samples"] == VAL_SAMPLES


def test_wandb_runs_offline_without_an_account(tmp_path, data_dir, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    run = tmp_path / "run"
    common = ["logger=wandb", "trainer.val_check_interval=2", "trainer.limit_val_batches=1", "ckpt_path=auto"]
    vlp_train(run, data_dir, "trainer.max_steps=2", *common)
    run_id = (run / "wandb_id").read_text().strip()
    assert [p.name.endswith(run_id) for p in (run / "wandb").glob("offline-run-*")] == [True]
    vlp_train(run, data_dir, "trainer.max_steps=4", *common)  # resumed into its directory: the same wandb run
    assert (run / "wandb_id").read_text().strip() == run_id
    assert all(p.name.endswith(run_id) for p in (run / "wandb").glob("offline-run-*"))


def test_multirun_sweeps_into_one_run_directory_per_job(tmp_path, data_dir):
    proc = cli("-m", "optim.lr=1e-4,3e-4", "debug=fast", f"paths.data_dir={data_dir}",
               f"hydra.sweep.dir={tmp_path}", "trainer.limit_val_batches=1")
    jobs = sorted(tmp_path.glob("*/metrics.json"))
    assert len(jobs) == 2, proc.stdout[-2000:]
    configs = [(j.parent / ".hydra" / "overrides.yaml").read_text() for j in jobs]
    assert any("optim.lr=0.0001" in c for c in configs) and any("optim.lr=0.0003" in c for c in configs)


@pytest.mark.parametrize("override,message", [
    ("data.train.urls=/no/such/folder/", "shard spec '/no/such/folder/' matches no file"),
    ("data.train.num_samples=10", "less than one global batch"),
    ("micro_batch_size=0", "micro_batch_size must be positive"),
    ("micro_batch_size=4", "micro_batch_size cannot be used with BatchNorm layers"),  # the default ResNet tower
])
def test_bad_input_is_reported_in_one_line_without_a_traceback(tmp_path, data_dir, override, message):
    proc = run_cli("debug=fast", f"paths.data_dir={data_dir}", f"hydra.run.dir={tmp_path}", override)
    assert proc.returncode == 1
    output = proc.stdout + proc.stderr
    assert message in output and "Traceback" not in output


def test_a_diverged_run_stops_with_its_last_good_checkpoint_intact(tmp_path, data_dir):
    # a NaN learning rate after 3 warmup steps: the weights turn NaN at step 4, the loss after it
    run = tmp_path / "run"
    proc = run_cli(f"hydra.run.dir={run}", f"paths.data_dir={data_dir}", "trainer.max_steps=8",
                   "trainer.val_check_interval=8", "trainer.limit_val_batches=1", "scheduler.warmup_steps=3",
                   "scheduler.min_lr_ratio=nan", "callbacks.checkpoint.every_n_train_steps=2")
    assert proc.returncode != 0
    assert "DivergedError: the weights became NaN or inf by step 4" in proc.stderr
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert checkpoint["global_step"] == 2
    assert all(torch.isfinite(v).all() for v in checkpoint["state_dict"].values() if v.is_floating_point())


def test_the_logit_scale_comes_back_down_from_the_cap(tmp_path, data_dir):
    # open_clip clamps the parameter after the step; clamping the forward would freeze it at the cap
    run = tmp_path / "run"
    vlp_train(run, data_dir, "model.init_logit_scale=100", "optim.lr=0.05", "trainer.max_steps=4",
              "trainer.val_check_interval=4", "trainer.limit_val_batches=1", "trainer.log_every_n_steps=1")
    scales = logged(run, "train/logit_scale")
    assert scales[0] == pytest.approx(100, rel=1e-5)
    assert scales[3] < 95
