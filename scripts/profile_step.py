"""Where a training step's time goes: the model, loss and optimiser of a vlp step, without the data
pipeline or Lightning, timed and then profiled with torch.profiler (ops by self time).

    python scripts/profile_step.py --model vlp-clip-tiny --precision bf16
    python scripts/profile_step.py --model vlp-clip-tiny --precision bf16 --kernels torch   # torch's own attention choice

Random images and one caption repeated, cut to its length as vlp-train does (`--full-text`: padded
to the context length, as open_clip's loop runs it).
"""
import argparse
import time
from contextlib import nullcontext

import torch
from torch.profiler import profile

from vlp.losses import ContrastiveLoss
from vlp.models import VLPModel, open_clip_towers
from vlp.models.attention import attention_kernels
from vlp.models.text_padding import trim_padding
from vlp.train import MATMUL_PRECISIONS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vlp-clip-tiny")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="bf16")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--kernels", choices=["vlp", "torch"], default="vlp", help="attention kernels: vlp-train's or torch's")
    parser.add_argument("--matmul-precision", choices=MATMUL_PRECISIONS, default="medium",
                        help="float32_matmul_precision (vlp-train's default: medium; torch's: highest)")
    parser.add_argument("--full-text", action="store_true", help="no text padding trimming")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rows", type=int, default=15)
    args = parser.parse_args()

    torch.manual_seed(0)
    torch.set_float32_matmul_precision(args.matmul_precision)
    model = VLPModel(open_clip_towers(args.model), trim_text_padding=not args.full_text)
    loss = ContrastiveLoss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4, fused=True)
    size = model.preprocess["size"]
    images = torch.randn(args.batch_size, 3, *((size, size) if isinstance(size, int) else size))
    tokens = model.tokenizer(["a small red circle to the left of a big blue square"] * args.batch_size)
    tokens = tokens if args.full_text else trim_padding(tokens)
    bf16 = args.precision == "bf16"
    kernels = attention_kernels("cpu", "bf16-mixed" if bf16 else "32-true", args.matmul_precision) \
        if args.kernels == "vlp" else nullcontext()

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model(images, tokens)
            total = loss(out.image_features, out.text_features, out.logit_scale).loss
        total.backward()
        optimizer.step()
        optimizer.zero_grad()

    with kernels:
        for _ in range(3):
            step()
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        seconds = (time.perf_counter() - start) / args.steps
        with profile() as prof:
            for _ in range(3):
                step()
    print(f"{args.model} {args.precision} ({args.matmul_precision} matmul precision) batch {args.batch_size}, "
          f"text length {tokens.shape[1]}: "
          f"{seconds * 1000:.0f} ms per step, {args.batch_size / seconds:.1f} samples/s (model, loss, optimiser only)")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
