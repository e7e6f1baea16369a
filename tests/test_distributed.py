"""vlp.distributed and the distributed losses, on 2 (and for the ring, 3) real gloo processes.

One spawn of WORLD ranks (a few seconds of start-up) runs every distributed check, and one
of 3 ranks reruns the ring exchange and the sigmoid loss: W=2 only takes the ring's
one-way step, odd W only its two-way rounds. The workers save their results with
torch.save and the tests assert on them here. A worker's exception fails
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

from vlp.distributed import (
    all_gather_no_grad,
    all_gather_with_grad,
    ring_exchange_with_grad,
    world_info,
)
from vlp.losses import contrastive_loss, sigmoid_loss

pytestmark = pytest.mark.timeout(120)

WORLD = 2
BATCH = 4  # per rank
SMOOTHINGS = (0.0, 0.1)
PAIRS = 12  # global batch of the sigmoid checks, split over 2 or 3 ranks


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


class BiasedTwoTower(TwoTower):
    """TwoTower plus SigLIP's learnable logit bias."""

    def __init__(self):
        super().__init__()
        self.bias = nn.Parameter(torch.tensor(-1.5))

    def forward(self, images, texts):
        return *super().forward(images, texts), self.bias


def ring_order(rank, world):
    """Source ranks of the blocks ring_exchange_with_grad yields, as its docstring says."""
    order = []
    for k in range(1, world // 2 + 1):
        order += [(rank - k) % world, (rank + k) % world]
    return order[: world - 1]


def make_inputs():
    """Everything the workers and the single-process references need, float64."""
    g = torch.Generator().manual_seed(0)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        state = TwoTower().double().state_dict()
        biased_state = BiasedTwoTower().double().state_dict()
    n = WORLD * BATCH
    return {
        "state": state,
        "images": torch.randn(n, 6, generator=g, dtype=torch.float64),
        "texts": torch.randn(n, 5, generator=g, dtype=torch.float64),
        "uneven": [torch.randn(3, 4, generator=g), torch.randn(5, 4, generator=g)],
        "uneven_labels": [torch.arange(3), torch.arange(5) + 10],
        "x": [torch.randn(2, 3, generator=g, dtype=torch.float64) for _ in range(WORLD)],
        "w": [torch.randn(WORLD * 2, 3, generator=g, dtype=torch.float64) for _ in range(WORLD)],
        "biased_state": biased_state,
        "pair_images": torch.randn(PAIRS, 6, generator=g, dtype=torch.float64),
        "pair_texts": torch.randn(PAIRS, 5, generator=g, dtype=torch.float64),
        "ring_x": [torch.randn(2, 3, generator=g, dtype=torch.float64) for _ in range(3)],
        "ring_w": [torch.randn(2, 2, 3, generator=g, dtype=torch.float64) for _ in range(3)],
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


def _ring_steps(rank, world, inputs):
    """The bare ring exchange, then one DDP sigmoid-loss step on this rank's share of PAIRS."""
    x = inputs["ring_x"][rank].clone().requires_grad_()
    blocks = list(ring_exchange_with_grad(x))
    sum((b * w).sum() for b, w in zip(blocks, inputs["ring_w"][rank])).backward()
    results = {"ring": [b.detach() for b in blocks], "ring_grad": x.grad}

    model = BiasedTwoTower().double()
    model.load_state_dict(inputs["biased_state"])
    ddp = DistributedDataParallel(model)
    batch = PAIRS // world
    local = slice(rank * batch, (rank + 1) * batch)
    out = sigmoid_loss(*ddp(inputs["pair_images"][local], inputs["pair_texts"][local]))
    out.loss.backward()
    results["sigmoid"] = {
        "output": [t.detach() for t in out],
        "grads": {name: p.grad.clone() for name, p in model.named_parameters()},
    }
    return results


def _init(rank, world, init_method):
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=init_method, rank=rank, world_size=world, timeout=timedelta(seconds=30)
    )


def _save_and_finish(results, rank, out_dir):
    torch.save(results, f"{out_dir}/rank{rank}.pt")
    # let DDP's process-group references go and every rank finish talking before teardown
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


def _worker(rank, world, init_method, inputs, out_dir):
    """Every check, on WORLD ranks."""
    _init(rank, world, init_method)
    results = {"world_info": world_info(), **_ddp_steps(rank, inputs)}
    results.update(_ring_steps(rank, world, inputs))

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
    try:
        next(ring_exchange_with_grad(torch.zeros(2 + rank, 3)))
        results["ring_mismatch"] = ""
    except ValueError as e:
        results["ring_mismatch"] = str(e)

    _save_and_finish(results, rank, out_dir)


def _ring_worker(rank, world, init_method, inputs, out_dir):
    """Only the ring exchange and the sigmoid loss, for a second world size."""
    _init(rank, world, init_method)
    _save_and_finish(_ring_steps(rank, world, inputs), rank, out_dir)


def _spawn(tmp_path_factory, worker, world):
    """Runs worker on world processes; returns (inputs, per-rank results)."""
    tmp = tmp_path_factory.mktemp("gloo")
    inputs = make_inputs()
    mp.spawn(worker, args=(world, f"file://{tmp}/init", inputs, str(tmp)), nprocs=world)
    return inputs, [torch.load(tmp / f"rank{r}.pt") for r in range(world)]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Spawns the WORLD workers once; returns (inputs, per-rank results)."""
    return _spawn(tmp_path_factory, _worker, WORLD)


@pytest.fixture(scope="module")
def run3(tmp_path_factory):
    """Spawns 3 ring workers once; returns (inputs, per-rank results)."""
    return _spawn(tmp_path_factory, _ring_worker, 3)


def test_not_distributed_is_identity():
    x = torch.randn(3, 2)
    assert world_info() == (0, 1)
    assert all_gather_with_grad(x) is x
    assert all_gather_no_grad(x) is x
    assert list(ring_exchange_with_grad(x)) == []


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


def test_ring_exchange_rejects_unequal_batches(run):
    _, results = run
    for r in results:
        assert "equal batch sizes" in r["ring_mismatch"] and "[2, 3]" in r["ring_mismatch"]


@pytest.mark.parametrize("fixture", ["run", "run3"])
def test_ring_exchange_order_and_gradients(request, fixture):
    inputs, results = request.getfixturevalue(fixture)
    world = len(results)
    for rank, r in enumerate(results):
        sources = ring_order(rank, world)
        assert len(r["ring"]) == len(set(sources)) == world - 1
        for block, source in zip(r["ring"], sources):
            torch.testing.assert_close(block, inputs["ring_x"][source], rtol=0, atol=0)
        # d(sum over ranks of loss)/dx: the weight of every block that carried this rank's x
        want = sum(
            inputs["ring_w"][other][i]
            for other in range(world)
            for i, source in enumerate(ring_order(other, world))
            if source == rank
        )
        torch.testing.assert_close(r["ring_grad"], want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("fixture", ["run", "run3"])
def test_sigmoid_ddp_matches_single_process(request, fixture):
    inputs, results = request.getfixturevalue(fixture)
    world, batch = len(results), PAIRS // len(results)
    model = BiasedTwoTower().double()
    model.load_state_dict(inputs["biased_state"])
    image, text, scale, bias = model(inputs["pair_images"], inputs["pair_texts"])
    want = sigmoid_loss(image, text, scale, bias)  # full batch of PAIRS, no process group
    want.loss.backward()

    outputs = [r["sigmoid"]["output"] for r in results]
    loss, accuracy = (torch.stack(field).mean() for field in zip(*outputs))  # over ranks
    torch.testing.assert_close(loss, want.loss.detach(), rtol=1e-12, atol=1e-12)  # the contract
    assert accuracy.item() == pytest.approx(want.accuracy.item())  # float32, like 1/3
    # and each rank's loss is its own images against every text, over its own batch size
    labels = 2 * torch.eye(PAIRS, dtype=torch.float64) - 1
    pair_losses = -F.logsigmoid(labels * (scale * image @ text.T + bias)).detach()  # (N, N)
    for rank, o in enumerate(outputs):
        rows = pair_losses[rank * batch : (rank + 1) * batch]  # (B, N)
        torch.testing.assert_close(o[0], rows.sum() / batch, rtol=1e-12, atol=1e-12)
    assert len({round(o[0].item(), 6) for o in outputs}) == world  # ranks saw different rows
    assert 0 < want.accuracy < 1

    for r in results:
        grads = r["sigmoid"]["grads"]
        for name, p in model.named_parameters():
            assert p.grad.abs().max() > 1e-4, name
            torch.testing.assert_close(grads[name], p.grad, rtol=1e-10, atol=1e-12, msg=name)
