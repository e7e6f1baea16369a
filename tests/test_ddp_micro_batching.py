"""Micro-batching under Lightning's DDP all-reduces the gradients once per step, on the path users take.

Lightning runs `training_step` inside DDP's forward, so a gradient all-reduce armed at the end
of that forward would fire in the next step's first micro-batch. `vlp-train trainer=ddp` runs
here on 2 gloo processes with a callback (`CommProbe`, below, built by Hydra in both ranks) that
registers a counting communication hook on Lightning's own DDP module and saves each rank's
count and final parameters.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

from vlp.data.synthetic import write_dataset

STEPS = 3


class CommProbe(pl.Callback):
    """Counts DDP's gradient all-reduces (the last bucket of each) and saves them with the parameters.

    Args:
        out_dir: where each rank writes rank{r}.pt.
    """

    def __init__(self, out_dir: str):
        self.out_dir, self.reductions = out_dir, 0

    def on_train_start(self, trainer, pl_module):
        def counting_allreduce(state, bucket):
            self.reductions += bucket.is_last()
            return allreduce_hook(state, bucket)

        trainer.strategy.model.register_comm_hook(None, counting_allreduce)  # Lightning's DDP module

    def on_train_end(self, trainer, pl_module):
        params = {n: p.detach().clone() for n, p in pl_module.model.named_parameters()}
        torch.save({"reductions": self.reductions, "params": params}, f"{self.out_dir}/rank{trainer.global_rank}.pt")


@pytest.mark.timeout(600)
def test_one_gradient_all_reduce_per_step_and_ranks_stay_equal(tmp_path):
    write_dataset(tmp_path / "data" / "synthetic", train_samples=256, val_samples=16, samples_per_shard=64)
    cmd = [sys.executable, "-m", "vlp.train", f"hydra.run.dir={tmp_path / 'run'}", f"paths.data_dir={tmp_path / 'data'}",
           "data.prepare=null", "data.train.num_samples=256", "data.val.urls=null", "data.batch_size=16",
           "data.num_workers=0", "model=clip_micro", "micro_batch_size=6", "trainer=ddp", "trainer.devices=2",
           "trainer.precision=32-true", f"trainer.max_steps={STEPS}", "logger=csv", "trainer.enable_progress_bar=false",
           "trainer.enable_model_summary=false", f"+callbacks.comm._target_={__name__}.CommProbe",
           f"+callbacks.comm.out_dir={tmp_path}"]
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONWARNINGS": "ignore",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=540, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    # 3 micro-batches a step (16 rows, 6 at a time); before the fix the 2nd and later steps reduced twice
    assert [r["reductions"] for r in ranks] == [STEPS, STEPS]
    for name, value in ranks[0]["params"].items():  # every micro-batch's gradient was averaged over ranks
        torch.testing.assert_close(ranks[1]["params"][name], value, rtol=0, atol=0, msg=name)
