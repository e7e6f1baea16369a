"""Training throughput of vlp against open_clip's own training loop, on the same shards and model.

    python scripts/benchmark.py                       # micro model, fp32 and bf16, 3 rounds
    python scripts/benchmark.py --model vlp-clip-tiny --steps 100 --rounds 5

Runs alternate (open_clip, vlp, open_clip, vlp, ...) because the machine is shared and noisy.
Each run trains `--steps` steps with the same global batch, workers, optimiser and model;
the per-step time (data loading included, as both loops measure it) is read from each
framework's own per-step log, and its median over the steps after `--skip` is reported,
with the peak resident memory of the largest process. open_clip_train needs pandas
(`pip install -e '.[bench]'`). `--device gpu` runs both on the first GPU.

open_clip 3.3 crashes on webdataset >= 0.2.96 (KeyError: 'fname', open_clip#935): its
grouping does not expect the empty end-of-shard marker. The runner below drops those
markers before open_clip's grouping; nothing else in open_clip is changed.
"""
import argparse
import csv
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRECISIONS = {"fp32": ("fp32", "32-true"), "bf16": ("amp_bf16", "bf16-mixed")}  # open_clip, Lightning

# runs a command and writes the peak RSS (KB) of its largest process to a file
PEAK_RSS_RUNNER = """
import resource, subprocess, sys
code = subprocess.run(sys.argv[2:]).returncode
open(sys.argv[1], "w").write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss))
sys.exit(code)
"""
OPEN_CLIP_RUNNER = """
import sys, open_clip, open_clip_train.data as data
open_clip.add_model_config(sys.argv.pop(1))
group = data.group_by_keys_nothrow
data.group_by_keys_nothrow = lambda files, *a, **k: group((f for f in files if f), *a, **k)
from open_clip_train.main import main
main(sys.argv[1:])
"""


def timed(cmd: list[str], log: Path) -> int:
    """Runs cmd; returns its peak RSS in MB (largest process)."""
    rss_file = log.with_suffix(".rss")
    with open(log, "w") as out:
        proc = subprocess.run([sys.executable, "-c", PEAK_RSS_RUNNER, str(rss_file), *cmd], stdout=out,
                              stderr=subprocess.STDOUT, env={**os.environ, "WANDB_MODE": "offline"})
    if proc.returncode != 0:
        sys.exit(f"benchmark run failed ({' '.join(cmd[:4])} ...); see {log}")
    return int(rss_file.read_text()) // 1024


def run_open_clip(args, precision: str, shards: str, work: Path, tag: str) -> tuple[list[float], int]:
    cmd = [sys.executable, "-c", OPEN_CLIP_RUNNER, str(ROOT / "vlp" / "models" / "configs"),
           "--train-data", shards, "--dataset-type", "webdataset", "--train-num-samples",
           str(args.steps * args.batch_size), "--batch-size", str(args.batch_size), "--workers", str(args.workers),
           "--model", args.model, "--precision", precision, "--epochs", "1", "--lr", "5e-4", "--wd", "0.2",
           "--warmup", "100", "--log-every-n-steps", "1", "--save-frequency", "0", "--report-to", "",
           "--logs", str(work), "--name", tag, "--seed", "0"]
    rss = timed(cmd, work / f"{tag}.log")
    text = (work / tag / "out.log").read_text()
    step_times = [float(t) for t in re.findall(r"Batch \(t\): ([0-9.]+)", text)]
    return [args.batch_size / t for t in step_times[args.skip:]], rss


def run_vlp(args, precision: str, data_dir: Path, work: Path, tag: str) -> tuple[list[float], int]:
    run_dir = work / tag
    cmd = [sys.executable, "-m", "vlp.train", f"hydra.run.dir={run_dir}", f"paths.data_dir={data_dir}",
           f"model.towers.arch={args.model}", f"data.batch_size={args.batch_size}",
           f"data.num_workers={args.workers}", f"trainer.max_steps={args.steps}", f"trainer.precision={precision}",
           "data.val.urls=null", "logger=csv", "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false",
           "optim.lr=5e-4", "optim.weight_decay=0.2", "scheduler.warmup_steps=100", f"trainer={args.device}"]
    rss = timed(cmd, work / f"{tag}.log")
    with open(run_dir / "csv" / "metrics.csv") as f:
        rates = [float(r["train/samples_per_second"]) for r in csv.DictReader(f) if r.get("train/samples_per_second")]
    return rates[args.skip:], rss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vlp-clip-micro")
    parser.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=sorted(PRECISIONS))
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--skip", type=int, default=20, help="warm-up steps left out of the median")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--data-dir", type=Path, default=ROOT / "data")
    parser.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    args = parser.parse_args()

    from vlp.data.synthetic import write_dataset

    patterns = write_dataset(args.data_dir / "synthetic", train_samples=20000, val_samples=512)
    work = Path(tempfile.mkdtemp(prefix="vlp-bench-"))
    print(f"{args.device}: model {args.model}, batch {args.batch_size}, {args.workers} workers, {args.steps} steps, "
          f"{args.rounds} rounds alternating; logs in {work}")
    rows = []
    for name in args.precision:
        oc_precision, pl_precision = PRECISIONS[name]
        results = {"open_clip": [], "vlp": []}
        for r in range(args.rounds):
            results["open_clip"].append(run_open_clip(args, oc_precision, patterns["train"], work, f"oc-{name}-{r}"))
            results["vlp"].append(run_vlp(args, pl_precision, args.data_dir, work, f"vlp-{name}-{r}"))
            print(f"  {name} round {r + 1}: " + ", ".join(
                f"{k} {statistics.median(v[-1][0]):.1f}/s" for k, v in results.items()), flush=True)
        medians = {k: statistics.median(statistics.median(rates) for rates, _ in v) for k, v in results.items()}
        rss = {k: max(m for _, m in v) for k, v in results.items()}
        rows.append((name, medians["open_clip"], medians["vlp"], medians["vlp"] / medians["open_clip"],
                     rss["open_clip"], rss["vlp"]))
    print("\n| precision | open_clip samples/s | vlp samples/s | vlp / open_clip | open_clip peak RSS | vlp peak RSS |")
    print("|---|---|---|---|---|---|")
    for name, oc, vl, ratio, oc_rss, vl_rss in rows:
        print(f"| {name} | {oc:.1f} | {vl:.1f} | {ratio:.2f}x | {oc_rss} MB | {vl_rss} MB |")


if __name__ == "__main__":
    main()
