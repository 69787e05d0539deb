#!/usr/bin/env bash
# NMCE stage 1 (TCR), ImageNet-100, ResNet-50. zengyi-li/NMCE-release has no ImageNet-100 recipe: this keeps its
# CIFAR settings (SPEC §3: eps 0.2, z_weight 30, batch 1024, LARS lr 0.3 = blr 0.075, z 128, head 4096) at 224 px
# with the BYOL asymmetric augmentations, 400 epochs. A starting point, not a reproduction.
source "$(dirname "$0")/common.sh"
$RUN train_ssl.py $IN100 --loss tcr --eps 0.2 --z_weight 30 --num_views 2 --recipe imagenet --proj_dims 4096-128 --proj_bn 1 \
  --batch_size 1024 --optimizer lars --blr 0.075 --lars_eta 0.02 --lars_clip 1 --weight_decay 1e-4 --warmup_epochs 10 --epochs 400 \
  --output_dir $OUT/tcr_in100 "$@"
