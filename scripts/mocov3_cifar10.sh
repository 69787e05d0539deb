#!/usr/bin/env bash
# MoCo v3, CIFAR-10, ResNet-18 (solo-learn recipe): LARS 0.3, tau 0.2, projector 4096-256 ending in an affine-free
# BN (solo-learn _build_mlp last_bn), predictor 4096-256, EMA 0.99 -> 1.
source "$(dirname "$0")/common.sh"
$RUN train_ssl.py $CIFAR10 --loss mocov3 --forward_views separately --temperature 0.2 --ema 1 --ema_momentum 0.99 --ema_final 1.0 --pred_dims 4096-256 \
  --num_views 2 --recipe cifar_strong --proj_dims 4096-256 --proj_bn 1 --proj_last_bn 1 --proj_last_bn_affine 0 --batch_size 256 --optimizer lars --blr 0.3 --lars_eta 0.02 \
  --lars_clip 1 --weight_decay 1e-6 --warmup_epochs 10 --epochs 1000 --output_dir $OUT/mocov3_cifar10 "$@"
