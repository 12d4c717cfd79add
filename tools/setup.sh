#!/usr/bin/env bash
# Idempotent set-up used by both README commands (`make demo`, `make test`).
#   - Debian packages FFCV compiles against (libopencv-dev, libturbojpeg0-dev), when root
#   - a virtual environment at .venv with the pinned requirements.txt
#   - the Fashion-MNIST dataset (Debian's dataset-fashion-mnist when root, else
#     $SIMCLR_DATA / --data DIR, else a torchvision download)
# Re-running when everything is present takes a few seconds.
set -euo pipefail
cd "$(dirname "$0")/.."

DATA_DIR="${SIMCLR_DATA:-}"
while [ $# -gt 0 ]; do
  case "$1" in
    --data) DATA_DIR="$2"; shift 2 ;;
    --data=*) DATA_DIR="${1#--data=}"; shift ;;
    -h|--help) sed -n '2,8p' "$0"; exit 0 ;;
    *) echo "setup.sh: unknown option '$1' (use --data DIR)" >&2; exit 2 ;;
  esac
done

PY="${PYTHON:-python3}"
DEB_FMNIST=/usr/share/datasets/fashion-mnist
FMNIST_FILES="train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz t10k-images-idx3-ubyte.gz t10k-labels-idx1-ubyte.gz"
STAMP=.venv/.setup-stamp
want_stamp="$(cat requirements.txt pyproject.toml | sha256sum | cut -d' ' -f1)"

# pip, minus the per-package warnings about index locations this machine may not have.
pip_install() {
  .venv/bin/python -m pip install -q "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}

is_root() { [ "$(id -u)" = 0 ]; }
has_fmnist() { for f in $FMNIST_FILES; do [ -f "$1/$f" ] || return 1; done; }
if [ -n "$DATA_DIR" ] && ! has_fmnist "$DATA_DIR"; then
  echo "[setup] --data/SIMCLR_DATA '$DATA_DIR' lacks the Fashion-MNIST files ($FMNIST_FILES)" >&2; exit 1
fi

# 1. Debian packages: the libraries FFCV compiles against and, when no data was given or found,
#    dataset-fashion-mnist. apt runs in the background while pip installs everything but FFCV,
#    which builds once both are done: on a bare machine set-up takes pip's time, not apt's + pip's.
need_libs=0
if ! pkg-config --exists opencv4 2>/dev/null || [ ! -e /usr/include/turbojpeg.h ]; then
  need_libs=1
  if ! is_root; then
    echo "[setup] FFCV needs libopencv-dev and libturbojpeg0-dev: run 'sudo apt-get install libopencv-dev libturbojpeg0-dev' and re-run" >&2
    exit 1
  fi
fi
need_fmnist=0
if [ -z "$DATA_DIR" ] && ! has_fmnist "$DEB_FMNIST" && is_root; then need_fmnist=1; fi
APT_LOG=$(mktemp)
apt_pid=
if [ $need_libs = 1 ] || [ $need_fmnist = 1 ]; then
  [ $need_libs = 1 ] && echo "[setup] installing libopencv-dev libturbojpeg0-dev (FFCV build dependencies) in the background"
  (
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    if [ $need_libs = 1 ]; then
      apt-get install -y -qq --no-install-recommends libopencv-dev libturbojpeg0-dev pkg-config
    fi
    # optional: without it the data comes from a torchvision download (step 3)
    if [ $need_fmnist = 1 ]; then
      apt-get install -y -qq --no-install-recommends dataset-fashion-mnist || true
    fi
  ) >"$APT_LOG" 2>&1 &
  apt_pid=$!
fi
apt_done() {
  [ -n "$apt_pid" ] || return 0
  if ! wait "$apt_pid"; then
    cat "$APT_LOG" >&2
    echo "[setup] apt-get failed (above): install libopencv-dev and libturbojpeg0-dev by hand and re-run" >&2
    exit 1
  fi
  apt_pid=
}

# 2. Virtual environment with the pinned packages.
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$want_stamp" ]; then
  [ -x .venv/bin/python ] || "$PY" -m venv .venv
  echo "[setup] installing pinned packages into .venv (first run takes a few minutes)"
  pip_install --upgrade pip setuptools wheel
  # numpy and pkgconfig first: ffcv's setup.py imports them at build time.
  pip_install "$(grep "^numpy==" requirements.txt)" pkgconfig
  # everything but FFCV while apt may still be running, then the whole list (FFCV builds)
  pip_install -r <(grep -v "^ffcv==" requirements.txt)
  apt_done
  pip_install --no-build-isolation -r requirements.txt
  echo "$want_stamp" > "$STAMP"
fi
apt_done
rm -f "$APT_LOG"

# 3. Fashion-MNIST: --data (checked above), Debian's, else a download.
if [ -n "$DATA_DIR" ]; then
  true
elif has_fmnist "$DEB_FMNIST"; then
  DATA_DIR=$DEB_FMNIST
else
  DATA_DIR=data/raw/fashion-mnist
  if ! has_fmnist "$DATA_DIR"; then
    echo "[setup] downloading Fashion-MNIST through torchvision into $DATA_DIR"
    .venv/bin/python - "$DATA_DIR" <<'PYEOF' || { echo "[setup] no Fashion-MNIST: install Debian's dataset-fashion-mnist (as root), or pass --data DIR (or SIMCLR_DATA=DIR) holding the four *-ubyte.gz files" >&2; exit 1; }
import os, shutil, sys, tempfile
from torchvision.datasets import FashionMNIST
dst = sys.argv[1]
with tempfile.TemporaryDirectory() as tmp:
    FashionMNIST(tmp, download=True)
    raw = os.path.join(tmp, "FashionMNIST", "raw")
    os.makedirs(dst, exist_ok=True)
    for f in os.listdir(raw):
        if f.endswith(".gz"):
            shutil.copy(os.path.join(raw, f), dst)
PYEOF
  fi
fi
mkdir -p data
echo "$DATA_DIR" > data/.fashion-mnist-path
echo "[setup] ready: .venv ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)')), Fashion-MNIST at $DATA_DIR"
