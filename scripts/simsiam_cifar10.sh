#!/usr/bin/env bash
# SimSiam, CIFAR-10, ResNet-18 (solo-learn recipe): SGD 0.5, wd 1e-5, projector 2048-2048-2048 ending in an affine-free BN, predictor 512-2048.
source "$(dirname "$0")/common.sh"
$RUN train_ssl.py $CIFAR10 --loss simsiam --forward_views separately --pred_dims 512-2048 --num_views 2 --recipe cifar_strong --proj_dims 2048-2048-2048 \
  --proj_bn 1 --proj_last_bn 1 --proj_last_bn_affine 0 --batch_size 256 --optimizer sgd --blr 0.5 --weight_decay 1e-5 --warmup_epochs 10 --epochs 1000 \
  --output_dir $OUT/simsiam_cifar10 "$@"
