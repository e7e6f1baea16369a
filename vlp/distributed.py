"""torch.distributed helpers: rank/world lookup and all-gathers for the loss and evaluation.

Every helper works on the default process group and is a no-op (returns its input) when
torch.distributed is unavailable, not initialised, or has a single rank.
"""

import torch
import torch.distributed as dist
from torch import Tensor


def world_info() -> tuple[int, int]:
    """Returns (rank, world_size); (0, 1) when torch.distributed is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _gather_sizes(x: Tensor, world: int) -> list[int]:
    """Returns every rank's number of rows (dim 0) of x, in rank order."""
    n = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.empty_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    return [int(s) for s in sizes]


class _AllGatherWithGrad(torch.autograd.Function):
    """All-gather whose backward sums the gradient over ranks and returns this rank's slice."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        rank, world = world_info()
        ctx.rank, ctx.rows = rank, x.shape[0]
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)  # (W*B, ...)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        # every rank's loss depends on every slice: d(sum_r L_r)/dx_k = sum_r dL_r/d(slice k)
        grad = grad.clone(memory_format=torch.contiguous_format)  # (W*B, ...)
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]  # (B, ...)


def all_gather_with_grad(x: Tensor) -> Tensor:
    """Concatenates x from all ranks in rank order, differentiably.

    The backward hands each rank the sum over ranks of the gradient for its own slice, so
    gradients are those of the sum of all ranks' losses (DDP's averaging then makes it the
    mean). The backward all-reduces and slices, which every backend supports (older gloo has
    no reduce-scatter); the extra traffic is negligible for (W*B, D) features.
    torch.distributed.nn.functional.all_gather would do the same but is deprecated.

    Costs one extra scalar all-gather (and a host sync) to check the batch sizes, because
    a size mismatch would otherwise hang or abort the collective instead of raising.

    Args:
        x: (B, ...) tensor; B must be the same on every rank.

    Returns:
        (W*B, ...) tensor; x itself when not distributed.

    Raises:
        ValueError: if ranks hold different numbers of rows.
    """
    _, world = world_info()
    if world == 1:
        return x
    sizes = _gather_sizes(x, world)
    if len(set(sizes)) > 1:
        raise ValueError(f"all_gather_with_grad needs equal batch sizes on all ranks, got {sizes}")
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
    sizes = _gather_sizes(x, world)
    padded = x.new_zeros((max(sizes), *x.shape[1:]))  # (N_max, ...)
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)])
