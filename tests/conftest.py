"""Shared fixtures: small model configs built offline from files the tests write."""
import json

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
