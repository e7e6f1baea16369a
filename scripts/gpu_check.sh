#!/usr/bin/env bash
# One short GPU session, most important first: the sync test, issue 10's throughput and memory
# goals against open_clip's loop (ViT-B-32, 224 px, bf16, batch 256), MFU of ViT-B-16, then a
# fusion pretraining on the GPU. Run from the repo root on a machine whose Python has torch and
# Lightning; other dependencies come from wheels in .whl/ when present. Results go to ${OUT:-gpu_out},
# one file per stage, so a stage cut short leaves the ones before it.
set -uo pipefail
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
export WANDB_MODE=offline PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
WORKERS=${WORKERS:-12}
nvidia-smi -L
python3 -c "import torch, pytorch_lightning as pl; print('torch', torch.__version__, 'lightning', pl.__version__, torch.cuda.get_device_name())"
python3 -m vlp.data.synthetic --out data/synthetic --train-samples 20000 --val-samples 512 > /dev/null
# the steady-state step never synchronises with the GPU (torch.cuda.set_sync_debug_mode("error"))
timeout 120 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_host_sync.py 2>&1 | tail -5 | tee "$OUT/host_sync.txt"
# ViT-B-32 224 px bf16 batch 256 against open_clip_train, with its MFU and peak GPU memory by batch
timeout 240 python3 scripts/benchmark.py --device gpu --models ViT-B-32 --precision bf16 --batch-size 256 \
  --workers "$WORKERS" --steps 60 --skip 20 --rounds 2 --memory-batches 128 512 --memory-steps 10 2>&1 | tee "$OUT/benchmark.txt"
timeout 100 python3 scripts/benchmark.py --device gpu --models ViT-B-16 --precision bf16 --batch-size 256 \
  --workers "$WORKERS" --steps 40 --skip 15 --rounds 1 2>&1 | tee "$OUT/benchmark_b16.txt"
# fusion pretraining (ITC + ITM + MLM) on the GPU, bf16
timeout 120 python3 -m vlp.train experiment=fusion_synthetic trainer=gpu hydra.run.dir=/tmp/fusion logger=csv \
  trainer.enable_progress_bar=false data.num_workers="$WORKERS" trainer.max_steps=300 trainer.val_check_interval=300 \
  > "$OUT/fusion.log" 2>&1 || tail -30 "$OUT/fusion.log"
python3 -c "import json; m = json.load(open('/tmp/fusion/metrics.json')); print('fusion', {k: round(v, 4) for k, v in m.items()})" \
  | tee "$OUT/fusion.txt"
