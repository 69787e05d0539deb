#!/usr/bin/env bash
# CPLearn, ImageNet-100, ResNet-50. emsansone/CPLearn ships only CIFAR configs: this transfers that recipe (SPEC §4:
# projector tanh(BN(Linear 2048->2048)), 16384 fixed codes, Adam 1e-3 x B/256, wd 1e-4) to 224 px with the BYOL
# asymmetric augmentations and 400 epochs, batch 256. A starting point, not a reproduction.
source "$(dirname "$0")/common.sh"
$RUN train_ssl.py $IN100 --loss cplearn --forward_views separately --beta 1.0 --cplearn_codes 16384 --num_views 2 --recipe imagenet \
  --proj_dims 2048 --proj_last_bn 1 --proj_out_act tanh --batch_size 256 --optimizer adam --blr 1e-3 --weight_decay 1e-4 \
  --warmup_epochs 10 --epochs 400 --output_dir $OUT/cplearn_in100 "$@"
