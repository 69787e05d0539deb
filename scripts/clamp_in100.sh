#!/usr/bin/env bash
# CLAMP, ImageNet-100, ResNet-50 (SPEC §1): 4 views alternating the two BYOL augmentations, batch 512, LARS 2.0 x B/256, 200 epochs, r_s 8.5.
source "$(dirname "$0")/common.sh"
$RUN train_ssl.py $IN100 --loss clamp --r_s 8.5 --num_views 4 --recipe imagenet --proj_dims 8192-8192-512 --proj_bn 0 \
  --batch_size 512 --optimizer lars --blr 2.0 --momentum 0.9 --weight_decay 1e-6 --lars_eta 1e-3 --warmup_epochs 10 --epochs 200 \
  --output_dir $OUT/clamp_in100 "$@"
