#!/usr/bin/env bash
# Pack the wheels a GPU machine without internet needs for bench/gpu_check.sh, in pieces that fit one
# `run` call each (<= 64 MiB carried per call, working tree included).
#
#   bash bench/gpu_wheels.sh     # -> build/gpu_wheels/{essentials,dali}.tar.partNN + MANIFEST
#   CHUNK_MB=48 bash bench/gpu_wheels.sh
#   SKIP_DALI=1 bash bench/gpu_wheels.sh     # essentials only (quick check of this script)
#
# The GPU machine has PyTorch (and its CUDA libraries) but no DeepSpeed, DALI, webdataset, timm or pytest.
# The versions are those of this venv (`pip freeze`), so the GPU machine runs what was tested here;
# torch, torchvision, triton and the CUDA runtime wheels that come with torch are left out.
#   essentials.tar.partNN  everything but DALI (DeepSpeed built into a pure-Python wheel: its ops JIT-compile),
#                          plus a few real photos (scikit-image / scikit-learn samples) for the JPEG shards
#   dali.tar.partNN        nvidia-dali-cuda120 + nvidia-nvimgcodec-cu12 + nvidia-libnvcomp-cu12, split in CHUNK_MB
#   MANIFEST               sha256 of every piece and of both tars, read by gpu_check.sh before it installs
# Wheels are built for this machine's Python (cp311 here); the GPU machine needs the same minor version
# (gpu_check.sh checks and falls back to measuring what it can).
set -euo pipefail
cd "$(dirname "$0")/.." || exit 1
PY=${PY:-.venv/bin/python}
CHUNK_MB=${CHUNK_MB:-56}
DEST=build/gpu_wheels
WORK=build/gpu_wheels.work
rm -rf "$WORK" && mkdir -p "$WORK/essentials/wheels" "$WORK/essentials/photos" "$WORK/dali/wheels" "$DEST"
rm -f "$DEST"/*.tar.part* "$DEST"/MANIFEST

DALI_PKGS='^(nvidia-dali-cuda120|nvidia-nvimgcodec-cu12|nvidia-libnvcomp-cu12)=='
# Comes with torch on the GPU machine (or is this project itself).
# torch's own dependencies are on the GPU machine with it.
SKIP='^(torch|torchvision|triton|nvidia-|cuda-|pvt-dist|sympy|mpmath|networkx|filelock|fsspec|Jinja2|MarkupSafe|typing_extensions|-e )'
# Linting only; scikit-image / scikit-learn stay: tests/conftest.py imports them.
DEV='^(ruff)=='

"$PY" -m pip freeze --exclude-editable > "$WORK/freeze.txt"
grep -E "$DALI_PKGS" "$WORK/freeze.txt" > "$WORK/dali/requirements.txt"
grep -vE "$DALI_PKGS" "$WORK/freeze.txt" | grep -vE "$SKIP" | grep -vE "$DEV" | grep -v '^deepspeed==' \
  > "$WORK/essentials.txt"
grep '^deepspeed==' "$WORK/freeze.txt" > "$WORK/deepspeed.txt"

# Exact versions, no dependency resolution: the freeze is already a consistent set.
"$PY" -m pip download --quiet --no-deps --only-binary=:all: -d "$WORK/essentials/wheels" -r "$WORK/essentials.txt"
# DeepSpeed ships as an sdist; building it needs torch, so it is built here without isolation.
"$PY" -m pip wheel --quiet --no-deps --no-build-isolation -w "$WORK/essentials/wheels" -r "$WORK/deepspeed.txt"
if [ "${SKIP_DALI:-0}" = 1 ]; then  # for a quick check of this script; gpu_check.sh then skips the data phase
  : > "$WORK/dali/requirements.txt"
else
  "$PY" -m pip download --quiet --no-deps --only-binary=:all: -d "$WORK/dali/wheels" -r "$WORK/dali/requirements.txt"
fi
cat "$WORK/essentials.txt" "$WORK/deepspeed.txt" > "$WORK/essentials/requirements.txt"

# Real photos for JPEG shards of ImageNet-like size (scikit-image / scikit-learn ship them).
"$PY" - "$WORK/essentials/photos" <<'EOF'
import shutil, sys
from pathlib import Path
import skimage, sklearn.datasets
sk = Path(skimage.__file__).parent / "data"
names = ["astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png", "hubble_deep_field.jpg"]
srcs = [sk / n for n in names] + [Path(sklearn.datasets.__file__).parent / "images" / n for n in ("china.jpg", "flower.jpg")]
for s in srcs:
    shutil.copy(s, sys.argv[1])
EOF

for name in essentials dali; do
  tar -C "$WORK/$name" -cf "$WORK/$name.tar" .
  split -b "${CHUNK_MB}M" -d -a 2 "$WORK/$name.tar" "$DEST/$name.tar.part"
  (cd "$WORK" && sha256sum "$name.tar") >> "$DEST/MANIFEST"
done
(cd "$DEST" && sha256sum ./*.tar.part*) >> "$DEST/MANIFEST"
rm -rf "$WORK"
echo "pieces in $DEST: carry MANIFEST with the first piece; one piece per call (docs/performance.md):"
ls -l "$DEST"
