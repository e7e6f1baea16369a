"""Training throughput and peak memory of each fusion design against the pure dual encoder.

    python scripts/fusion_bench.py                     # default towers (vlp-clip-rn-micro), bf16, 3 rounds
    python scripts/fusion_bench.py --model vlp-clip-micro --steps 40 --rounds 5
    python scripts/fusion_bench.py --regions           # also cross_attention over region tokens

Same towers, batch, data and optimiser for every variant; the fusion runs train ITC + ITM + MLM
(vlp's defaults with a fusion), with `--width`/`--layers` fusion layers. Runs alternate
(none, cross_attention, merged, co_attention, [cross_attention regions,] none, ...) because the
machine is shared and noisy; `--regions` adds cross-attention over region tokens (two boxes per
image, `model.fusion.image_input=regions`). Samples/s is the median of vlp's per-step log after
`--skip` steps, peak RSS that of the largest process.
"""
import argparse
import csv
import os
import statistics
import sys
import tempfile
from pathlib import Path

from benchmark import timed  # scripts/benchmark.py: runs a command, returns its peak RSS (MB)

from vlp.data.synthetic import write_dataset

FUSIONS = ["null", "cross_attention", "merged", "co_attention"]
REGIONS = "cross_attention regions"


def run(args, fusion: str, data_dir: Path, work: Path, tag: str) -> tuple[float, int]:
    run_dir = work / tag
    cmd = [sys.executable, "-m", "vlp.train", f"hydra.run.dir={run_dir}", f"paths.data_dir={data_dir}",
           "data.prepare=null", f"data.train.num_samples={args.steps * args.batch_size}",
           f"model.towers.arch={args.model}", f"data.batch_size={args.batch_size}", f"data.num_workers={args.workers}",
           f"trainer.max_steps={args.steps}", f"trainer.precision={args.precision}", "data.val.urls=null",
           "logger=csv", "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false"]
    if fusion != "null":
        design, *regions = fusion.split()
        cmd += [f"fusion={design}", f"model.fusion.width={args.width}", f"model.fusion.layers={args.layers}"]
        cmd += ["model.fusion.image_input=regions", "data.max_boxes=2"] if regions else []
    rss = timed(cmd, work / f"{tag}.log", world=1, cores=os.cpu_count())
    with open(run_dir / "csv" / "metrics.csv") as f:
        rates = [float(r["train/samples_per_second"]) for r in csv.DictReader(f) if r.get("train/samples_per_second")]
    return statistics.median(rates[args.skip:]), rss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vlp-clip-rn-micro")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--skip", type=int, default=5, help="warm-up steps left out of the median")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--precision", default="bf16-mixed")
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--regions", action="store_true", help=f"also run {REGIONS!r}")
    args = parser.parse_args()
    variants = FUSIONS + [REGIONS] * args.regions
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        write_dataset(work / "synthetic", train_samples=args.steps * args.batch_size, val_samples=64)
        results = {f: [] for f in variants}
        for r in range(args.rounds):
            for fusion in variants:
                results[fusion].append(run(args, fusion, work, work, f"{fusion}-{r}"))
                print(f"round {r} {fusion}: {results[fusion][-1][0]:.1f} samples/s, {results[fusion][-1][1]} MB",
                      flush=True)
    base = statistics.median(s for s, _ in results["null"])
    print(f"\n{args.model}, batch {args.batch_size}, {args.precision}, fusion width {args.width} x {args.layers} "
          f"layers, medians of {args.rounds} rounds")
    print("| fusion | samples/s | vs dual encoder | peak RSS (MB) |\n|---|---|---|---|")
    for fusion, runs in results.items():
        speed, rss = statistics.median(s for s, _ in runs), statistics.median(m for _, m in runs)
        print(f"| {'none (dual encoder)' if fusion == 'null' else fusion} | {speed:.1f} | {speed / base:.2f}x | {rss:.0f} |")


if __name__ == "__main__":
    main()
