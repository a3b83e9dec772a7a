#!/usr/bin/env bash
# Build Horovod 0.28.1 (PyTorch + gloo, no MPI/TensorFlow/MXNet) once, cache the wheel,
# and install it into the Python given as $1 (default: python3).
#
#   cluster/deploy/build_horovod.sh .venv/bin/python
#
# Horovod's last release does not build against torch 2.x as published: its CMake files
# ask for C++14 and torch's headers need C++17. This downloads the sdist, raises the
# standard to 17 in CMakeLists.txt and horovod/torch/CMakeLists.txt, and builds it
# against the torch already installed (--no-build-isolation), about 2 minutes on 2 cores.
# The wheel is cached per torch and Python version under $TRAINCTL_WHEEL_CACHE
# (default ~/.cache/trainctl/wheels), so later runs only install it.
# GPU users: export HOROVOD_GPU_OPERATIONS=NCCL (and have CUDA + NCCL) before running it.
set -euo pipefail

PY=${1:-python3}
VERSION=0.28.1
tag=$("$PY" -c 'import sys, torch; print(f"torch{torch.__version__}-py{sys.version_info[0]}{sys.version_info[1]}")')
gpu_ops=${HOROVOD_GPU_OPERATIONS:-none}
cache="${TRAINCTL_WHEEL_CACHE:-$HOME/.cache/trainctl/wheels}/horovod-$VERSION-$tag-gpu_${gpu_ops}"

if "$PY" -c "import horovod.torch" 2>/dev/null; then
    echo "horovod already installed for $("$PY" -c 'import sys; print(sys.executable)')"
    exit 0
fi

wheel=$(ls "$cache"/horovod-"$VERSION"-*.whl 2>/dev/null | head -n1 || true)
if [ -z "$wheel" ]; then
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    "$PY" -m pip install -q "cmake>=3.13" packaging wheel setuptools
    "$PY" -m pip download -q --no-deps --no-binary :all: "horovod==$VERSION" -d "$work"
    tar -xzf "$work/horovod-$VERSION.tar.gz" -C "$work"
    src="$work/horovod-$VERSION"
    sed -i 's/set(CMAKE_CXX_STANDARD 14)/set(CMAKE_CXX_STANDARD 17)/' \
        "$src/CMakeLists.txt" "$src/horovod/torch/CMakeLists.txt"
    grep -q 'CMAKE_CXX_STANDARD 17' "$src/horovod/torch/CMakeLists.txt"
    mkdir -p "$cache"
    # the cmake that pip installed sits beside $PY; CMake 4 needs the policy floor for gloo's old files
    PATH="$(dirname "$PY"):$PATH" CMAKE_POLICY_VERSION_MINIMUM=3.5 \
    HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITHOUT_MPI=1 \
    HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1 \
    MAKEFLAGS="-j$(nproc)" \
        "$PY" -m pip wheel --no-build-isolation --no-deps -w "$cache" "$src"
    wheel=$(ls "$cache"/horovod-"$VERSION"-*.whl | head -n1)
fi
"$PY" -m pip install -q "$wheel"
"$PY" -c "import horovod.torch as hvd; assert hvd.gloo_built(), 'horovod was built without gloo'"
echo "installed $wheel"
