#!/usr/bin/env bash
# CLAMP, CIFAR-10, ResNet-18 (SPEC §1; guanming-zhang/clamp CIFAR config): 16 views, batch 128, LARS 0.1 x B/256, 1000 epochs.
source "$(dirname "$0")/common.sh"
$RUN train_ssl.py $CIFAR10 --loss clamp --r_s 7.0 --num_views 16 --recipe cifar_strong --proj_dims 2048-256 --proj_bn 0 \
  --batch_size 128 --optimizer lars --blr 0.1 --momentum 0.9 --weight_decay 1e-6 --lars_eta 1e-3 --warmup_epochs 10 --epochs 1000 \
  --output_dir $OUT/clamp_cifar10 "$@"
