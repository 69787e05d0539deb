#!/usr/bin/env bash
# BYOL, CIFAR-10, ResNet-18 (solo-learn recipe): LARS 1.0, wd 1e-5, projector/predictor 4096-256, EMA 0.99 -> 1.
source "$(dirname "$0")/common.sh"
$RUN train_ssl.py $CIFAR10 --loss byol --forward_views separately --ema 1 --ema_momentum 0.99 --ema_final 1.0 --pred_dims 4096-256 --num_views 2 \
  --recipe cifar_strong --proj_dims 4096-256 --proj_bn 1 --batch_size 256 --optimizer lars --blr 1.0 --lars_eta 0.02 --lars_clip 1 \
  --weight_decay 1e-5 --warmup_epochs 10 --epochs 1000 --output_dir $OUT/byol_cifar10 "$@"
