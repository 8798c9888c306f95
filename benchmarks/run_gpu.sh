#!/usr/bin/env bash
# The GPU figures of the benchmark suite in one go (about 3 minutes on one H100):
#   ViT-S/16, 224 px, bf16, batch 64 (and 128, the released ViT-S/16 ImageNet per-GPU batch): full CrIBo
#   step and bare backbone step with achieved TFLOP/s; the fp32 batch-64 steps for the bf16 speed-up;
#   joint clustering at the ViT-S ImageNet setting (B 128, 196 tokens per view, k 32) and smaller batches;
#   cross-image retrieval over banks of 1,024 and 25,000 images (2,560 current objects, ViT-S ImageNet);
#   the device photometric augmentation per batch of 128 (and kornia / torchvision v2 where installed), and
#   the batch-128 step with --augment_on workers and device (uint8 views, photometric inside the step).
# Usage: OUT=benchmarks/results bash benchmarks/run_gpu.sh   (results: $OUT/*_gpu*.json)
set -u
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0))"
# einops is pure Python: fall back to a copy carried in build/gpu_site when the machine lacks it.
python -c "import einops" 2>/dev/null || export PYTHONPATH="$PWD/build/gpu_site:${PYTHONPATH:-}"
VIEWS=""
python -c "import torchvision, PIL" 2>/dev/null || { VIEWS="--random_views"; echo "no torchvision/PIL: random views"; }
STEP="python benchmarks/bench_train_step.py --arch vit_small --image_size 224 --device cuda --steps 10 --warmup 3 \
    --n_batches 2 $VIEWS"

$STEP --batch_size 64 --precision bf16 --out "$OUT/bench_train_step_gpu.json"
python benchmarks/bench_clustering.py --configs 128x196x32 64x196x32 16x196x32 --device cuda --repeats 5 \
    --out "$OUT/bench_clustering_gpu.json"
$STEP --batch_size 128 --precision bf16 --out "$OUT/bench_train_step_gpu_b128.json"
$STEP --batch_size 64 --precision fp32 --out "$OUT/bench_train_step_gpu_fp32.json"
python benchmarks/bench_retrieval.py --queue_sizes 1024 25000 --objects 2560 --push_images 128 --device cuda \
    --out "$OUT/bench_retrieval_gpu.json"
if [ -z "$VIEWS" ]; then
  python benchmarks/bench_photometric.py --device cuda --batch_size 128 --repeats 20 \
      --out "$OUT/bench_photometric_gpu.json"
  $STEP --batch_size 128 --precision bf16 --augment_on workers device \
      --out "$OUT/bench_train_step_gpu_b128_augment_on.json"
fi
