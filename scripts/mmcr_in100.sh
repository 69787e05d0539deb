#!/usr/bin/env bash
# MMCR +ME, ImageNet-100, ResNet-50 (SPEC §2): momentum encoder (constant 0.99), 4 views alternating, LARS 0.6 x B/256, projector 8192-8192-512.
source "$(dirname "$0")/common.sh"
$RUN train_ssl.py $IN100 --loss mmcr --ema 1 --ema_momentum 0.99 --ema_final 0.99 --num_views 4 --recipe imagenet \
  --proj_dims 8192-8192-512 --proj_bn 1 --proj_bias 0 --batch_size 512 --optimizer lars --blr 0.6 --weight_decay 1e-6 \
  --warmup_epochs 10 --epochs 200 --output_dir $OUT/mmcr_in100 "$@"
