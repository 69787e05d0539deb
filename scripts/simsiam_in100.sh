#!/usr/bin/env bash
# SimSiam, ImageNet-100, ResNet-18 (solo-learn IN-100 recipe, 400 epochs): SGD 0.5 x B/256, wd 1e-5,
# projector 2048-2048-2048 ending in an affine-free BN, predictor 512-2048, BYOL asymmetric augmentations.
source "$(dirname "$0")/common.sh"
$RUN train_ssl.py $IN100 --arch resnet18 --loss simsiam --forward_views separately --pred_dims 512-2048 --num_views 2 --recipe imagenet --proj_dims 2048-2048-2048 \
  --proj_bn 1 --proj_last_bn 1 --proj_last_bn_affine 0 --batch_size 512 --optimizer sgd --blr 0.5 --weight_decay 1e-5 --warmup_epochs 10 --epochs 400 \
  --output_dir $OUT/simsiam_in100 "$@"
