#!/usr/bin/env bash
# CPLearn, CIFAR-10, ResNet-18 (SPEC §4; emsansone/CPLearn): projector tanh(BN(Linear 512->2048)), 16384 fixed codes, Adam 1e-3 x B/256, wd 1e-4, batch 64, 1000 epochs.
source "$(dirname "$0")/common.sh"
$RUN train_ssl.py $CIFAR10 --loss cplearn --forward_views separately --beta 1.0 --cplearn_codes 16384 --num_views 2 --recipe cifar_strong \
  --proj_dims 2048 --proj_last_bn 1 --proj_out_act tanh --batch_size 64 --optimizer adam --blr 1e-3 --weight_decay 1e-4 \
  --warmup_epochs 10 --epochs 1000 --output_dir $OUT/cplearn_cifar10 "$@"
