"""torch.distributed helpers: rank/world lookup, all-gathers and a ring exchange for the losses.

Every helper works on the default process group and is a no-op (returns its input) when
torch.distributed is unavailable, not initialised, or has a single rank.
"""

from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import Tensor


def world_info() -> tuple[int, int]:
    """Returns (rank, world_size); (0, 1) when torch.distributed is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


# torch 2.14 renamed these (the old names warn); older releases have only the old names
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _gather_sizes(x: Tensor, world: int) -> Tensor:
    """Returns every rank's number of rows (dim 0) of x, in rank order, as a (W,) tensor on x's device."""
    n = torch.full((1,), x.shape[0], device=x.device)  # a fill, not a host-to-device copy
    sizes = n.new_empty(world)
    _all_gather_single(sizes, n)
    return sizes


def _check_equal_rows(x: Tensor, world: int, name: str) -> None:
    """Fails unless every rank holds as many rows as this one, without waiting for the device.

    A mismatch would otherwise hang or abort the collective that follows. On the CPU the
    sizes are read at once (a ValueError naming them); on an accelerator the comparison is
    a device-side assertion, so the step never waits for the device to hand the sizes over.
    """
    sizes = _gather_sizes(x, world)  # (W,)
    if sizes.device.type == "cpu":
        if (sizes != x.shape[0]).any():
            raise ValueError(f"{name} needs equal batch sizes on all ranks, got {sizes.tolist()}")
    else:
        torch._assert_async((sizes == x.shape[0]).all(), f"{name} needs equal batch sizes on all ranks")


class _AllGatherWithGrad(torch.autograd.Function):
    """All-gather whose backward sums the gradient over ranks and scatters each rank its slice."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        _, world = world_info()
        out = x.new_empty((world * x.shape[0], *x.shape[1:]))  # (W*B, ...)
        _all_gather_single(out, x.contiguous())
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        # every rank's loss depends on every slice: d(sum_r L_r)/dx_k = sum_r dL_r/d(slice k);
        # a reduce-scatter moves half the bytes of an all-reduce and slice (gloo emulates it that way)
        _, world = world_info()
        out = grad.new_empty((grad.shape[0] // world, *grad.shape[1:]))  # (B, ...)
        _reduce_scatter_single(out, grad.contiguous())
        return out


def all_gather_with_grad(x: Tensor) -> Tensor:
    """Concatenates x from all ranks in rank order, differentiably.

    The backward hands each rank the sum over ranks of the gradient for its own slice (a
    reduce-scatter), so gradients are those of the sum of all ranks' losses (DDP's averaging
    then makes it the mean). torch.distributed.nn.functional.all_gather would do the same
    but is deprecated.

    Costs one extra scalar all-gather to check the batch sizes (see `_check_equal_rows`; it
    never waits for the device), because a size mismatch would otherwise hang or abort the
    collective instead of raising.

    Args:
        x: (B, ...) tensor; B must be the same on every rank.

    Returns:
        (W*B, ...) tensor; x itself when not distributed.

    Raises:
        ValueError: on the CPU, if ranks hold different numbers of rows (on an accelerator a
            device-side assertion fails instead).
    """
    _, world = world_info()
    if world == 1:
        return x
    _check_equal_rows(x, world, "all_gather_with_grad")
    return _AllGatherWithGrad.apply(x)


@torch.no_grad()
def all_gather_no_grad(x: Tensor) -> Tensor:
    """Concatenates x from all ranks in rank order; ranks may hold different numbers of rows.

    Meant for evaluation (features, labels): rows are padded to the largest rank's count,
    gathered, then trimmed. Dims after the first, dtype and device must match across ranks.

    Args:
        x: (N_rank, ...) tensor.

    Returns:
        (sum of N_rank, ...) tensor without gradient; x itself when not distributed.
    """
    _, world = world_info()
    if world == 1:
        return x
    sizes = _gather_sizes(x, world).tolist()  # the host needs them to trim; evaluation can wait
    padded = x.new_zeros((max(sizes), *x.shape[1:]))  # (N_max, ...)
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)])


def _exchange(
    tensors: tuple[Tensor, ...], send_to: tuple[int, ...], recv_from: tuple[int, ...]
) -> tuple[Tensor, ...]:
    """Sends tensors[i] to rank send_to[i] while receiving one like it from rank recv_from[i]."""
    tensors = [t.contiguous() for t in tensors]
    received = [torch.empty_like(t) for t in tensors]
    ops = [dist.P2POp(dist.isend, t, peer) for t, peer in zip(tensors, send_to)]
    ops += [dist.P2POp(dist.irecv, r, peer) for r, peer in zip(received, recv_from)]
    for req in dist.batch_isend_irecv(ops):  # grouped under NCCL; plain isend/irecv under gloo
        req.wait()
    return tuple(received)


class _NeighbourExchange(torch.autograd.Function):
    """_exchange whose backward sends each gradient back to the rank its tensor came from."""

    @staticmethod
    def forward(ctx, send_to, recv_from, *tensors):
        ctx.send_to, ctx.recv_from = send_to, recv_from
        return _exchange(tensors, send_to, recv_from)

    @staticmethod
    def backward(ctx, *grads):
        return (None, None, *_exchange(grads, ctx.recv_from, ctx.send_to))


def ring_exchange_with_grad(x: Tensor) -> Iterator[Tensor]:
    """Yields every other rank's x, differentiably, passing blocks around the ring of ranks.

    Each round sends one block to each neighbour at once (rank-1 and rank+1, mod W) and
    receives one from each, so the W-1 blocks arrive in W//2 rounds, at most two at a
    time. The backward runs the same exchanges in reverse:
    each rank gets the sum over ranks of the gradient for its own x, i.e. gradients are
    those of the sum of all ranks' losses (DDP's averaging then makes it the mean), as for
    all_gather_with_grad. Every rank must consume the whole iterator, and call it the same
    number of times per step, or the exchanges deadlock. Like all_gather_with_grad, it costs
    one scalar all-gather to check the batch sizes first (never waiting for the device).

    Args:
        x: (B, ...) tensor; B must be the same on every rank.

    Yields:
        (B, ...) blocks from ranks rank-1, rank+1, rank-2, rank+2, ... (mod W), W-1 in all;
        when W is even the last one is rank+W/2's, received from the left only. Nothing when
        not distributed.

    Raises:
        ValueError: on the CPU, if ranks hold different numbers of rows (on an accelerator a
            device-side assertion fails instead).
    """
    rank, world = world_info()
    if world == 1:
        return
    _check_equal_rows(x, world, "ring_exchange_with_grad")
    left, right = (rank - 1) % world, (rank + 1) % world
    to_right = to_left = x
    for _ in range((world - 1) // 2):  # round k, both ways at once; W >= 3 so left != right
        to_right, to_left = _NeighbourExchange.apply(
            (right, left), (left, right), to_right, to_left
        )
        yield to_right  # rank - k's, received from the left; passed on rightwards
        yield to_left  # rank + k's, received from the right; passed on leftwards
    if world % 2 == 0:  # the opposite rank, rank + W/2, is as far one way as the other
        yield _NeighbourExchange.apply((right,), (left,), to_right)[0]


def all_gather_objects(items: list) -> list:
    """Every rank's picklable items concatenated in rank order (the items themselves without a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return list(items)
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, list(items))
    return [item for part in parts for item in part]
