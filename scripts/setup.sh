#!/usr/bin/env bash
# Make (or update) the virtual environment: pinned torch/torchvision, the toolkit and its
# test tools, then Pillow-SIMD built with AVX2 where it builds (Pillow otherwise).
# Usage: scripts/setup.sh [VENV_DIR]   (default .venv). Safe to rerun: it only adds what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv}
PYTHON=${PYTHON:-python3}
quiet() { grep -v -e "is ignored: it is neither" -e "^WARNING: Skipping" -e "^$" || true; }  # this site's pip mirror chatter

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP="$VENV/bin/pip"
# torch 2.14.1 / torchvision 0.29.1 are pinned: they install from the local wheel mirror here;
# any other version downloads several GB.
"$PIP" install -q torch==2.14.1 torchvision==0.29.1 -e ".[test]" 2>&1 | quiet

# Pillow-SIMD last (measured here: 1.5x faster decode+crop+resize than Pillow). Any install
# that resolves torchvision's `pillow` requirement puts Pillow back over Pillow-SIMD's files,
# so every run ends by removing both and installing the AVX2 wheel, built once (~50 s) and
# kept in $VENV/wheels. PIL.__version__ ends in .postN when Pillow-SIMD is active.
is_simd() { "$VENV/bin/python" -c "import PIL.Image, sys; sys.exit('.post' not in PIL.__version__)" 2>/dev/null; }
if ! is_simd; then
  WHEELS="$VENV/wheels"
  if grep -q avx2 /proc/cpuinfo 2>/dev/null; then
    if ! ls "$WHEELS"/pillow_simd-*.whl >/dev/null 2>&1; then
      CC="cc -mavx2" "$PIP" wheel -q --no-deps --no-cache-dir pillow-simd -w "$WHEELS" 2>&1 | quiet || true
    fi
    "$PIP" uninstall -y -q pillow pillow-simd 2>&1 | quiet
    "$PIP" install -q --no-deps "$WHEELS"/pillow_simd-*.whl 2>&1 | quiet || true
  fi
  if ! is_simd; then
    echo "setup: Pillow-SIMD is not available here (no AVX2 or the build failed); using Pillow" >&2
    "$PIP" uninstall -y -q pillow-simd 2>&1 | quiet
    "$PIP" install -q --force-reinstall pillow 2>&1 | quiet
  fi
fi
# The loader's region JPEG decoder (train/jpeg_region.c, ~1 s to build; needs jpeglib.h from
# libjpeg-turbo, which the Pillow-SIMD build needs too). Without it the loader uses Pillow.
[ train/_jpeg_region.so -nt train/jpeg_region.c ] || "$VENV/bin/python" -m train.jpeg_region \
  || echo "setup: the region JPEG decoder did not build; the loader uses Pillow (slower)" >&2
# The strict JPEG check (prep/jpegcheck.c, libjpeg-turbo): a truncated JPEG that ends in EOI
# decodes "fine" in Pillow; this check catches it (--check full, prep shard, verify --deep).
[ prep/_jpegcheck.so -nt prep/jpegcheck.c ] || "$VENV/bin/python" -m prep.jpeg \
  || echo "setup: the strict JPEG check did not build; truncated JPEGs ending in EOI pass" >&2
# prep shard's pass-through writer in C (shards/tarpack.c, < 1 s, a C compiler only).
[ shards/_tarpack.so -nt shards/tarpack.c ] || "$VENV/bin/python" -m shards.tarpack \
  || echo "setup: the C shard writer did not build; prep shard uses Python (slower)" >&2
# The C listing of plain folders (prep/fastdir.c, < 1 s, a C compiler only).
[ prep/_fastdir.so -nt prep/fastdir.c ] || "$VENV/bin/python" -m prep.fastdir \
  || echo "setup: the C folder listing did not build; prep imagenet lists in Python (slower)" >&2
"$VENV/bin/python" - <<'PY'
import PIL, torch, torchvision
from prep import fastdir, jpeg
from shards import tarpack
from train import jpeg_region
flavour = "Pillow-SIMD" if ".post" in PIL.__version__ else "Pillow"
region = "built" if jpeg_region.available() else "NOT built (Pillow fallback)"
writer = "built" if tarpack.available() else "NOT built (Python writer)"
check = "built" if jpeg.available() else "NOT built (truncated JPEGs ending in EOI pass)"
listing = "built" if fastdir.available() else "NOT built (Python listing)"
print(f"setup: torch {torch.__version__}, torchvision {torchvision.__version__}, "
      f"{flavour} {PIL.__version__}, region JPEG decoder {region}, C shard writer {writer}, "
      f"strict JPEG check {check}, C folder listing {listing}")
PY
touch "$VENV/.setup-done"
