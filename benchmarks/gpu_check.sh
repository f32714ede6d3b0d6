#!/usr/bin/env bash
# The GPU check, for the day a device is lent (under 10 minutes on one H100/H200-class GPU):
#   1. every objective, one step on CUDA (tests/test_devices.py::test_objective_step_on_cuda);
#   2. bench_train for ViT-S/16 and ViT-B/16 at 224 px in bf16 autocast: every training mode, the DINO
#      and GLARE pretraining steps, MFU against a bf16 matmul peak measured in the same run; the pretraining
#      steps again with their views built on the GPU (lever device_views);
#   3. one short GLARE pretraining (PneumoniaMNIST config, 200 steps) with the probe and the report;
#   4. the downstream table of bench_downstream (BUSI segmentation with linear / smp FPN / smp UPerNet
#      heads, BUSI and PolypGen cross-centre classification; head only vs adapters + head; 3 seeds),
#      the same table the CPU run measured, on the GPU in bf16.
# Assumes insitu is installed with the dev extras (pip install -e ".[dev]") and ../shared/data is present.
# Results go to $OUT (default: a new temporary folder).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/device.txt"
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, torch.cuda.get_device_name())"
python -m pytest -q -p no:cacheprovider tests/test_devices.py -k cuda 2>&1 | tee "$OUT/objectives_on_cuda.txt"
python benchmarks/bench_train.py --models vit_small_patch16_224 vit_base_patch16_224 --rows "full fine-tuning" \
  "bottleneck, all blocks" "bottleneck, last 4" "LoRA r=8 (qkv), all blocks" "head only" dino glare \
  --batch 64 --steps 10 --workers 8 --csv "$OUT/bench_train.csv" 2>&1 | tee "$OUT/bench_train.txt"
python benchmarks/bench_train.py --models vit_small_patch16_224 vit_base_patch16_224 --rows dino glare --levers device_views \
  --batch 64 --steps 10 --workers 8 --csv "$OUT/bench_train_device_views.csv" 2>&1 | tee "$OUT/bench_train_device_views.txt"
insitu --quiet pretrain -c configs/medical/pneumoniamnist_glare.yaml --probe \
  --set out_dir="$OUT/runs" --set train.max_steps=200 --set trainer.accelerator=gpu 2>&1 | tee "$OUT/glare.txt"
python benchmarks/bench_downstream.py --accelerator gpu --seeds 0 1 2 --steps 200 --out "$OUT/downstream" 2>&1 \
  | grep -v -E "Warning|warn|Tip|available|configured" | tee "$OUT/downstream.txt"
echo "results in $OUT"
