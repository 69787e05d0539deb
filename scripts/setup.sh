#!/usr/bin/env bash
# One idempotent set-up for a fresh machine: the system libraries ffcv builds against, a virtual
# environment with requirements.txt, and the default data (Fashion-MNIST). Safe to re-run: every
# step is skipped when its result is already there. Used by `make setup` (and so by demo/test).
#   VENV=path    where the virtual environment goes   (default .venv)
#   DATA=path    where datasets are fetched to         (default data)
#   PYTHON=bin   the interpreter that creates the venv (default python3)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
DATA=${DATA:-data}
PYTHON=${PYTHON:-python3}
SUDO=""
if [ "$(id -u)" != 0 ] && command -v sudo >/dev/null 2>&1; then SUDO=sudo; fi
say() { echo "[setup] $*"; }

# ---- 1. system libraries for ffcv (pkg-config, libturbojpeg, OpenCV core + imgproc) --------------
if command -v dpkg >/dev/null 2>&1; then
  need=()
  for p in pkg-config libturbojpeg0-dev libopencv-core-dev libopencv-imgproc-dev; do
    dpkg -s "$p" >/dev/null 2>&1 || need+=("$p")
  done
  if [ ${#need[@]} -gt 0 ]; then
    say "apt-get install ${need[*]} (~50 MB)"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  fi
elif ! pkg-config --exists libturbojpeg 2>/dev/null; then
  echo "[setup] error: no apt here; install pkg-config, libturbojpeg and OpenCV (core, imgproc) development files, then re-run" >&2
  exit 1
fi

# ---- 2. an opencv4.pc that ffcv's setup.py can find --------------------------------------------
# Debian ships opencv4.pc only in the 690 MB libopencv-dev. ffcv needs only core + imgproc, so we
# write a pc file naming those two and an opencv2/opencv.hpp that includes just their headers.
SHIM="$PWD/$VENV/ffcv-shim"
if ! pkg-config --exists opencv4 2>/dev/null && [ ! -f "$SHIM/opencv4.pc" ]; then
  inc=$(dirname "$(find /usr/include /usr/local/include -path '*opencv2/core.hpp' 2>/dev/null | head -1)" 2>/dev/null || true)
  [ -n "$inc" ] || { echo "[setup] error: OpenCV headers (opencv2/core.hpp) not found" >&2; exit 1; }
  lib=$(dirname "$(find /usr/lib /usr/local/lib -name 'libopencv_core.so' 2>/dev/null | head -1)")
  mkdir -p "$SHIM/include/opencv2"
  printf '#include "opencv2/core.hpp"\n#include "opencv2/imgproc.hpp"\n' > "$SHIM/include/opencv2/opencv.hpp"
  cat > "$SHIM/opencv4.pc" <<PC
Name: opencv4
Description: OpenCV core + imgproc (shim written by scripts/setup.sh for ffcv)
Version: 4
Libs: -L$lib -lopencv_imgproc -lopencv_core
Cflags: -I$SHIM/include -I$(dirname "$inc")
PC
  say "wrote $SHIM/opencv4.pc"
fi
export PKG_CONFIG_PATH="$SHIM${PKG_CONFIG_PATH:+:$PKG_CONFIG_PATH}"

# ---- 3. virtual environment + requirements ------------------------------------------------------
if [ ! -x "$VENV/bin/python" ]; then
  say "creating $VENV"
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
fi
stamp="$VENV/.requirements.sha"
want=$(sha1sum requirements.txt | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  say "pip install -r requirements.txt (torch is large: a few minutes on a fresh machine)"
  # numpy/cython must exist before ffcv's setup.py runs (it imports them at build time)
  "$VENV/bin/pip" install -q "numpy>=1.26" cython setuptools wheel pkgconfig 2>&1 | { grep -v "is ignored: it is neither" || true; }
  "$VENV/bin/pip" install -q --no-build-isolation -r requirements.txt 2>&1 | { grep -v "is ignored: it is neither" || true; }
  echo "$want" > "$stamp"
fi

# ---- 4. default data: Fashion-MNIST (70,000 real 28x28 images) ---------------------------------
FM="$DATA/fashion_mnist"
if [ ! -f "$FM/train-images-idx3-ubyte.gz" ] || [ ! -f "$FM/t10k-labels-idx1-ubyte.gz" ]; then
  mkdir -p "$FM"
  tmp=$(mktemp -d)
  if command -v apt-get >/dev/null 2>&1 && (cd "$tmp" && apt-get download -qq dataset-fashion-mnist >/dev/null 2>&1); then
    dpkg -x "$tmp"/dataset-fashion-mnist_*.deb "$tmp/x"
    cp "$tmp"/x/usr/share/datasets/fashion-mnist/*.gz "$FM/"
    echo "debian:dataset-fashion-mnist" > "$FM/SOURCE"
  else
    say "apt-get download failed or no apt: falling back to torchvision's Fashion-MNIST download"
    "$VENV/bin/python" - "$tmp" <<'PY'
import sys, torchvision
torchvision.datasets.FashionMNIST(sys.argv[1], train=True, download=True)
torchvision.datasets.FashionMNIST(sys.argv[1], train=False, download=True)
PY
    cp "$tmp"/FashionMNIST/raw/*.gz "$FM/"
    echo "torchvision:FashionMNIST" > "$FM/SOURCE"
  fi
  rm -rf "$tmp"
fi
say "Fashion-MNIST in $FM (source: $(cat "$FM/SOURCE"))"
say "ok: $("$VENV/bin/python" -c 'import torch, ffcv; print("torch", torch.__version__, "| ffcv", ffcv.__version__)')"
