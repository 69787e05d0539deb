#!/usr/bin/env bash
# Alignment + uniformity (Wang & Isola 2020), CIFAR-10, ResNet-18: weights 1/1, alpha 2, t 2.
source "$(dirname "$0")/common.sh"
$RUN train_ssl.py $CIFAR10 --loss align_uniform --align_alpha 2 --unif_t 2 --unif_weight 1 --num_views 2 --recipe cifar_strong \
  --proj_dims 2048-128 --proj_bn 1 --batch_size 256 --optimizer lars --blr 0.3 --lars_eta 0.02 --lars_clip 1 --weight_decay 1e-4 \
  --warmup_epochs 10 --epochs 1000 --output_dir $OUT/align_uniform_cifar10 "$@"
