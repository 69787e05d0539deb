#!/usr/bin/env bash
# ImageNet-100 (or ImageNet-1k) betons from an ImageFolder tree IN100_ROOT/{train,val}/<wnid>/*.JPEG,
# stored as JPEG with the longer side <= 256 (ffcv-imagenet uses ~500 for 1k-class top accuracy).
source "$(dirname "$0")/common.sh"
for split in train val; do
  $PY data.py write --dataset imagefolder --root "${IN100_ROOT:?set IN100_ROOT}" --split $split \
    --out "$DATA/in100_$split.beton" --format jpg --max_res 256 --jpeg_quality 90
done
