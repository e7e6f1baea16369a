"""`model.compile` and `model.channels_last` train end to end and keep checkpoints loadable as before."""
import logging
import os
import subprocess
import sys

from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir

from vlp.checkpoint import load_model
from vlp.cli import BadInput
from vlp.data.synthetic import write_dataset
from vlp.models import VLPModel, open_clip_towers
from vlp.models.attention import attention_kernels
from vlp.train import train


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_dataset(root / "synthetic", train_samples=256, val_samples=32, samples_per_shard=128)
    return root


def train_fast(run_dir, data_dir, *overrides):
    """`vlp-train debug=fast` (4 steps, validation included); returns the last checkpoint's state_dict."""
    cmd = [sys.executable, "-m", "vlp.train", "debug=fast", f"hydra.run.dir={run_dir}", f"paths.data_dir={data_dir}",
           "data.prepare=null", "data.train.num_samples=256", "data.batch_size=16", *overrides]
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]


def eager_keys(arch):
    return {f"model.{k}" for k in VLPModel(open_clip_towers(arch)).state_dict()}


def test_channels_last_trains_and_keeps_the_checkpoint_keys(tmp_path, data_dir):
    state = train_fast(tmp_path, data_dir, "model.channels_last=true")  # the default ResNet tower
    assert set(state) == eager_keys("vlp-clip-rn-micro")
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 4
    load_model(tmp_path / "checkpoints" / "last.ckpt")


def test_compile_traces_the_towers_and_keeps_the_checkpoint_keys(tmp_path, data_dir):
    # the eager backend traces with Dynamo without generating code: the switch's path, quickly
    state = train_fast(tmp_path, data_dir, "model=clip_micro", "model.compile={backend: eager}")
    assert set(state) == eager_keys("vlp-clip-micro")
    assert not any("_orig_mod" in k for k in state)
    load_model(tmp_path / "checkpoints" / "last.ckpt")


@pytest.mark.slow
def test_compile_with_inductor_trains(tmp_path, data_dir):
    state = train_fast(tmp_path, data_dir, "model=clip_micro", "model.compile=true")  # minutes on 2 cores
    assert set(state) == eager_keys("vlp-clip-micro")


def test_compile_falls_back_to_eager_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING):
        model = VLPModel(open_clip_towers("vlp-clip-micro"), compile={"backend": "no_such_backend"})
    assert model.compile_options is None
    assert "torch.compile does not work here, running eagerly" in caplog.text
    images, tokens = torch.randn(2, 3, 64, 64), model.tokenizer(["a red circle", "a blue star"])
    assert model(images, tokens).image_features.shape == (2, 128)


def test_channels_last_gives_the_same_features():
    torch.manual_seed(0)
    model = VLPModel(open_clip_towers("vlp-clip-rn-micro")).eval()
    torch.manual_seed(0)
    fast = VLPModel(open_clip_towers("vlp-clip-rn-micro"), channels_last=True).eval()
    images = torch.randn(2, 3, 64, 64)
    assert fast.image_tower.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(fast.encode_image(images), model.encode_image(images), rtol=1e-4, atol=1e-5)


def test_bf16_on_the_cpu_runs_attention_through_the_math_kernel():
    with attention_kernels("cpu", "bf16-mixed"):
        assert torch.backends.cuda.math_sdp_enabled() and not torch.backends.cuda.flash_sdp_enabled()
    assert torch.backends.cuda.flash_sdp_enabled()  # only while training
    with attention_kernels("cpu", "32-true", "medium"):  # float32 products on the bf16 units too
        assert torch.backends.cuda.math_sdp_enabled() and not torch.backends.cuda.flash_sdp_enabled()
    for device, precision, matmul in (("cpu", "32-true", "highest"), ("cuda", "bf16-mixed", "medium"),
                                      ("cuda", "32-true", "medium")):
        with attention_kernels(device, precision, matmul):
            assert torch.backends.cuda.flash_sdp_enabled()


class MatmulPrecisionSeen(pl.Callback):
    seen: list[str] = []  # Hydra builds the callback; the test reads what it saw

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        MatmulPrecisionSeen.seen.append(torch.get_float32_matmul_precision())


def compose_fast(tmp_path, data_dir, *overrides):
    with initialize_config_dir(str(Path(__file__).parents[1] / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[
            "debug=fast", f"paths.data_dir={data_dir}", "data.prepare=null", "data.train.num_samples=256",
            "data.val.urls=null", "logger=csv", f"hydra.run.dir={tmp_path}", *overrides])
    cfg.paths.run_dir = str(tmp_path)
    return cfg


def test_float32_matmul_precision_holds_while_training_and_is_restored(tmp_path, data_dir):
    before = torch.get_float32_matmul_precision()
    MatmulPrecisionSeen.seen.clear()
    train(compose_fast(tmp_path, data_dir, "float32_matmul_precision=medium",
                       f"+callbacks.precision._target_={__name__}.MatmulPrecisionSeen"))
    assert MatmulPrecisionSeen.seen and set(MatmulPrecisionSeen.seen) == {"medium"}
    assert torch.get_float32_matmul_precision() == before == "highest"


def test_float32_matmul_precision_must_be_one_of_torchs(tmp_path, data_dir):
    with pytest.raises(BadInput, match="float32_matmul_precision='low': choose one of highest, high, medium"):
        train(compose_fast(tmp_path, data_dir, "float32_matmul_precision=low"))
