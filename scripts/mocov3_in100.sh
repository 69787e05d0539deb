#!/usr/bin/env bash
# MoCo v3, ImageNet-100, ResNet-18 (solo-learn scripts/pretrain/imagenet-100/mocov3.yaml): 2 x 128 = 256 images,
# LARS 0.3 x B/256, wd 1e-6, tau 0.2,
# projector 4096-256 ending in an affine-free BN, predictor 4096-256, EMA 0.99 -> 1 (cosine), BYOL asymmetric augmentations.
source "$(dirname "$0")/common.sh"
$RUN train_ssl.py $IN100 --arch resnet18 --loss mocov3 --forward_views separately --temperature 0.2 --ema 1 --ema_momentum 0.99 --ema_final 1.0 --pred_dims 4096-256 \
  --num_views 2 --recipe imagenet --proj_dims 4096-256 --proj_bn 1 --proj_last_bn 1 --proj_last_bn_affine 0 --batch_size 256 --optimizer lars --blr 0.3 --lars_eta 0.02 \
  --lars_clip 1 --weight_decay 1e-6 --warmup_epochs 10 --epochs 400 --output_dir $OUT/mocov3_in100 "$@"
