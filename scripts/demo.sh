#!/usr/bin/env bash
# The main job (`make demo`): Fashion-MNIST -> betons -> CLAMP pretraining of a narrow ResNet-18 on
# the CPU -> kNN top-1 of the same network at random init vs pretrained. ~10 minutes on 2 cores.
# Re-running resumes/reuses what is already there. Override: VENV, DATA, OUT, EPOCHS, WORKERS.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${VENV:-.venv}/bin/python
DATA=${DATA:-data}
OUT=${OUT:-runs/demo}
EPOCHS=${EPOCHS:-1}
WORKERS=${WORKERS:-2}
t0=$(date +%s)

for split in train test; do
  [ -f "$DATA/fmnist_$split.beton" ] || $PY data.py write --dataset fashion_mnist --root "$DATA/fashion_mnist" \
      --split $split --out "$DATA/fmnist_$split.beton"
done

# CLAMP (SPEC §1) scaled to a 2-core CPU: width-8 ResNet-18, 4 views, 28 px grayscale, 1 epoch.
# float32: CPUs without bf16 units run bfloat16 autocast 2-3x slower.
$PY train_ssl.py --data_path "$DATA/fmnist_train.beton" --val_path "$DATA/fmnist_test.beton" \
  --output_dir "$OUT/clamp" --loss clamp --r_s 7.0 \
  --arch resnet18 --width 8 --cifar_stem 1 --proj_dims 512-128 --num_views 4 --recipe crop \
  --epochs "$EPOCHS" --warmup_epochs 0.2 --batch_size 256 --optimizer lars --blr 0.3 --weight_decay 1e-6 \
  --dtype float32 --knn_every 0 --workers "$WORKERS"

for init in random pretrained; do
  $PY eval_knn.py --weights "$OUT/clamp" --init $init --data_path "$DATA/fmnist_train.beton" \
    --val_path "$DATA/fmnist_test.beton" --ks 20 200 --output_dir "$OUT/knn_$init" --workers "$WORKERS"
done

$PY - "$OUT" "$t0" <<'PY'
import json, sys, time
out, t0 = sys.argv[1], int(sys.argv[2])
r = {i: json.load(open(f'{out}/knn_{i}/results.json')) for i in ('random', 'pretrained')}
print('\n| Fashion-MNIST test, kNN (k=20, T=0.07, cosine) | top-1 | top-5 |\n|---|---|---|')
for i in r:
    print(f"| ResNet-18 w8, {'random init' if i == 'random' else 'CLAMP pretrained':16s} | {r[i]['top1_k20']:.2f} | {r[i]['top5_k20']:.2f} |")
print(f"\ngain: {r['pretrained']['top1_k20'] - r['random']['top1_k20']:+.2f} points of top-1; "
      f"demo wall time {(time.time() - t0) / 60:.1f} min; results in {out}/")
PY
