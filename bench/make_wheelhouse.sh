#!/usr/bin/env bash
# Wheels for bench/gpu_check.sh on a GPU machine without network: what the check needs beyond
# torch, torchvision and the packages such an image already holds (numpy, pyyaml, pillow,
# scikit-learn, pytest), for that machine's Python and platform.
#
#   bash bench/make_wheelhouse.sh [PYTHON_VERSION]        (or: make wheels; default 3.12)
#
# Run it where pip reaches PyPI; it fills .whl/ (git-ignored, a few MB) with the wheels and a
# requirements.txt, which gpu_check.sh installs with pip --no-index. MLflow and DeepSpeed are left
# out: the check runs without tracking and with the ddp engine.
set -euo pipefail

PYTHON_VERSION=${1:-3.12}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
DEST=${WHEELHOUSE:-$ROOT/.whl}
PYTHON=${PYTHON:-python3}
mkdir -p "$DEST"

platform=(--only-binary=:all: --python-version "$PYTHON_VERSION" --implementation cp
          --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
# pydantic with its own dependencies (pydantic-core must match pydantic exactly); webdataset
# without its (numpy, pyyaml are on the image) but with braceexpand, which the loader imports.
"$PYTHON" -m pip download -q --disable-pip-version-check "${platform[@]}" -d "$DEST" 'pydantic>=2.5,<3'
"$PYTHON" -m pip download -q --disable-pip-version-check "${platform[@]}" --no-deps -d "$DEST" 'webdataset>=0.2.100' braceexpand
printf '%s\n' 'pydantic>=2.5,<3' 'webdataset>=0.2.100' braceexpand > "$DEST/requirements.txt"
ls -l "$DEST"
du -sh "$DEST"
