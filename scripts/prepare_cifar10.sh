#!/usr/bin/env bash
# CIFAR-10 betons. Either from torchvision's folder (download it first where you have internet:
#   python -c "import torchvision; torchvision.datasets.CIFAR10('data/cifar', download=True)")
# or, on the dev machines, from ../shared/data/cifar10_jpeg75.npz (CIFAR10_NPZ=path).
source "$(dirname "$0")/common.sh"
for split in train test; do
  if [ -n "${CIFAR10_NPZ:-}" ]; then
    $PY data.py write --dataset cifar10_npz --root "$CIFAR10_NPZ" --split $split --out "$DATA/cifar10_$split.beton"
  else
    $PY data.py write --dataset cifar10 --root "${CIFAR_ROOT:-$DATA/cifar}" --split $split --out "$DATA/cifar10_$split.beton"
  fi
done
