#!/usr/bin/env bash
# Geometric SimCLR, ImageNet-100, ResNet-50 (SPEC §5): simclr_in100.sh with the geodesic similarity and tau 0.05
# (the geometric repo's CIFAR temperature; it ships no ImageNet-100 recipe: a starting point, not a reproduction).
source "$(dirname "$0")/common.sh"
$RUN train_ssl.py $IN100 --loss simclr --forward_views separately --geometric 1 --temperature 0.05 --num_views 2 --recipe imagenet --proj_dims 2048-256 \
  --batch_size 512 --optimizer lars --blr 0.4 --lars_eta 0.02 --lars_clip 1 --weight_decay 1e-4 --warmup_epochs 10 \
  --epochs 400 --output_dir $OUT/simclr_geo_in100 "$@"
