"""Training throughput and memory of vlp against open_clip's own training loop, same shards and model.

    python scripts/benchmark.py                                   # micro and tiny, fp32 and bf16, 3 rounds
    python scripts/benchmark.py --models ViT-B-32 --batch-size 16 --steps 30 --skip 5
    python scripts/benchmark.py --scaling --memory-batches 32 64 128
    python scripts/benchmark.py --device gpu --models ViT-B-32 ViT-B-16 --precision bf16 --batch-size 256
    python scripts/benchmark.py --models vlp-clip-tiny --vlp-overrides model.compile=true

Runs alternate (open_clip, vlp, open_clip, vlp, ...) because machines are shared and noisy.
Each run trains `--steps` steps with the same global batch, workers, optimiser and model; the
per-step time (data loading included, as both loops measure it) is read from each framework's
own per-step log, and its median over the steps after `--skip` is reported, with the peak
resident memory of the largest process (and, on a GPU, peak GPU memory). Printed tables:

- throughput: one row per (model, precision), with vlp / open_clip;
- `--scaling`: 1 vs 2 processes (gloo on CPU, NCCL on GPUs) at the same global batch;
- `--memory-batches`: peak memory of each loop at several batch sizes;
- on a GPU, MFU: model FLOPs per sample (torch.utils.flop_counter, forward and backward,
  counted on the CPU) x samples/s over the chip's dense bf16 peak (`--peak-tflops`).

open_clip_train needs pandas (`pip install -e '.[bench]'`). Two patches to it, nothing else:
open_clip 3.3 crashes on webdataset >= 0.2.96 (KeyError: 'fname', open_clip#935; the runner
drops webdataset's empty end-of-shard markers before its grouping), and on CPU its DDP passes
`device_ids=[device]`, which CPU DDP rejects (the runner drops it). Threads per process are
cores / processes for both loops.
"""
import argparse
import csv
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import NamedTuple, Optional

ROOT = Path(__file__).resolve().parents[1]
PRECISIONS = {"fp32": ("fp32", "32-true"), "bf16": ("amp_bf16", "bf16-mixed")}  # open_clip, Lightning

# runs a command and writes the peak RSS (KB) of its largest process to a file
PEAK_RSS_RUNNER = """
import resource, subprocess, sys
code = subprocess.run(sys.argv[2:]).returncode
open(sys.argv[1], "w").write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss))
sys.exit(code)
"""
# open_clip_train with its model configs, the two patches above and its peak GPU memory at exit
OPEN_CLIP_RUNNER = """
import atexit, json, os, torch, open_clip, open_clip_train.data as data
args = json.loads(os.environ["BENCH_OPEN_CLIP_ARGS"])  # not argv: torchrun would parse --logs as its own
open_clip.add_model_config(args.pop(0))
group = data.group_by_keys_nothrow
data.group_by_keys_nothrow = lambda files, *a, **k: group((f for f in files if f), *a, **k)
if not torch.cuda.is_available():
    DDP = torch.nn.parallel.DistributedDataParallel
    class CpuDDP(DDP):
        def __init__(self, module, device_ids=None, **kwargs):
            super().__init__(module, **kwargs)
    torch.nn.parallel.DistributedDataParallel = CpuDDP
elif os.environ.get("RANK", "0") == "0":
    atexit.register(lambda: open(os.environ["BENCH_GPU_PEAK"], "w").write(str(torch.cuda.max_memory_allocated())))
from open_clip_train.main import main
main(args)
"""


class Run(NamedTuple):
    rates: list[float]  # global samples/s per step, after the warm-up
    rss_mb: int  # peak RSS of the largest process
    gpu_mb: Optional[float]  # peak GPU memory of rank 0


def timed(cmd: list[str], log: Path, world: int, cores: int, **env: str) -> int:
    """Runs cmd with cores / world threads per process; returns its peak RSS in MB (largest process)."""
    rss_file = log.with_suffix(".rss")
    threads = str(max(1, cores // world))
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": threads, "BENCH_GPU_PEAK": str(log.with_suffix(".gpu")),
           **env}
    with open(log, "w") as out:
        proc = subprocess.run([sys.executable, "-c", PEAK_RSS_RUNNER, str(rss_file), *cmd], stdout=out,
                              stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        sys.exit(f"benchmark run failed ({' '.join(cmd[:6])} ...); see {log}")
    return int(rss_file.read_text()) // 1024


def run_open_clip(args, model: str, precision: str, batch: int, world: int, steps: int, work: Path, tag: str) -> Run:
    runner = work / "open_clip_runner.py"
    runner.write_text(OPEN_CLIP_RUNNER)
    launch = [sys.executable, str(runner)] if world == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}", str(runner)]
    oc_args = [str(ROOT / "vlp" / "models" / "configs"), "--train-data", args.train_shards,
           "--dataset-type", "webdataset", "--train-num-samples", str(steps * batch), "--batch-size", str(batch // world),
           "--workers", str(args.workers), "--model", model, "--precision", PRECISIONS[precision][0], "--epochs", "1",
           "--lr", "5e-4", "--wd", "0.2", "--warmup", "100", "--log-every-n-steps", "1", "--save-frequency", "0",
           "--report-to", "", "--logs", str(work), "--name", tag, "--seed", "0"]
    if world > 1 and args.device == "cpu":
        oc_args += ["--dist-backend", "gloo"]
    rss = timed(launch, work / f"{tag}.log", world, args.cores, BENCH_OPEN_CLIP_ARGS=json.dumps(oc_args))
    step_times = [float(t) for t in re.findall(r"Batch \(t\): ([0-9.]+)", (work / tag / "out.log").read_text())]
    gpu = work / f"{tag}.gpu"
    return Run([batch / t for t in step_times[args.skip:]], rss, int(gpu.read_text()) / 2**20 if gpu.exists() else None)


def run_vlp(args, model: str, precision: str, batch: int, world: int, steps: int, work: Path, tag: str) -> Run:
    run_dir = work / tag
    trainer = [f"trainer={args.device}"] if world == 1 else [
        "trainer=ddp", f"trainer.devices={world}", f"trainer.accelerator={args.device}"]
    cmd = [sys.executable, "-m", "vlp.train", f"hydra.run.dir={run_dir}", f"paths.data_dir={args.data_dir}",
           f"model.towers.arch={model}", f"data.batch_size={batch // world}", f"data.num_workers={args.workers}",
           *trainer, f"trainer.max_steps={steps}", f"trainer.precision={PRECISIONS[precision][1]}",
           "data.val.urls=null", "logger=csv", "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false",
           "optim.lr=5e-4", "optim.weight_decay=0.2", "scheduler.warmup_steps=100", *args.vlp_overrides]
    rss = timed(cmd, work / f"{tag}.log", world, args.cores)
    with open(run_dir / "csv" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    rates = [float(r["train/samples_per_second"]) * world for r in rows if r.get("train/samples_per_second")]
    gpu = [float(r["train/peak_gpu_memory_gb"]) * 1024 for r in rows if r.get("train/peak_gpu_memory_gb")]
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # GBs at ViT-B sizes; the logs stay
    return Run(rates[args.skip:], rss, max(gpu) if gpu else None)


def alternate(args, model, precision, batch, world, steps, rounds, work, tag) -> dict[str, list[Run]]:
    """open_clip, vlp, open_clip, vlp, ...: `rounds` runs of each."""
    results = {"open_clip": [], "vlp": []}
    for r in range(rounds):
        for name, run in (("open_clip", run_open_clip), ("vlp", run_vlp)):
            results[name].append(run(args, model, precision, batch, world, steps, work, f"{tag}-{name}-{r}"))
        print(f"  {tag} round {r + 1}: " + ", ".join(f"{k} {statistics.median(v[-1].rates):.1f}/s"
                                                      for k, v in results.items()), flush=True)
    return results


def rate(runs: list[Run]) -> float:
    """Median over runs of each run's median samples/s."""
    return statistics.median(statistics.median(r.rates) for r in runs)


def peak(runs: list[Run], gpu: bool) -> str:
    return f"{max(r.gpu_mb for r in runs):.0f} MB GPU" if gpu else f"{max(r.rss_mb for r in runs)} MB"


def flops_per_sample(model_name: str) -> float:
    """Model FLOPs of one training sample (forward and backward of towers and loss), counted on the CPU."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from vlp.losses import ContrastiveLoss
    from vlp.models import VLPModel, open_clip_towers

    model = VLPModel(open_clip_towers(model_name))
    size = model.preprocess["size"]
    size = size if isinstance(size, int) else size[0]
    images, tokens = torch.randn(2, 3, size, size), model.tokenizer(["a photo", "a picture"])
    with FlopCounterMode(display=False) as counter:
        out = model(images, tokens)
        ContrastiveLoss()(out.image_features, out.text_features, out.logit_scale).loss.backward()
    return counter.get_total_flops() / 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["vlp-clip-micro", "vlp-clip-tiny"],
                        help="open_clip architectures (ViT-B-32: 224 px) or vlp's small ones")
    parser.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=sorted(PRECISIONS))
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--skip", type=int, default=20, help="warm-up steps left out of the median")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64, help="global batch")
    parser.add_argument("--workers", type=int, default=2, help="data workers per process")
    parser.add_argument("--data-dir", type=Path, default=ROOT / "data")
    parser.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    parser.add_argument("--vlp-overrides", nargs="*", default=[],
                        help="Hydra overrides for the vlp runs, e.g. a switch to measure: model.trim_text_padding=false")
    parser.add_argument("--scaling", action="store_true", help="also 1 vs 2 processes, first model and precision")
    parser.add_argument("--memory-batches", type=int, nargs="*", default=[],
                        help="also peak memory at these global batches (first model and precision, one round)")
    parser.add_argument("--memory-steps", type=int, default=10)
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak (H100/H200 SXM: 989)")
    args = parser.parse_args()
    args.cores = os.cpu_count() or 1
    gpu = args.device == "gpu"

    from vlp.data.synthetic import write_dataset

    args.train_shards = write_dataset(args.data_dir / "synthetic", train_samples=20000, val_samples=512)["train"]
    work = Path(tempfile.mkdtemp(prefix="vlp-bench-"))
    print(f"{args.device}: global batch {args.batch_size}, {args.workers} workers per process, {args.steps} steps, "
          f"{args.rounds} rounds alternating; logs in {work}", flush=True)
    rows = []
    for model in args.models:
        for precision in args.precision:
            runs = alternate(args, model, precision, args.batch_size, 1, args.steps, args.rounds, work,
                             f"{model}-{precision}")
            rows.append((model, precision, runs))

    print("\n| model | precision | open_clip samples/s | vlp samples/s | vlp / open_clip | open_clip peak | vlp peak |")
    print("|---|---|---|---|---|---|---|")
    for model, precision, runs in rows:
        oc, vl = rate(runs["open_clip"]), rate(runs["vlp"])
        print(f"| {model} | {precision} | {oc:.1f} | {vl:.1f} | {vl / oc:.2f}x | {peak(runs['open_clip'], gpu)} "
              f"| {peak(runs['vlp'], gpu)} |")
    if gpu:
        for model, precision, runs in rows:
            flops = flops_per_sample(model)
            mfu = {k: flops * rate(v) / (args.peak_tflops * 1e12) for k, v in runs.items()}
            print(f"MFU {model} {precision}: {flops / 1e9:.1f} GFLOP per sample; open_clip {mfu['open_clip']:.1%}, "
                  f"vlp {mfu['vlp']:.1%} of {args.peak_tflops:.0f} TFLOP/s")

    model, precision = args.models[0], args.precision[0]
    if args.scaling:
        scaling = {w: alternate(args, model, precision, args.batch_size, w, args.steps, args.rounds, work,
                                f"scaling-{w}") for w in (1, 2)}
        print(f"\nScaling, {model} {precision}, global batch {args.batch_size}:")
        print("| loop | 1 process samples/s | 2 processes samples/s | 2 / 1 | peak (2 processes) |\n|---|---|---|---|---|")
        for name in ("open_clip", "vlp"):
            one, two = rate(scaling[1][name]), rate(scaling[2][name])
            print(f"| {name} | {one:.1f} | {two:.1f} | {two / one:.2f}x | {peak(scaling[2][name], gpu)} |")
    if args.memory_batches:
        print(f"\nPeak memory by global batch, {model} {precision}, {args.memory_steps} steps:")
        print("| batch | open_clip | vlp | vlp / open_clip |\n|---|---|---|---|")
        every_step = argparse.Namespace(**{**vars(args), "skip": 0})
        for batch in args.memory_batches:
            runs = alternate(every_step, model, precision, batch, 1, args.memory_steps, 1, work, f"memory-{batch}")
            key = (lambda r: r.gpu_mb) if gpu else (lambda r: r.rss_mb)
            oc, vl = key(runs["open_clip"][0]), key(runs["vlp"][0])
            print(f"| {batch} | {oc:.0f} MB | {vl:.0f} MB | {vl / oc:.2f}x |")


if __name__ == "__main__":
    main()
