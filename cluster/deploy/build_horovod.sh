#!/usr/bin/env bash
# Build Horovod 0.28.1 (PyTorch + gloo, no MPI/TensorFlow/MXNet) once, cache the wheel,
# and install it into the Python given as the argument (default: python3).
#
#   cluster/deploy/build_horovod.sh .venv/bin/python          # CPU: gloo only
#   cluster/deploy/build_horovod.sh --gpu .venv/bin/python    # GPU nodes: also NCCL for GPU tensors
#   cluster/deploy/build_horovod.sh --dry-run [--gpu] PYTHON  # say what it would do, do nothing
#
# Horovod's last release does not build against torch 2.x as published: its CMake files
# ask for C++14 and torch's headers need C++17. This downloads the sdist, raises the
# standard to 17 in CMakeLists.txt and horovod/torch/CMakeLists.txt, and builds it
# against the torch already installed (--no-build-isolation), about 2 minutes on 2 cores.
# The wheel is cached per torch and Python version and per variant (gpu_none, gpu_NCCL)
# under $TRAINCTL_WHEEL_CACHE (default ~/.cache/trainctl/wheels), so later runs only install it.
# --gpu (the same as exporting HOROVOD_GPU_OPERATIONS=NCCL) needs the CUDA toolkit (nvcc) and
# NCCL: HOROVOD_NCCL_HOME, else the nvidia-nccl wheel that a CUDA build of torch brings.
# A CPU-only Horovod already installed is replaced by the NCCL build when --gpu asks for it.
set -euo pipefail

gpu_ops=${HOROVOD_GPU_OPERATIONS:-}
dry_run=0
args=()
for arg in "$@"; do
    case "$arg" in
        --gpu) gpu_ops=NCCL ;;
        --dry-run) dry_run=1 ;;
        -*) echo "build_horovod.sh: unknown option $arg (known: --gpu, --dry-run)" >&2; exit 2 ;;
        *) args+=("$arg") ;;
    esac
done
PY=${args[0]:-python3}
VERSION=0.28.1
tag=$("$PY" -c 'import sys, torch; print(f"torch{torch.__version__}-py{sys.version_info[0]}{sys.version_info[1]}")')
cache="${TRAINCTL_WHEEL_CACHE:-$HOME/.cache/trainctl/wheels}/horovod-$VERSION-$tag-gpu_${gpu_ops:-none}"

# what is installed now: none | cpu | nccl
installed=$("$PY" -c 'import horovod.torch as hvd; print("nccl" if hvd.nccl_built() else "cpu")' 2>/dev/null || echo none)
wheel=$(ls "$cache"/horovod-"$VERSION"-*.whl 2>/dev/null | head -n1 || true)
if [ "$installed" = nccl ] || { [ "$installed" = cpu ] && [ -z "$gpu_ops" ]; }; then
    action=nothing
elif [ -n "$wheel" ]; then
    action=install
else
    action=build
fi
if [ "$dry_run" = 1 ]; then
    echo "variant: gpu_${gpu_ops:-none}"
    echo "cache: $cache"
    echo "installed: $installed"
    echo "action: $action"
    exit 0
fi
if [ "$action" = nothing ]; then
    echo "horovod ($installed) already installed for $("$PY" -c 'import sys; print(sys.executable)')"
    exit 0
fi

if [ "$action" = build ]; then
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    "$PY" -m pip install -q "cmake>=3.13" packaging wheel setuptools
    "$PY" -m pip download -q --no-deps --no-binary :all: "horovod==$VERSION" -d "$work"
    tar -xzf "$work/horovod-$VERSION.tar.gz" -C "$work"
    src="$work/horovod-$VERSION"
    sed -i 's/set(CMAKE_CXX_STANDARD 14)/set(CMAKE_CXX_STANDARD 17)/' \
        "$src/CMakeLists.txt" "$src/horovod/torch/CMakeLists.txt"
    grep -q 'CMAKE_CXX_STANDARD 17' "$src/horovod/torch/CMakeLists.txt"
    gpu_env=()
    if [ -n "$gpu_ops" ]; then
        gpu_env=(HOROVOD_GPU_OPERATIONS="$gpu_ops")
        if [ -z "${HOROVOD_NCCL_HOME:-}" ]; then
            # the nvidia-nccl wheel ships libnccl.so.2 only; CMake's find_library wants libnccl.so
            nccl=$("$PY" -c 'import nvidia.nccl as n; print(list(n.__path__)[0])' 2>/dev/null || true)
            if [ -n "$nccl" ]; then
                mkdir -p "$work/nccl/lib"
                ln -s "$nccl/include" "$work/nccl/include"
                ln -s "$nccl/lib/libnccl.so.2" "$work/nccl/lib/libnccl.so"
                gpu_env+=(HOROVOD_NCCL_HOME="$work/nccl" HOROVOD_NCCL_LINK=SHARED)
            fi
        fi
    fi
    mkdir -p "$cache"
    # the cmake that pip installed sits beside $PY; CMake 4 needs the policy floor for gloo's old files
    env PATH="$(dirname "$PY"):$PATH" CMAKE_POLICY_VERSION_MINIMUM=3.5 \
        HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITHOUT_MPI=1 \
        HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1 \
        MAKEFLAGS="-j$(nproc)" "${gpu_env[@]}" \
        "$PY" -m pip wheel --no-build-isolation --no-deps -w "$cache" "$src"
    wheel=$(ls "$cache"/horovod-"$VERSION"-*.whl | head -n1)
fi
replace=()  # the NCCL wheel has the same version as the CPU build it replaces
[ "$installed" = none ] || replace=(--force-reinstall --no-deps)
"$PY" -m pip install -q "${replace[@]}" "$wheel"
"$PY" -c "import horovod.torch as hvd; assert hvd.gloo_built(), 'horovod was built without gloo'"
if [ -n "$gpu_ops" ]; then
    "$PY" -c "import horovod.torch as hvd; assert hvd.nccl_built(), 'horovod was built without NCCL: is CUDA (nvcc) and NCCL (HOROVOD_NCCL_HOME) there?'"
fi
echo "installed $wheel"
