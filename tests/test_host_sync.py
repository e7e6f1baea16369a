"""The steady-state training step never waits for the device: values are read only when logged.

A step that turns a device tensor into a Python number (`.item()`, `float(t)`, `bool(t)`, a
progress-bar refresh) or copies a Python number to the device stalls the host until the
device has caught up. Both tests run `vlp.train.train` as `vlp-train` does, with a callback
that watches training steps FIRST..LAST-1 (their hooks and the loggers' bookkeeping included)
and logs only every 50 steps. On the CPU every tensor-to-Python read
(`aten._local_scalar_dense`) is counted in the main process (the data is read in a worker);
on a GPU, torch's sync debug mode raises at any synchronising call, copies to the device
included.
"""
import traceback
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir
from omegaconf import open_dict
from torch.utils._python_dispatch import TorchDispatchMode

from vlp.config import register_configs
from vlp.data.synthetic import write_dataset
from vlp.train import train

CONF = Path(__file__).parents[1] / "conf"
FIRST, LAST = 2, 5  # steps 0 and 1 set things up (optimiser state, first logs); LAST ends the run
register_configs()


class ScalarReads(TorchDispatchMode):
    """Records where a computed tensor was read into a Python number, and counts the ops it saw.

    Tensors made from Python numbers (`torch.tensor(x)`, which dispatches `lift_fresh`) and
    those computed from them alone stay on the host on any device, so reading them is free.
    """

    def __init__(self):
        super().__init__()
        self.reads: list[str] = []
        self.ops = 0
        self._host: dict[int, torch.Tensor] = {}  # id -> tensor, kept alive so ids stay unique

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        tensors = [a for a in (*args, *(kwargs or {}).values()) if isinstance(a, torch.Tensor)]
        if func is torch.ops.aten._local_scalar_dense.default and id(args[0]) not in self._host:
            self.reads.append("".join(traceback.format_stack(limit=12)))
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten.lift_fresh.default or (tensors and all(id(t) in self._host for t in tensors)):
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor):
                    self._host[id(t)] = t
        return out


class SyncDebugError:
    """torch.cuda's sync debug mode at "error": any host-device synchronisation raises."""

    def __enter__(self):
        torch.cuda.set_sync_debug_mode("error")
        return self

    def __exit__(self, *exc):
        torch.cuda.set_sync_debug_mode("default")


class SteadyStateProbe(pl.Callback):
    """Holds a watch open from the start of training step FIRST to the start of step LAST.

    Args:
        watch: "reads" (ScalarReads, CPU) or "sync_debug" (SyncDebugError, GPU).
    """

    made: list["SteadyStateProbe"] = []  # Hydra builds the probe; the test reads it afterwards

    def __init__(self, watch: str):
        self.watch = ScalarReads() if watch == "reads" else SyncDebugError()
        self.entered = self.exited = False
        SteadyStateProbe.made.append(self)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == FIRST:
            self.watch.__enter__()
            self.entered = True
        elif batch_idx == LAST:
            self.watch.__exit__(None, None, None)
            self.exited = True


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_dataset(root / "synthetic", train_samples=256, val_samples=16, samples_per_shard=128)
    return root


def train_with_probe(tmp_path, data, watch, *overrides) -> SteadyStateProbe:
    """`vlp-train` for LAST + 1 steps of the micro model with the probe among its callbacks."""
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=[
            f"paths.data_dir={data}", "data.prepare=null", "data.train.num_samples=256", "data.val.urls=null",
            "data.batch_size=16", "data.num_workers=1", "model=clip_micro", f"trainer.max_steps={LAST + 1}",
            "trainer.log_every_n_steps=50", "trainer.enable_progress_bar=true", "logger=csv",
            f"+callbacks.probe._target_={__name__}.SteadyStateProbe", f"+callbacks.probe.watch={watch}",
            *overrides])
    with open_dict(cfg):
        cfg.paths.run_dir = str(tmp_path / "run")
    SteadyStateProbe.made.clear()
    train(cfg)
    (probe,) = SteadyStateProbe.made
    assert probe.entered and probe.exited
    return probe


@pytest.mark.parametrize("options", [[], ["micro_batch_size=6"]], ids=["automatic", "micro-batched"])
def test_steady_state_steps_read_no_tensor_into_python(tmp_path, data, options):
    probe = train_with_probe(tmp_path, data, "reads", "trainer=cpu", *options)
    assert probe.watch.ops > 1000  # it saw the steps
    assert not probe.watch.reads, f"{len(probe.watch.reads)} reads; the first from:\n{probe.watch.reads[0]}"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("options", [[], ["micro_batch_size=6"]], ids=["automatic", "micro-batched"])
def test_steady_state_steps_never_synchronise_with_the_gpu(tmp_path, data, options):
    train_with_probe(tmp_path, data, "sync_debug", "trainer=gpu", *options)  # raises at the first synchronising call
