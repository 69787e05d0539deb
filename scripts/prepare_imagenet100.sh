#!/usr/bin/env bash
# ImageNet-100 (or ImageNet-1k) betons from an ImageFolder tree IN100_ROOT/{train,val}/<wnid>/*.JPEG,
# stored as JPEG with the longer side <= 512: most ImageNet images (~500 x 375) are kept at full size,
# so the evaluation's resize-256 / centre-crop-224 (a centre square of 0.875 x the short side) and the
# training crops shrink, as with the JPEG files solo-learn and the papers read. At --max_res 256 a 4:3
# image keeps a 192 px short side: every centre crop (168 px) and most training crops would be
# upsampled to 224. The price: several times the bytes of 256 px storage.
source "$(dirname "$0")/common.sh"
for split in train val; do
  $PY data.py write --dataset imagefolder --root "${IN100_ROOT:?set IN100_ROOT}" --split $split \
    --out "$DATA/in100_$split.beton" --format jpg --max_res 512 --jpeg_quality 90
done
