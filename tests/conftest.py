"""Shared fixtures: small model configs built offline from files the tests write; a small trained run."""
import json
import os
import subprocess
import sys

import open_clip
import pytest
from transformers import BertConfig, BertTokenizerFast

WORDS = "a an the of one two red green blue yellow circle square star triangle photo picture small large".split()


@pytest.fixture(scope="session")
def tiny_hf_arch(tmp_path_factory) -> str:
    """An open_clip architecture with a tiny timm image tower and a tiny BERT text tower, all local."""
    root = tmp_path_factory.mktemp("tiny-hf")
    bert = root / "tiny-bert"
    bert.mkdir()
    (bert / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    BertTokenizerFast(vocab_file=str(bert / "vocab.txt")).save_pretrained(bert)
    BertConfig(vocab_size=len(WORDS) + 5, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
               intermediate_size=64, max_position_embeddings=64).save_pretrained(bert)
    config = {"embed_dim": 32,
              "vision_cfg": {"timm_model_name": "efficientnet_b0", "timm_model_pretrained": False,
                             "timm_pool": "avg", "timm_proj": "linear", "image_size": 64},
              "text_cfg": {"hf_model_name": str(bert), "hf_tokenizer_name": str(bert), "hf_proj_type": "linear",
                           "hf_pooler_type": "cls_pooler", "context_length": 16}}
    path = root / "test-tiny-align.json"
    path.write_text(json.dumps(config))
    open_clip.add_model_config(path)
    return "test-tiny-align"

# synthetic data of 256 training and 64 validation samples, batches of 32, no progress bars
SMALL_DATA = ("data.prepare.train_samples=256", "data.prepare.val_samples=64", "data.prepare.samples_per_shard=64",
              "data.train.num_samples=256", "data.batch_size=32", "trainer.enable_progress_bar=false")


def run_module(module: str, *args, cwd=None, timeout=600) -> subprocess.CompletedProcess:
    """Runs `python -m module args` as a user would run its console script; fails the test if it fails."""
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONWARNINGS": "ignore", "HYDRA_FULL_ERROR": "0"}
    proc = subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=cwd)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """A `vlp-train debug=fast` run (4 steps of the default model) on small synthetic data: (run dir, data dir)."""
    root = tmp_path_factory.mktemp("trained")
    run_module("vlp.train", "debug=fast", f"paths.data_dir={root / 'data'}", f"hydra.run.dir={root / 'run'}",
               *SMALL_DATA)
    return root / "run", root / "data"
