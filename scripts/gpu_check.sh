#!/usr/bin/env bash
# One short GPU session: real training runs on the GPU (both losses, micro-batching) and the
# throughput benchmark against open_clip's loop. Run from the repo root on a machine whose
# Python has torch and Lightning; other dependencies come from wheels in .whl/ when present.
# Results go to ${OUT:-gpu_out}.
set -euo pipefail
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
export WANDB_MODE=offline PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
nvidia-smi -L
python3 -c "import torch, pytorch_lightning as pl; print('torch', torch.__version__, 'lightning', pl.__version__, torch.cuda.get_device_name())"
python3 -m vlp.data.synthetic --out data/synthetic --train-samples 20000 --val-samples 512
train() { python3 -m vlp.train trainer=gpu hydra.run.dir="$OUT/$1" logger=csv trainer.enable_progress_bar=false \
  trainer.enable_model_summary=false data.num_workers=8 "${@:2}" > "$OUT/$1.log" 2>&1 || tail -30 "$OUT/$1.log"
  python3 -c "import json,sys; m=json.load(open(sys.argv[1])); print(sys.argv[2], {k: round(v, 4) for k, v in m.items() if k in ('global_step', 'val/zeroshot_top1', 'val/i2t_r@1', 'train/samples_per_second', 'train/peak_gpu_memory_gb')})" "$OUT/$1/metrics.json" "$1"; }
train clip data.batch_size=256 trainer.max_steps=400 trainer.val_check_interval=200 optim.lr=1e-3
train siglip loss=siglip data.batch_size=256 trainer.max_steps=400 trainer.val_check_interval=200 optim.lr=1e-3
for micro in null 64; do
  train tiny512-micro-$micro model=clip_tiny data.batch_size=512 micro_batch_size=$micro trainer.max_steps=30 data.val.urls=null
done
# the steady-state step never synchronises with the GPU (torch.cuda.set_sync_debug_mode("error"))
python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_host_sync.py 2>&1 | tail -5 | tee "$OUT/host_sync.txt" || true
# issue 10's GPU goals: ViT-B-32 224 px bf16 batch 256 against open_clip_train, memory by batch, MFU of ViT-B-16
python3 scripts/benchmark.py --device gpu --models ViT-B-32 --precision bf16 --batch-size 256 --workers 8 \
  --steps 60 --skip 20 --rounds 2 --memory-batches 128 512 --memory-steps 10 2>&1 | tee "$OUT/benchmark.txt"
python3 scripts/benchmark.py --device gpu --models ViT-B-16 --precision bf16 --batch-size 256 --workers 8 \
  --steps 40 --skip 15 --rounds 1 2>&1 | tee "$OUT/benchmark_b16.txt"
