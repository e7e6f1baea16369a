"""vlp.distributed and the distributed contrastive loss, on 2 real gloo processes.

One spawn (a few seconds of start-up) runs every distributed check; the workers save their
results with torch.save and the tests assert on them here. A worker's exception fails
every test with the worker's traceback (mp.spawn re-raises it); the process group's
timeout turns a hung collective into such an exception.
"""

import gc
import math
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from vlp.distributed import all_gather_no_grad, all_gather_with_grad, world_info
from vlp.losses import contrastive_loss

pytestmark = pytest.mark.timeout(120)

WORLD = 2
BATCH = 4  # per rank
SMOOTHINGS = (0.0, 0.1)


class TwoTower(nn.Module):
    """Two linear encoders and a learnable log logit scale."""

    def __init__(self):
        super().__init__()
        self.image = nn.Linear(6, 3)
        self.text = nn.Linear(5, 3)
        self.log_scale = nn.Parameter(torch.tensor(math.log(5.0)))

    def forward(self, images, texts):
        image = F.normalize(self.image(images), dim=-1)
        text = F.normalize(self.text(texts), dim=-1)
        return image, text, self.log_scale.exp()


def make_inputs():
    """Everything the workers and the single-process references need, float64."""
    g = torch.Generator().manual_seed(0)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        state = TwoTower().double().state_dict()
    n = WORLD * BATCH
    return {
        "state": state,
        "images": torch.randn(n, 6, generator=g, dtype=torch.float64),
        "texts": torch.randn(n, 5, generator=g, dtype=torch.float64),
        "uneven": [torch.randn(3, 4, generator=g), torch.randn(5, 4, generator=g)],
        "uneven_labels": [torch.arange(3), torch.arange(5) + 10],
        "x": [torch.randn(2, 3, generator=g, dtype=torch.float64) for _ in range(WORLD)],
        "w": [torch.randn(WORLD * 2, 3, generator=g, dtype=torch.float64) for _ in range(WORLD)],
    }


def _ddp_steps(rank, inputs):
    """One DDP forward/backward per label smoothing on this rank's half of the batch."""
    model = TwoTower().double()
    model.load_state_dict(inputs["state"])
    ddp = DistributedDataParallel(model)
    local = slice(rank * BATCH, (rank + 1) * BATCH)
    results = {}
    for smoothing in SMOOTHINGS:
        ddp.zero_grad()
        out = contrastive_loss(
            *ddp(inputs["images"][local], inputs["texts"][local]), label_smoothing=smoothing
        )
        out.loss.backward()
        results[f"ddp/{smoothing}"] = {
            "output": [t.detach() for t in out],
            "grads": {name: p.grad.clone() for name, p in model.named_parameters()},
        }
    return results


def _worker(rank, init_method, inputs, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=init_method, rank=rank, world_size=WORLD, timeout=timedelta(seconds=30)
    )
    results = {"world_info": world_info(), **_ddp_steps(rank, inputs)}

    results["uneven"] = all_gather_no_grad(inputs["uneven"][rank])
    results["uneven_labels"] = all_gather_no_grad(inputs["uneven_labels"][rank])

    x = inputs["x"][rank].clone().requires_grad_()
    gathered = all_gather_with_grad(x)
    (gathered * inputs["w"][rank]).sum().backward()
    results["gathered"], results["x_grad"] = gathered.detach(), x.grad

    try:
        all_gather_with_grad(torch.zeros(2 + rank, 3))
        results["mismatch"] = ""
    except ValueError as e:
        results["mismatch"] = str(e)

    torch.save(results, f"{out_dir}/rank{rank}.pt")
    # let DDP's process-group references go and every rank finish talking before teardown
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Spawns the workers once; returns (inputs, per-rank results)."""
    tmp = tmp_path_factory.mktemp("gloo")
    inputs = make_inputs()
    mp.spawn(_worker, args=(f"file://{tmp}/init", inputs, str(tmp)), nprocs=WORLD)
    return inputs, [torch.load(tmp / f"rank{r}.pt") for r in range(WORLD)]


def test_not_distributed_is_identity():
    x = torch.randn(3, 2)
    assert world_info() == (0, 1)
    assert all_gather_with_grad(x) is x
    assert all_gather_no_grad(x) is x


def test_world_info(run):
    _, results = run
    assert [r["world_info"] for r in results] == [(0, 2), (1, 2)]


@pytest.mark.parametrize("smoothing", SMOOTHINGS)
def test_ddp_matches_single_process(run, smoothing):
    inputs, results = run
    model = TwoTower().double()
    model.load_state_dict(inputs["state"])
    want = contrastive_loss(
        *model(inputs["images"], inputs["texts"]), label_smoothing=smoothing
    )  # full batch of WORLD * BATCH, no process group
    want.loss.backward()

    outputs = [r[f"ddp/{smoothing}"]["output"] for r in results]
    for field, want_value in zip(want._fields, want):
        got = torch.stack([o[want._fields.index(field)] for o in outputs]).mean()
        torch.testing.assert_close(got, want_value.detach(), rtol=1e-12, atol=1e-12, msg=field)
    assert not torch.isclose(outputs[0][0], outputs[1][0])  # ranks really saw different rows

    for r in results:
        grads = r[f"ddp/{smoothing}"]["grads"]
        for name, p in model.named_parameters():
            torch.testing.assert_close(grads[name], p.grad, rtol=1e-10, atol=1e-12, msg=name)


def test_all_gather_no_grad_unequal_rows(run):
    inputs, results = run
    for r in results:
        torch.testing.assert_close(r["uneven"], torch.cat(inputs["uneven"]), rtol=0, atol=0)
        torch.testing.assert_close(
            r["uneven_labels"], torch.cat(inputs["uneven_labels"]), rtol=0, atol=0
        )


def test_all_gather_with_grad_sums_gradients(run):
    inputs, results = run
    for rank, r in enumerate(results):
        torch.testing.assert_close(r["gathered"], torch.cat(inputs["x"]), rtol=0, atol=0)
        own = slice(rank * 2, (rank + 1) * 2)
        want = sum(w[own] for w in inputs["w"])  # d(sum over ranks of loss)/d(own slice)
        torch.testing.assert_close(r["x_grad"], want, rtol=1e-12, atol=1e-12)


def test_all_gather_with_grad_rejects_unequal_batches(run):
    _, results = run
    for r in results:
        assert "equal batch sizes" in r["mismatch"] and "[2, 3]" in r["mismatch"]
