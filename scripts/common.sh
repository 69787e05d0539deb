# Sourced by every recipe script. Override on the command line, e.g.
#   NPROC=4 DATA=/datasets OUT=/runs bash scripts/clamp_cifar10.sh --epochs 10
# Betons: scripts/prepare_cifar10.sh, scripts/prepare_imagenet100.sh (or `python data.py write ...`).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
NPROC=${NPROC:-1}
DATA=${DATA:-data}
OUT=${OUT:-runs}
PY=${PY:-.venv/bin/python}
# torchrun from the venv's torch; tests set RUN to a recorder of the command line (tests/test_scripts.py)
RUN=${RUN:-"$PY -m torch.distributed.run --standalone --nproc_per_node=$NPROC"}
CIFAR10="--data_path $DATA/cifar10_train.beton --val_path $DATA/cifar10_test.beton --arch resnet18 --cifar_stem 1"
IN100="--data_path $DATA/in100_train.beton --val_path $DATA/in100_val.beton --arch resnet50 --cifar_stem 0 --res 224"
