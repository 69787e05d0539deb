#!/usr/bin/env bash
# VICReg, CIFAR-10, ResNet-18 (solo-learn recipe): LARS 0.3, weights 25/25/1, projector 2048-2048-2048.
source "$(dirname "$0")/common.sh"
$RUN train_ssl.py $CIFAR10 --loss vicreg --forward_views separately --sim_weight 25 --var_weight 25 --cov_weight 1 --num_views 2 --recipe cifar_strong \
  --proj_dims 2048-2048-2048 --proj_bn 1 --batch_size 256 --optimizer lars --blr 0.3 --lars_eta 0.02 --lars_clip 1 \
  --weight_decay 1e-4 --warmup_epochs 10 --epochs 1000 --output_dir $OUT/vicreg_cifar10 "$@"
