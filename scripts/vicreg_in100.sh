#!/usr/bin/env bash
# VICReg, ImageNet-100, ResNet-18 (solo-learn scripts/pretrain/imagenet-100/vicreg.yaml, whose 79.22 this is
# compared with): 2 x 128 = 256 images, LARS 0.3 x B/256, wd 1e-4, 400 epochs. Colour: the BYOL asymmetric pair;
# min crop area 0.2 as solo-learn (whose VICReg colour is blur p 0.5, solarize p 0.1 on both views).
source "$(dirname "$0")/common.sh"
$RUN train_ssl.py $IN100 --arch resnet18 --loss vicreg --forward_views separately --sim_weight 25 --var_weight 25 --cov_weight 1 --num_views 2 --recipe imagenet --crop_min_scale 0.2 \
  --proj_dims 2048-2048-2048 --proj_bn 1 --batch_size 256 --optimizer lars --blr 0.3 --lars_eta 0.02 --lars_clip 1 \
  --weight_decay 1e-4 --warmup_epochs 10 --epochs 400 --output_dir $OUT/vicreg_in100 "$@"
