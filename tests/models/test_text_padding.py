"""Text batches trimmed to their longest caption: same features and gradients, less work."""
import functools
from pathlib import Path

import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir
from open_clip.transformer import TextTransformer

from vlp.losses import ContrastiveLoss
from vlp.models import VLPModel, open_clip_towers
from vlp.models.fusion import CrossAttentionFusion
from vlp.models.text_padding import trim_padding, trims_exactly
from vlp.train import train

CONF = Path(__file__).parents[2] / "conf"

CAPTIONS = ["a red circle", "a blue square above a green star to the left of a yellow triangle", "one"]


def model(**kwargs) -> VLPModel:
    torch.manual_seed(0)
    return VLPModel(open_clip_towers("vlp-clip-micro"), **kwargs)


def test_a_batch_is_cut_after_its_longest_caption_rounded_up_to_eight():
    full = model().tokenizer(CAPTIONS)
    longest = int((full != 0).sum(dim=1).max())
    tokens = trim_padding(full)
    assert tokens.shape == (3, 8 * -(-longest // 8)) and tokens.shape[1] < full.shape[1]
    assert torch.equal(tokens, full[:, :tokens.shape[1]])
    assert trim_padding(full[:, :5]).shape[1] == 5  # never longer than it was
    assert trim_padding(torch.zeros(2, 32, dtype=torch.long)).shape == (2, 8)


def test_trimmed_batches_give_the_same_features_and_gradients():
    trimming, plain = model(), model(trim_text_padding=False)
    assert trimming.trims_text_padding and not plain.trims_text_padding
    assert trimming.state_dict().keys() == plain.state_dict().keys()  # checkpoints and exports unchanged
    images, full = torch.randn(3, 3, 64, 64), plain.tokenizer(CAPTIONS)
    features, grads = [], []
    for m, tokens in ((trimming, trim_padding(full)), (plain, full)):
        out = m(images, tokens)
        ContrastiveLoss()(out.image_features, out.text_features, out.logit_scale).loss.backward()
        features.append(out.text_features)
        grads.append({name: p.grad for name, p in m.named_parameters()})
    torch.testing.assert_close(*features)
    for name, grad in grads[1].items():
        torch.testing.assert_close(grads[0][name], grad, msg=name)
    # full-length batches (zero-shot prompts, a user's tokenizer) still work after shorter ones
    torch.testing.assert_close(trimming.encode_text(full), plain.encode_text(full))


def test_only_towers_and_models_where_it_is_exact_trim():
    assert trims_exactly(open_clip_towers("vlp-clip-micro").text)
    bidirectional = TextTransformer(context_length=16, vocab_size=64, width=32, heads=2, layers=1,
                                    no_causal_mask=True, pool_type="last")  # SigLIP's text: pools the last position
    assert not trims_exactly(bidirectional)
    assert not model(fusion=functools.partial(CrossAttentionFusion, width=32, heads=2)).trims_text_padding


def test_hf_text_towers_are_left_alone(tiny_hf_arch):
    assert not VLPModel(open_clip_towers(tiny_hf_arch)).trims_text_padding


class TokenShapes(pl.Callback):
    seen: list[tuple[int, int]] = []  # Hydra builds the callback; the test reads what it saw

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        TokenShapes.seen.append(tuple(batch.tokens.shape))


def test_training_steps_see_trimmed_batches(tmp_path):
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=[
            f"paths.data_dir={tmp_path}", "debug=fast", "model=clip_micro", "model.towers.context_length=77", "data.val.urls=null", "logger=csv",
            f"hydra.run.dir={tmp_path / 'run'}", f"+callbacks.shapes._target_={__name__}.TokenShapes"])
    cfg.paths.run_dir = str(tmp_path / "run")
    TokenShapes.seen.clear()
    train(cfg)
    assert TokenShapes.seen and all(length % 8 == 0 and length <= 32 for _, length in TokenShapes.seen)  # of 77


def _ddp_worker(rank, init_method, out_dir):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=2)
    ddp = DistributedDataParallel(model())  # broadcasts buffers at every forward
    captions = CAPTIONS if rank == 0 else CAPTIONS[:1] * 3  # the ranks' batches differ in length
    tokens = trim_padding(ddp.module.tokenizer(captions))
    for _ in range(2):
        out = ddp(torch.randn(3, 3, 64, 64), tokens)
        ContrastiveLoss()(out.image_features, out.text_features, out.logit_scale).loss.backward()
    torch.save({"length": tokens.shape[1], "grad": ddp.module.logit_scale.grad}, f"{out_dir}/rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


def test_ranks_with_batches_of_different_lengths_train_together_under_ddp(tmp_path):
    torch.multiprocessing.spawn(_ddp_worker, args=(f"file://{tmp_path}/init", str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert ranks[0]["length"] != ranks[1]["length"]
    torch.testing.assert_close(ranks[0]["grad"], ranks[1]["grad"])  # gradients were all-reduced
