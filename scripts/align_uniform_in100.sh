#!/usr/bin/env bash
# Alignment + uniformity (Wang & Isola 2020), ImageNet-100, ResNet-50: weights 1/1, alpha 2, t 2 (SsnL/align_uniform
# defaults); the optimiser is ours (LARS 0.3 x B/256, 400 epochs, as the other IN-100 recipes): not a reproduction.
source "$(dirname "$0")/common.sh"
$RUN train_ssl.py $IN100 --loss align_uniform --align_alpha 2 --unif_t 2 --unif_weight 1 --num_views 2 --recipe imagenet \
  --proj_dims 2048-128 --proj_bn 1 --batch_size 512 --optimizer lars --blr 0.3 --lars_eta 0.02 --lars_clip 1 --weight_decay 1e-4 \
  --warmup_epochs 10 --epochs 400 --output_dir $OUT/align_uniform_in100 "$@"
