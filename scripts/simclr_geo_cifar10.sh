#!/usr/bin/env bash
# Geometric SimCLR, CIFAR-10, ResNet-18 (SPEC §5; YeskendirK/geometric-contrastive-learning): geodesic similarity, tau 0.05.
source "$(dirname "$0")/common.sh"
$RUN train_ssl.py $CIFAR10 --loss simclr --forward_views separately --geometric 1 --temperature 0.05 --num_views 2 --recipe cifar_strong --proj_dims 2048-256 \
  --batch_size 256 --optimizer lars --blr 0.4 --lars_eta 0.02 --lars_clip 1 --weight_decay 1e-4 --warmup_epochs 10 \
  --epochs 1000 --output_dir $OUT/simclr_geo_cifar10 "$@"
