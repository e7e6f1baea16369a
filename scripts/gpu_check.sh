#!/usr/bin/env bash
# One short GPU session: a real training run on the GPU and the throughput benchmark against
# open_clip's loop. Run from the repo root on a machine whose Python has torch and Lightning;
# other dependencies come from wheels in .whl/ when present. Results go to ${OUT:-gpu_out}.
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
python3 -m vlp.train trainer=gpu hydra.run.dir="$OUT/train" logger=csv trainer.enable_progress_bar=false \
  data.batch_size=256 data.num_workers=8 trainer.max_steps=400 trainer.val_check_interval=200 optim.lr=1e-3
python3 scripts/benchmark.py --device gpu --model vlp-clip-tiny --precision bf16 --batch-size 256 --workers 8 \
  --steps 80 --skip 20 --rounds 2 2>&1 | tee "$OUT/benchmark.txt"
