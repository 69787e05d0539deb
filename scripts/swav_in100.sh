#!/usr/bin/env bash
# SwAV, ImageNet-100, ResNet-18 (as solo-learn), multi-crop 2 x 224 px (area 0.14-1) + 6 x 96 px (0.05-0.14) from one decode
# (SwAV paper's crops; solo-learn's IN-100 hyper-parameters: LARS 0.6, wd 1e-6, tau 0.1, 3000 prototypes,
# projector 2048-128, queue 3840 from epoch 50, prototypes frozen 2 epochs, 400 epochs). Colour: the BYOL
# asymmetric pair of SPEC §7 alternated over the crops (SwAV itself blurs every crop with p 0.5, no solarize).
source "$(dirname "$0")/common.sh"
$RUN train_ssl.py $IN100 --arch resnet18 --loss swav --temperature 0.1 --swav_prototypes 3000 --num_views 2 --recipe imagenet \
  --crop_min_scale 0.14 --num_small_views 6 --small_res 96 --small_scale 0.05 0.14 \
  --swav_queue_size 3840 --swav_queue_start_epoch 50 --freeze_prototypes_epochs 2 \
  --proj_dims 2048-128 --proj_bn 1 --batch_size 256 --optimizer lars --blr 0.6 --lars_eta 0.02 --lars_clip 1 \
  --weight_decay 1e-6 --warmup_epochs 10 --epochs 400 --output_dir $OUT/swav_in100 "$@"
