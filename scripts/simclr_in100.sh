#!/usr/bin/env bash
# SimCLR, ImageNet-100, ResNet-18 (as solo-learn's IN-100 recipes), solo-learn-style: LARS 0.4 x B/256, tau 0.2, 2048-256, 400 epochs.
source "$(dirname "$0")/common.sh"
$RUN train_ssl.py $IN100 --arch resnet18 --loss simclr --forward_views separately --temperature 0.2 --num_views 2 --recipe imagenet --proj_dims 2048-256 \
  --batch_size 512 --optimizer lars --blr 0.4 --lars_eta 0.02 --lars_clip 1 --weight_decay 1e-4 --warmup_epochs 10 --epochs 400 \
  --output_dir $OUT/simclr_in100 "$@"
