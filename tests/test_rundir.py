"""Run-directory names from what the processes of one run share, and which checkpoint `auto` resumes."""
import pytest
import torch

from vlp.resume import resolve_ckpt_path
from vlp.rundir import remove_interrupted_writes, run_name

LAUNCH_VARIABLES = ["VLP_RUN_NAME", "SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_STEP_ID",
                    "SLURM_JOB_NAME", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_USE_AGENT_STORE"]


@pytest.fixture
def launch_env(monkeypatch):
    for variable in LAUNCH_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    return monkeypatch


@pytest.mark.parametrize("env,name", [
    ({"VLP_RUN_NAME": "mine", "SLURM_JOB_ID": "7"}, "mine"),
    ({"SLURM_JOB_ID": "1234", "SLURM_JOB_NAME": "train.sh"}, "slurm-1234"),
    ({"SLURM_JOB_ID": "1234", "SLURM_STEP_ID": "0"}, "slurm-1234.0"),
    ({"SLURM_JOB_ID": "1240", "SLURM_ARRAY_JOB_ID": "1234", "SLURM_ARRAY_TASK_ID": "6"}, "slurm-1234_6"),
    ({"TORCHELASTIC_RUN_ID": "f00d"}, "torchrun-f00d"),
])
def test_processes_of_one_run_agree_on_its_name(launch_env, env, name):
    for variable, value in env.items():
        launch_env.setenv(variable, value)
    assert run_name() == name


@pytest.mark.parametrize("env", [{}, {"TORCHELASTIC_RUN_ID": "none"}, {"SLURM_JOB_ID": "1", "SLURM_JOB_NAME": "bash"}])
def test_otherwise_the_start_time(launch_env, env):
    for variable, value in env.items():
        launch_env.setenv(variable, value)
    assert run_name().count("/") == 1 and run_name()[:2] == "20"  # DATE/TIME


def save(path, step):
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"global_step": step}, path)


def test_auto_resumes_from_the_later_of_last_and_the_requeue_checkpoint(tmp_path, launch_env):
    assert resolve_ckpt_path("auto", tmp_path) is None  # nothing yet: a fresh start
    save(tmp_path / "checkpoints" / "last.ckpt", 30)
    save(tmp_path / "hpc_ckpt_1.ckpt", 20)  # an older requeue checkpoint must not win
    assert resolve_ckpt_path("auto", tmp_path) == str(tmp_path / "checkpoints" / "last.ckpt")
    save(tmp_path / "hpc_ckpt_2.ckpt", 35)
    assert resolve_ckpt_path("auto", tmp_path) == str(tmp_path / "hpc_ckpt_2.ckpt")
    assert resolve_ckpt_path("other.ckpt", tmp_path) == "other.ckpt"
    assert resolve_ckpt_path(None, tmp_path) is None
    launch_env.setenv("SLURM_JOB_ID", "99")  # a (requeued) batch job resumes its own run by default
    assert resolve_ckpt_path(None, tmp_path) == str(tmp_path / "hpc_ckpt_2.ckpt")


def test_a_launch_removes_what_a_killed_launch_left_half_written_and_nothing_else(tmp_path, launch_env):
    left = [tmp_path / "checkpoints" / ".step0000012.ckpt.tmp32428", tmp_path / "csv" / ".metrics.csv.tmp7"]
    kept = [tmp_path / "checkpoints" / "last.ckpt", tmp_path / "csv" / "metrics.csv", tmp_path / ".notes.tmpfile"]
    for path in left + kept:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x")
    remove_interrupted_writes(tmp_path)
    assert [p.exists() for p in left + kept] == [False] * len(left) + [True] * len(kept)
