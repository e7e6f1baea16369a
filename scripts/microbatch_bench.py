"""Peak memory and throughput of vlp-train with and without contrastive-exact micro-batching.

    python scripts/microbatch_bench.py                 # tiny model, batch 512, micro-batches of 64

Each configuration runs in a fresh process (alternating, `--rounds` times) on the synthetic
shards; reports the median per-step samples/s and the peak RSS of the training process.
"""
import argparse
import csv
import os
import statistics
import sys
import tempfile
from pathlib import Path

from benchmark import ROOT, timed  # same folder


def run(args, micro: str, work: Path, tag: str) -> tuple[float, int]:
    run_dir = work / tag
    cmd = [sys.executable, "-m", "vlp.train", f"hydra.run.dir={run_dir}", f"paths.data_dir={args.data_dir}",
           f"model.towers.arch={args.model}", f"data.batch_size={args.batch_size}", f"micro_batch_size={micro}",
           f"trainer.max_steps={args.steps}", "data.val.urls=null", "logger=csv", "trainer.log_every_n_steps=1",
           "trainer.enable_progress_bar=false", "data.num_workers=2"]
    rss = timed(cmd, work / f"{tag}.log", world=1, cores=os.cpu_count())
    with open(run_dir / "csv" / "metrics.csv") as f:
        rates = [float(r["train/samples_per_second"]) for r in csv.DictReader(f) if r.get("train/samples_per_second")]
    return statistics.median(rates[args.skip:]), rss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vlp-clip-tiny")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--micro-batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--skip", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--data-dir", type=Path, default=ROOT / "data")
    args = parser.parse_args()
    from vlp.data.synthetic import write_dataset

    write_dataset(args.data_dir / "synthetic", train_samples=20000, val_samples=512)
    work = Path(tempfile.mkdtemp(prefix="vlp-micro-"))
    results = {"null": [], str(args.micro_batch_size): []}
    for r in range(args.rounds):
        for micro in results:
            results[micro].append(run(args, micro, work, f"micro-{micro}-{r}"))
            print(f"  round {r + 1}, micro_batch_size={micro}: {results[micro][-1][0]:.1f} samples/s, "
                  f"{results[micro][-1][1]} MB", flush=True)
    print(f"\n{args.model}, data.batch_size={args.batch_size}, {args.steps} steps, logs in {work}\n")
    print("| micro_batch_size | samples/s | peak RSS |\n|---|---|---|")
    for micro, runs in results.items():
        print(f"| {micro} | {statistics.median(s for s, _ in runs):.1f} | {max(m for _, m in runs)} MB |")


if __name__ == "__main__":
    main()
