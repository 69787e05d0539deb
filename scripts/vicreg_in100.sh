#!/usr/bin/env bash
# VICReg, ImageNet-100, ResNet-50 (solo-learn IN-100, 400 epochs).
source "$(dirname "$0")/common.sh"
$RUN train_ssl.py $IN100 --loss vicreg --forward_views separately --sim_weight 25 --var_weight 25 --cov_weight 1 --num_views 2 --recipe imagenet \
  --proj_dims 2048-2048-2048 --proj_bn 1 --batch_size 512 --optimizer lars --blr 0.3 --lars_eta 0.02 --lars_clip 1 \
  --weight_decay 1e-4 --warmup_epochs 10 --epochs 400 --output_dir $OUT/vicreg_in100 "$@"
