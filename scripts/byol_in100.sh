#!/usr/bin/env bash
# BYOL, ImageNet-100, ResNet-18 (solo-learn scripts/pretrain/imagenet-100/byol.yaml, whose 80.16 this is compared
# with): 2 x 128 = 256 images, LARS 0.5 x B/256 (eta 0.02, clip), wd 1e-6, projector 4096-256, predictor 8192-256,
# EMA 0.99 -> 1, 400 epochs.
source "$(dirname "$0")/common.sh"
$RUN train_ssl.py $IN100 --arch resnet18 --loss byol --forward_views separately --ema 1 --ema_momentum 0.99 --ema_final 1.0 --pred_dims 8192-256 --num_views 2 \
  --recipe imagenet --proj_dims 4096-256 --proj_bn 1 --batch_size 256 --optimizer lars --blr 0.5 --lars_eta 0.02 --lars_clip 1 \
  --weight_decay 1e-6 --warmup_epochs 10 --epochs 400 --output_dir $OUT/byol_in100 "$@"
