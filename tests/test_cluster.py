"""On a cluster: one run directory per run, resume after kill -9, sweeps through launchers, CLI mistakes."""
import csv
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from test_train import TRAIN_SAMPLES, VAL_SAMPLES, cli, data_dir, run_cli  # noqa: F401 (data_dir: fixture)
from vlp.checkpoint import load_model
from vlp.resume import global_step

ENV = {**os.environ, "WANDB_MODE": "offline", "PYTHONWARNINGS": "ignore", "HYDRA_FULL_ERROR": "0"}
SMALL = [f"data.prepare.train_samples={TRAIN_SAMPLES}", f"data.prepare.val_samples={VAL_SAMPLES}",
         "data.prepare.samples_per_shard=256", f"data.train.num_samples={TRAIN_SAMPLES}", "data.batch_size=32",
         "data.num_workers=0", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]


def default_sigint() -> None:
    """A child's SIGINT as in a terminal: a shell's background job (`make test &`) ignores it, and
    the child would inherit that."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def train_rows(run_dir) -> Counter:
    """How many times each step's training loss is in the CSV log."""
    with open(Path(run_dir) / "csv" / "metrics.csv") as f:
        return Counter(int(r["step"]) for r in csv.DictReader(f) if r.get("train/loss"))


def validation_rows(run_dir) -> Counter:
    """How many times each step's validation is in the CSV log."""
    with open(Path(run_dir) / "csv" / "metrics.csv") as f:
        return Counter(int(r["step"]) for r in csv.DictReader(f) if r.get("val/num_samples"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unquoted_brace_pattern_fails_with_the_quoting_advice(tmp_path, data_dir):
    # what the shell makes of data.train.urls=/d/train-{000..002}.tar
    shards = [f"data.train.urls={data_dir}/synthetic/train-{i:06d}.tar" for i in range(3)]
    proc = run_cli("debug=fast", f"paths.data_dir={data_dir}", f"hydra.run.dir={tmp_path}", *shards)
    assert proc.returncode == 1
    assert "data.train.urls is given 3 times" in proc.stderr and "quote it" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "checkpoints").exists()  # nothing ran


def test_two_torchrun_ranks_write_one_run_directory(tmp_path, data_dir):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "vlp.train", *SMALL, f"paths.data_dir={data_dir}", "trainer=ddp", "trainer.accelerator=cpu",
           "trainer.precision=32-true", "trainer.max_steps=2", "trainer.val_check_interval=2",
           "trainer.limit_val_batches=1", "logger=csv"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    runs = [p for p in (tmp_path / "runs").rglob("*") if (p / ".hydra").is_dir()]
    assert len(runs) == 1, runs
    run = runs[0]
    assert json.loads((run / "metrics.json").read_text())["global_step"] == 2
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert (tmp_path / checkpoint["vlp_config"]["paths"]["run_dir"]).resolve() == run.resolve()
    assert len(checkpoint["callbacks"]["RankRngStates"]["ranks"]) == 2  # each rank's random state


def test_kill_9_at_random_moments_then_auto_resume_ends_at_the_right_step_with_every_step_logged_once(
        tmp_path, data_dir):
    run, max_steps, every = tmp_path / "run", 26, 8
    args = [sys.executable, "-m", "vlp.train", *SMALL, f"paths.data_dir={data_dir}", f"hydra.run.dir={run}",
            "ckpt_path=auto", f"trainer.max_steps={max_steps}", f"trainer.val_check_interval={every}",
            "trainer.limit_val_batches=1", "trainer.log_every_n_steps=1", "callbacks.checkpoint.every_n_train_steps=4",
            "logger=[csv,tensorboard]", "scheduler.warmup_steps=5", "model=clip_micro"]
    rng = random.Random(0)
    for _ in range(3):
        before = sum(train_rows(run).values()) if (run / "csv" / "metrics.csv").exists() else 0
        proc = subprocess.Popen(args, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_rows = rng.randint(1, 6)  # then a random moment within a few steps
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            csv_file = run / "csv" / "metrics.csv"
            if csv_file.exists() and sum(train_rows(run).values()) - before >= wait_rows:
                break
            time.sleep(0.05)
        time.sleep(rng.uniform(0, 1.0))
        assert proc.poll() is None, "the run finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    proc = subprocess.run(args, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert checkpoint["global_step"] == max_steps
    assert json.loads((run / "metrics.json").read_text())["global_step"] == max_steps
    load_model(run / "checkpoints" / "last.ckpt")
    rows = train_rows(run)
    assert sorted(rows) == list(range(max_steps)) and set(rows.values()) == {1}, rows
    # in the loop at step - 1, then the final one at the last step
    assert validation_rows(run) == {**{step - 1: 1 for step in range(every, max_steps, every)}, max_steps: 1}
    # the config of every launch is kept; only the latest step snapshots are
    assert len(list((run / ".hydra" / "launches").iterdir())) == 4
    assert len(list((run / "checkpoints").glob("step*.ckpt"))) == 3
    assert not list(run.rglob(".*.tmp*"))  # no temporary checkpoint left behind


@pytest.mark.parametrize("stop", [signal.SIGKILL, signal.SIGINT], ids=["kill_9", "ctrl_c"])
def test_stopped_during_the_validation_of_a_checkpoint_step_then_resume_runs_that_validation(
        tmp_path, data_dir, stop):
    """Killed, the run resumes from the checkpoint before the validation: a step's checkpoint must come
    after its validation, or Lightning's loop skips the validation as done. Stopped with Ctrl-C, it
    saves a checkpoint in the middle of the validation, from which the whole validation runs again."""
    run, max_steps, every = tmp_path / "run", 16, 8
    args = [sys.executable, "-m", "vlp.train", *SMALL, f"paths.data_dir={data_dir}", f"hydra.run.dir={run}",
            "ckpt_path=auto", f"trainer.max_steps={max_steps}", f"trainer.val_check_interval={every}",
            "trainer.log_every_n_steps=1", f"callbacks.checkpoint.every_n_train_steps={every // 2}",
            "logger=csv", "model=clip_micro"]
    proc = subprocess.Popen(args, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            preexec_fn=default_sigint)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if (run / "csv" / "metrics.csv").exists() and train_rows(run)[every - 1]:
            break  # the step's row is written right before its validation
        time.sleep(0.01)
    assert proc.poll() is None, "the run finished before it could be stopped"
    proc.send_signal(stop)
    proc.wait(timeout=300)
    assert not validation_rows(run), "the run was stopped after the validation it must interrupt"
    proc = subprocess.run(args, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert validation_rows(run) == {every - 1: 1, max_steps - 1: 1}  # logged at step - 1
    rows = train_rows(run)
    assert sorted(rows) == list(range(max_steps)) and set(rows.values()) == {1}, rows


def test_a_run_without_validation_data_still_saves_at_the_validation_steps(tmp_path, data_dir):
    """A validating step's checkpoint waits for its validation, which never comes without validation data."""
    run = tmp_path / "run"
    cli(*SMALL, f"paths.data_dir={data_dir}", f"hydra.run.dir={run}", "data.val.urls=null", "trainer.max_steps=9",
        "trainer.val_check_interval=4", "callbacks.checkpoint.every_n_train_steps=4",
        "callbacks.checkpoint.save_top_k=-1", "model=clip_micro")
    assert sorted(p.name for p in (run / "checkpoints").glob("step*.ckpt")) == [
        "step0000004.ckpt", "step0000008.ckpt", "step0000009.ckpt"]


@pytest.mark.parametrize("after", ["a_few_batches", "a_validation"])
def test_ctrl_c_in_a_batch_then_resume_validates_and_logs_at_the_steps_of_an_uninterrupted_run(
        tmp_path, data_dir, after):
    """The checkpoint saved on Ctrl-C holds a batch that was started and not finished; resumed, the
    run must count it once, or each later validation comes a step early and the last one twice (and
    right after a validation, every later row a step late)."""
    run, max_steps, every = tmp_path / "run", 24, 8
    args = [sys.executable, "-m", "vlp.train", *SMALL, f"paths.data_dir={data_dir}", f"hydra.run.dir={run}",
            "ckpt_path=auto", f"trainer.max_steps={max_steps}", f"trainer.val_check_interval={every}",
            "trainer.limit_val_batches=1", "trainer.log_every_n_steps=1", "logger=csv", "model=clip_micro"]
    proc = subprocess.Popen(args, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            preexec_fn=default_sigint)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if (run / "csv" / "metrics.csv").exists() and (
                validation_rows(run) if after == "a_validation" else sum(train_rows(run).values()) >= every + 2):
            break
        time.sleep(0.01)
    time.sleep(0.1)  # into the next batch: the row is written between batches
    assert proc.poll() is None, "the run finished before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=300)
    assert every <= global_step(run / "checkpoints" / "last.ckpt") < max_steps
    proc = subprocess.run(args, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert validation_rows(run) == {step - 1: 1 for step in range(every, max_steps + 1, every)}  # logged at step - 1
    rows = train_rows(run)
    assert sorted(rows) == list(range(max_steps)) and set(rows.values()) == {1}, rows


def test_data_workers_leave_ctrl_c_to_the_main_process(tmp_path, data_dir):
    """Ctrl-C in a terminal reaches the data workers too. A worker that died of it would stop the
    run with "DataLoader worker exited unexpectedly", even in the middle of saving the
    interrupted run's checkpoint; here only the workers get it, and the run goes on to its end."""
    run, max_steps = tmp_path / "run", 24
    small = [a.replace("data.num_workers=0", "data.num_workers=2") for a in SMALL]
    args = [sys.executable, "-m", "vlp.train", *small, f"paths.data_dir={data_dir}",
            f"hydra.run.dir={run}", f"trainer.max_steps={max_steps}", "trainer.limit_val_batches=1",
            "trainer.log_every_n_steps=1", "logger=csv", "model=clip_micro"]
    proc = subprocess.Popen(args, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=default_sigint)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if (run / "csv" / "metrics.csv").exists() and sum(train_rows(run).values()) >= 4:
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    workers = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    assert len(workers) == 2, workers
    for pid in workers:
        os.kill(int(pid), signal.SIGINT)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    assert global_step(run / "checkpoints" / "last.ckpt") == max_steps


def test_a_sweep_records_a_failed_trial_goes_on_and_ends_with_a_table(tmp_path, data_dir):
    proc = run_cli("-m", "micro_batch_size=0,null", "debug=fast", f"paths.data_dir={data_dir}",
                   f"hydra.sweep.dir={tmp_path}", "trainer.limit_val_batches=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "0" / "error.txt").is_file() and "micro_batch_size must be positive" in (
        tmp_path / "0" / "error.txt").read_text()
    assert json.loads((tmp_path / "1" / "metrics.json").read_text())["global_step"] == 4
    assert "sweep of 2 trials" in proc.stdout and "(1 failed)" in proc.stdout
    assert "<- best" in proc.stdout.splitlines()[-1]


def test_a_sweep_cannot_use_lightnings_own_ddp_spawner(tmp_path, data_dir):
    proc = run_cli("-m", "optim.lr=1e-4", "debug=fast", "trainer=ddp", "trainer.devices=2",
                   "trainer.accelerator=cpu", f"paths.data_dir={data_dir}", f"hydra.sweep.dir={tmp_path}")
    output = proc.stdout + proc.stderr
    assert "hydra/launcher=submitit_slurm" in output and "tasks_per_node=2" in output
    assert not list(tmp_path.glob("*/checkpoints"))


def test_optuna_sweep_through_submitit_local_writes_one_run_directory_per_trial_and_reports_the_best(
        tmp_path, data_dir):
    proc = run_cli("hparams_search=clip_optuna", "hydra/launcher=submitit_local", "hydra.sweeper.n_trials=3",
                   "hydra.sweeper.sampler.n_startup_trials=2", "debug=fast", "trainer.limit_val_batches=1",
                   f"paths.data_dir={data_dir}", f"hydra.sweep.dir={tmp_path}", timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    trials = sorted(tmp_path.glob("*/metrics.json"))
    assert len(trials) == 3
    values = [json.loads(t.read_text())["val/zeroshot_top1"] for t in trials]
    results = (tmp_path / "optimization_results.yaml").read_text()
    assert f"best_value: {max(values)}" in results
    assert "sweep of 3 trials" in proc.stdout


class FailOnRank(pl.Callback):
    """Raises on one rank only, at a step: a bad sample or a device error on one node."""

    def __init__(self, rank: int, step: int):
        self.rank, self.step = rank, step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_rank == self.rank and trainer.global_step == self.step:
            raise RuntimeError(f"injected failure on rank {self.rank}")


@pytest.mark.timeout(600)
def test_a_failure_on_one_ddp_rank_ends_the_run_instead_of_hanging(tmp_path, data_dir):
    # the other rank is blocked in the step's gradient all-reduce; a collective checkpoint save on
    # the failing rank would wait for it until the process group times out (30 minutes)
    env = {**ENV, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "vlp.train", *SMALL, f"paths.data_dir={data_dir}", f"hydra.run.dir={tmp_path}",
           "trainer=ddp", "trainer.devices=2", "trainer.precision=32-true", "trainer.max_steps=6",
           "data.val.urls=null", "logger=csv", "model=clip_micro", "callbacks.checkpoint.every_n_train_steps=2",
           f"+callbacks.fail._target_={__name__}.FailOnRank", "+callbacks.fail.rank=1", "+callbacks.fail.step=3"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "injected failure on rank 1" in proc.stderr
    assert global_step(tmp_path / "checkpoints" / "last.ckpt") == 2  # the last save before the failure is intact
