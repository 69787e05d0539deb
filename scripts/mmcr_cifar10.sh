#!/usr/bin/env bash
# MMCR, CIFAR-10, ResNet-18 (SPEC §2; bartoszzuk/mmcr): 16 views x 64 images, Adam 1e-3, wd 1e-6, 500 epochs; projector Linear(no bias)-BN-ReLU-Linear.
source "$(dirname "$0")/common.sh"
$RUN train_ssl.py $CIFAR10 --loss mmcr --lmbda 0.0 --num_views 16 --recipe cifar --proj_dims 512-128 --proj_bn 1 --proj_bias 0 \
  --batch_size 64 --optimizer adam --lr 1e-3 --weight_decay 1e-6 --warmup_epochs 0 --epochs 500 \
  --output_dir $OUT/mmcr_cifar10 "$@"
