"""Feature-cached micro-batching gives the full-batch gradient, on one process and across 2 gloo ranks."""
import os
import tempfile
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel

from vlp.losses import ContrastiveLoss, SigmoidLoss
from vlp.microbatch import check_micro_batchable, feature_cached_backward
from vlp.models import VLPModel, VLPOutput, open_clip_towers

B, D_IN, D = 8, 12, 6


class TwoTower(nn.Module):
    """Small float64 dual encoder with dropout, to check that the re-encoding replays it."""

    def __init__(self, bias: bool):
        super().__init__()
        torch.manual_seed(0)
        self.image = nn.Sequential(nn.Linear(D_IN, 16), nn.Dropout(0.2), nn.Tanh(), nn.Linear(16, D)).double()
        self.text = nn.Embedding(50, D).double()
        self.log_scale = nn.Parameter(torch.tensor(2.0, dtype=torch.float64))
        self.bias = nn.Parameter(torch.tensor(-1.0, dtype=torch.float64)) if bias else None

    def forward(self, images, tokens):
        return VLPOutput(F.normalize(self.image(images), dim=-1), F.normalize(self.text(tokens).mean(1), dim=-1),
                         self.log_scale.exp(), self.bias)


def batch(n=B):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, D_IN, generator=g, dtype=torch.float64), torch.randint(0, 50, (n, 3), generator=g)


def full_batch_grads(model, loss_fn, images, tokens, seed=0):
    torch.manual_seed(seed)
    out = model(images, tokens)
    loss_fn(*[t for t in out if t is not None]).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def dropout_free(model):
    """The same masks can only be replayed within one process; compare to full batch without dropout."""
    model.image[1].p = 0.0
    return model


@pytest.mark.parametrize("loss_fn,bias", [(ContrastiveLoss(), False), (ContrastiveLoss(0.1), False),
                                          (SigmoidLoss(), True)])
@pytest.mark.parametrize("micro", [1, 3, 8])
def test_micro_batched_gradient_equals_full_batch_gradient(loss_fn, bias, micro):
    images, tokens = batch()
    reference = full_batch_grads(dropout_free(TwoTower(bias)), loss_fn, images, tokens)
    model = dropout_free(TwoTower(bias))
    out = feature_cached_backward(model, loss_fn, images, tokens, micro)
    assert not out.loss.requires_grad
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, reference[name], rtol=1e-10, atol=1e-12, msg=name)


def test_dropout_masks_are_replayed_in_the_second_encoding():
    images, tokens = batch()
    model = TwoTower(bias=False)
    torch.manual_seed(5)
    feature_cached_backward(model, ContrastiveLoss(), images, tokens, B)  # one chunk: same masks as full batch
    reference = full_batch_grads(TwoTower(bias=False), ContrastiveLoss(), images, tokens, seed=5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, reference[name], rtol=1e-10, atol=1e-12, msg=name)


def test_with_a_real_model_in_float32():
    model = VLPModel(open_clip_towers("vlp-clip-micro"))
    images, tokens = torch.randn(6, 3, 64, 64), model.tokenizer([f"caption {i}" for i in range(6)])
    reference = full_batch_grads(model, ContrastiveLoss(), images, tokens)
    model.zero_grad()
    feature_cached_backward(model, ContrastiveLoss(), images, tokens, 4)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, reference[name], rtol=1e-3, atol=1e-5, msg=name)


def _worker(rank, init_file, out_file, bias):
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
        loss_fn = SigmoidLoss() if bias else ContrastiveLoss()
        model = DistributedDataParallel(dropout_free(TwoTower(bias)), bucket_cap_mb=1000)  # one bucket
        reductions = []

        def counting_allreduce(state, bucket):
            reductions.append(bucket.index())
            return allreduce_hook(state, bucket)

        model.register_comm_hook(None, counting_allreduce)
        images, tokens = batch()
        half = slice(rank * B // 2, (rank + 1) * B // 2)
        feature_cached_backward(model, loss_fn, images[half], tokens[half], 3, no_sync=model.no_sync)
        grads = {n.removeprefix("module."): p.grad for n, p in model.named_parameters()}
        torch.save({"grads": grads, "reductions": len(reductions)}, f"{out_file}.{rank}")
    except Exception:
        torch.save(traceback.format_exc(), f"{out_file}.{rank}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("bias", [False, True], ids=["clip", "siglip"])
def test_two_ranks_micro_batched_equal_one_process_full_batch(bias):
    with tempfile.TemporaryDirectory() as tmp:
        init_file, out_file = os.path.join(tmp, "init"), os.path.join(tmp, "grads")
        mp.spawn(_worker, args=(init_file, out_file, bias), nprocs=2)
        results = [torch.load(f"{out_file}.{r}", weights_only=False) for r in range(2)]
    for r in results:
        assert isinstance(r, dict), r  # a worker's traceback otherwise
        assert r["reductions"] == 1  # two micro-batches, one gradient all-reduce
    reference = full_batch_grads(dropout_free(TwoTower(bias)), SigmoidLoss() if bias else ContrastiveLoss(), *batch())
    for name, grad in reference.items():
        for r in results:  # DDP averaged the ranks' gradients
            torch.testing.assert_close(r["grads"][name], grad, rtol=1e-10, atol=1e-12, msg=name)


def test_batch_norm_towers_are_refused_unless_frozen():
    with pytest.raises(ValueError, match="BatchNorm layers .* own statistics"):
        check_micro_batchable(VLPModel(open_clip_towers("vlp-clip-rn-micro")))
    frozen = VLPModel(open_clip_towers("vlp-clip-rn-micro"), lock_image=True, lock_image_freeze_bn_stats=True)
    check_micro_batchable(frozen)  # frozen statistics: an affine map, exact in micro-batches
    check_micro_batchable(VLPModel(open_clip_towers("vlp-clip-micro")))


class Float32Towers(nn.Module):
    """TwoTower in float32, so that float16 autocast runs its linear layers and the loss's matmuls."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.image = nn.Sequential(nn.Linear(D_IN, 16), nn.Tanh(), nn.Linear(16, D))
        self.text = nn.Embedding(50, D)
        self.log_scale = nn.Parameter(torch.tensor(2.0))

    def forward(self, images, tokens):
        return VLPOutput(F.normalize(self.image(images), dim=-1), F.normalize(self.text(tokens).mean(1), dim=-1),
                         self.log_scale.exp(), None)


def test_float16_loss_scale_keeps_the_feature_gradients_from_underflowing():
    images, tokens = batch(32)
    images = images.float()
    weight = 2.0**-22  # a loss this small has float16-underflowing gradients, as very large batches do

    def tiny_loss(*args):
        out = ContrastiveLoss()(*args)
        return out._replace(loss=out.loss * weight)

    reference = full_batch_grads(Float32Towers(), tiny_loss, images, tokens)  # float32 throughout
    scale = 2.0**16  # what a GradScaler starts from

    def micro_batched(loss_scale):
        model = Float32Towers()
        with torch.autocast("cpu", dtype=torch.float16):  # manual_backward scales as GradScaler does
            feature_cached_backward(model, tiny_loss, images, tokens, 8, backward=lambda t: (t * scale).backward(),
                                    loss_scale=loss_scale)
        return {n: p.grad / scale for n, p in model.named_parameters()}

    def error(grads):
        return max(((grads[n] - g).norm() / g.norm()).item() for n, g in reference.items())

    assert error(micro_batched(loss_scale=scale)) < 0.02
    assert error(micro_batched(loss_scale=1.0)) > 0.5  # unscaled, the loss's float16 backward flushes them to 0
