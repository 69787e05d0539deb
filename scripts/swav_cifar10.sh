#!/usr/bin/env bash
# SwAV, CIFAR-10, ResNet-18 (solo-learn recipe, 2 views): LARS 0.6, tau 0.1, 3000 prototypes, projector 2048-128,
# queue 3840 used from epoch 50, prototypes frozen for 2 epochs.
source "$(dirname "$0")/common.sh"
$RUN train_ssl.py $CIFAR10 --loss swav --temperature 0.1 --swav_prototypes 3000 --num_views 2 --recipe cifar_strong \
  --swav_queue_size 3840 --swav_queue_start_epoch 50 --freeze_prototypes_epochs 2 \
  --proj_dims 2048-128 --proj_bn 1 --batch_size 256 --optimizer lars --blr 0.6 --lars_eta 0.02 --lars_clip 1 \
  --weight_decay 1e-6 --warmup_epochs 10 --epochs 1000 --output_dir $OUT/swav_cifar10 "$@"
