#!/usr/bin/env bash
# The GPU checks, as one command on a CUDA machine where ffcv-dr imports:
#
#   benchmarks/gpu_check.sh IMAGES_DIR [WORK_DIR]
#
# 1. Generation: a larger timm teacher (convnext_base, random weights: only its
#    speed matters here) alone on pre-made batches, against the whole
#    `ffcv-dr reinforce` pipeline on the first 320 images of IMAGES_DIR and
#    `ffcv-dr relabel` of the file it wrote.
# 2. Training step at 176 px: ResNet-50, channels_last, AMP, fed by ffcv-dr
#    against plain FFCV on the same images as ffcv-imagenet writes ImageNet
#    (benchmarks/gpu_train_step.py), on a .beton reinforced from IMAGES_DIR
#    repeated 32 times (long epochs), at 176 and 224 px.
set -euo pipefail
images="$1"
work="${2:-$(mktemp -d)}"
here="$(cd "$(dirname "$0")" && pwd)"
python3 "$here/generation.py" --images-dir "$images" --images 320 --samples 8 \
    --teacher convnext_base --no-pretrained --device cuda --batch-size 256

repeated="$work/repeated"
for cls in "$images"/*/; do
    name="$(basename "$cls")"
    mkdir -p "$repeated/$name"
    for k in $(seq 32); do
        for f in "$cls"*; do
            ln -sf "$(cd "$(dirname "$f")" && pwd)/$(basename "$f")" "$repeated/$name/${k}_$(basename "$f")"
        done
    done
done
python3 -m ffcv_dr.cli reinforce "$repeated" "$work/train.beton" --teacher resnet18 --no-pretrained \
    --samples 2 --chunk 128 --device cuda --batch-size 256
for size in 176 224; do
    python3 "$here/gpu_train_step.py" "$work/train.beton" --size $size --batch-size 256 --rounds 3
done
