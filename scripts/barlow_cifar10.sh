#!/usr/bin/env bash
# Barlow Twins, CIFAR-10, ResNet-18 (solo-learn recipe): LARS 0.3, lambda 0.0051, loss scale 0.1, projector 2048-2048-2048.
source "$(dirname "$0")/common.sh"
$RUN train_ssl.py $CIFAR10 --loss barlow_twins --forward_views separately --lambd 0.0051 --scale_loss 0.1 --num_views 2 --recipe cifar_strong \
  --proj_dims 2048-2048-2048 --proj_bn 1 --batch_size 256 --optimizer lars --blr 0.3 --lars_eta 0.02 --lars_clip 1 \
  --weight_decay 1e-4 --warmup_epochs 10 --epochs 1000 --output_dir $OUT/barlow_cifar10 "$@"
