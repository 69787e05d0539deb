#!/usr/bin/env bash
# Barlow Twins, ImageNet-100, ResNet-18 (solo-learn scripts/pretrain/imagenet-100/barlow.yaml, whose 80.38
# this is compared with): 2 x 128 = 256 images, LARS 0.3 x B/256, wd 1e-4, 400 epochs.
source "$(dirname "$0")/common.sh"
$RUN train_ssl.py $IN100 --arch resnet18 --loss barlow_twins --forward_views separately --lambd 0.0051 --scale_loss 0.1 --num_views 2 --recipe imagenet \
  --proj_dims 2048-2048-2048 --proj_bn 1 --batch_size 256 --optimizer lars --blr 0.3 --lars_eta 0.02 --lars_clip 1 \
  --weight_decay 1e-4 --warmup_epochs 10 --epochs 400 --output_dir $OUT/barlow_in100 "$@"
