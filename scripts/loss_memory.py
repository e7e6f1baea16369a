"""Peak memory of the loss alone (forward + backward), chunked vlp.losses vs full logits.

Each (implementation, loss, batch size) runs in a fresh subprocess, which reports how far
one forward + backward on random unit-norm features (float32, CPU, one process) raised its
peak RSS above what it held before. Prints a markdown table.

    python scripts/loss_memory.py [--sizes 4096 8192 16384] [--dim 512]
"""

import argparse
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from vlp.losses import contrastive_loss, sigmoid_loss


def naive_loss(loss: str, image, text, scale, bias):
    """The full-logits form: autograd keeps the (B, B) logits and their intermediates."""
    logits = scale * image @ text.T  # (B, B)
    if loss == "contrastive":
        labels = torch.arange(image.shape[0])
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    labels = 2 * torch.eye(image.shape[0]) - 1  # (B, B)
    return -F.logsigmoid(labels * (logits + bias)).sum() / image.shape[0]


def vlp_loss(loss: str, image, text, scale, bias):
    if loss == "contrastive":
        return contrastive_loss(image, text, scale).loss
    return sigmoid_loss(image, text, scale, bias).loss


def measure(impl: str, loss: str, batch: int, dim: int) -> None:
    """Prints 'peak RSS growth in MiB, seconds' of one forward + backward."""
    g = torch.Generator().manual_seed(0)
    image = F.normalize(torch.randn(batch, dim, generator=g), dim=1).requires_grad_()
    text = F.normalize(torch.randn(batch, dim, generator=g), dim=1).requires_grad_()
    scale = torch.tensor(10.0, requires_grad=True)
    bias = torch.tensor(-10.0, requires_grad=True)
    fn = naive_loss if impl == "naive" else vlp_loss
    fn(loss, image[:8], text[:8], scale, bias).backward()  # warm up kernels and allocator
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    start = time.perf_counter()
    fn(loss, image, text, scale, bias).backward()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f"{(peak - before) / 1024:.0f} {seconds:.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[4096, 8192, 16384])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--child", nargs=3, metavar=("IMPL", "LOSS", "B"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        impl, loss, batch = args.child
        return measure(impl, loss, int(batch), args.dim)

    print(f"D = {args.dim}, float32, CPU, {torch.get_num_threads()} threads; peak RSS growth (MiB)")
    print("| loss | B | B×B fp32 (MiB) | naive | vlp (chunked) | naive s | vlp s |")
    print("|---|---|---|---|---|---|---|")
    for loss in ("contrastive", "sigmoid"):
        for batch in args.sizes:
            row = {}
            for impl in ("naive", "vlp"):  # one at a time: the naive ones need several GiB
                cmd = [sys.executable, __file__, "--dim", str(args.dim), "--child", impl, loss]
                out = subprocess.run(cmd + [str(batch)], capture_output=True, text=True, check=True)
                row[impl] = out.stdout.split()
            matrix = batch * batch * 4 / 2**20
            print(
                f"| {loss} | {batch} | {matrix:.0f} | {row['naive'][0]} | {row['vlp'][0]} "
                f"| {row['naive'][1]} | {row['vlp'][1]} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
