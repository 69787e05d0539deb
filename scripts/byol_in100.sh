#!/usr/bin/env bash
# BYOL, ImageNet-100, ResNet-50 (solo-learn IN-100 recipe, 400 epochs): LARS 1.0 x B/256, wd 1e-5, 4096-256, EMA 0.99 -> 1.
source "$(dirname "$0")/common.sh"
$RUN train_ssl.py $IN100 --loss byol --forward_views separately --ema 1 --ema_momentum 0.99 --ema_final 1.0 --pred_dims 4096-256 --num_views 2 \
  --recipe imagenet --proj_dims 4096-256 --proj_bn 1 --batch_size 512 --optimizer lars --blr 1.0 --lars_eta 0.02 --lars_clip 1 \
  --weight_decay 1e-5 --warmup_epochs 10 --epochs 400 --output_dir $OUT/byol_in100 "$@"
