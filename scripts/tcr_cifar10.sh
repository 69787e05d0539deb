#!/usr/bin/env bash
# NMCE stage 1 (TCR), CIFAR-10, ResNet-18 (SPEC §3; zengyi-li/NMCE-release): batch 1024, LARS lr 0.3 (blr 0.075;
# LARSWrapper eta 0.02, clip, as NMCE/train_selfsup.py), 600 epochs, z 128.
source "$(dirname "$0")/common.sh"
$RUN train_ssl.py $CIFAR10 --loss tcr --eps 0.2 --z_weight 30 --num_views 2 --recipe cifar --proj_dims 4096-128 --proj_bn 1 \
  --batch_size 1024 --optimizer lars --blr 0.075 --lars_eta 0.02 --lars_clip 1 --weight_decay 1e-4 --warmup_epochs 10 --epochs 600 \
  --output_dir $OUT/tcr_cifar10 "$@"
