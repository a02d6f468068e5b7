#!/usr/bin/env bash
# What of llama.cpp.patch can be checked without a GPU (README: "What was
# built and run"). Not part of scripts/test.sh: the CPU build of llama.cpp
# takes minutes.
#
#   bindings/llama.cpp/check-patch.sh          the patch applies (git apply --check, patch --dry-run) to the
#                                              pinned tree; the patched tree's libllama builds on the CPU
#                                              (GGML_CUDA off, -j1) and llama-simple links against it
#   bindings/llama.cpp/check-patch.sh --cuda   also compiles the patch's ggml-cuda files one by one with nvcc
#                                              (sm_90, -DGGML_CUDA_SEERATTN): seerattn.cu, ggml-cuda.cu,
#                                              fattn.cu; cuBLAS headers from the nvidia-cublas wheel (pip download)
#
# Everything goes to target/llama.cpp/ (a git worktree "patched" of the
# pinned tree with the patch applied, its build directory, the headers).
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
src=$(bindings/llama.cpp/fetch.sh)
dir=${SEERATTN_LLAMA_DIR:-$root/target/llama.cpp}
patch_file="$root/bindings/llama.cpp/llama.cpp.patch"

echo "== the patch against the pinned tree ($(git -C "$src" rev-parse --short HEAD))"
git -C "$src" apply --check "$patch_file"
patch -p1 --dry-run -s -d "$src" <"$patch_file"
echo "applies (git apply --check, patch -p1 --dry-run)"

patched="$dir/patched"
if [ -e "$patched" ]; then
    git -C "$src" worktree remove --force "$patched"
fi
git -C "$src" worktree add --detach "$patched" HEAD >/dev/null
git -C "$patched" apply "$patch_file"

echo "== CPU build of the patched llama.cpp (libllama, -j1; log $dir/patched-build-cpu.log)"
build="$dir/patched-build-cpu"
{ cmake -S "$patched" -B "$build" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF \
    -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_COMMON=OFF -DGGML_NATIVE=OFF -DGGML_OPENMP=OFF -DGGML_CCACHE=OFF \
    -DGGML_LLAMAFILE=OFF &&
    nice -n 10 cmake --build "$build" -j "${LLAMA_BUILD_JOBS:-1}" --target llama; } >"$dir/patched-build-cpu.log" 2>&1 ||
    { tail -n 40 "$dir/patched-build-cpu.log"; exit 1; }
echo "libllama built: $(grep -c 'warning:' "$dir/patched-build-cpu.log" || true) compiler warnings"
libs=()
for lib in libllama.a libggml.a libggml-cpu.a libggml-base.a; do
    libs+=("$(find "$build" -name "$lib" | head -n 1)")
done
"${CXX:-c++}" -std=c++17 -O1 -I"$patched/include" -I"$patched/ggml/include" "$patched/examples/simple/simple.cpp" \
    "${libs[@]}" -lpthread -lm -o "$build/llama-simple"
echo "llama-simple linked against it: $build/llama-simple"

if [ "${1:-}" != "--cuda" ]; then
    exit 0
fi
echo "== the patch's ggml-cuda files, compiled one by one (nvcc, sm_90, -DGGML_CUDA_SEERATTN)"
nvcc=$(scripts/setup-cuda.sh)
cuda_inc=$(dirname "$(dirname "$nvcc")")/include
cublas="$dir/cublas-13.0.2.14"
if [ ! -f "$cublas/nvidia/cu13/include/cublas_v2.h" ]; then
    wheel_dir=$(mktemp -d)
    python3 -m pip download --quiet --no-deps --only-binary :all: "nvidia-cublas==13.0.2.14" -d "$wheel_dir"
    mkdir -p "$cublas"
    python3 -m zipfile -e "$wheel_dir"/nvidia_cublas-*.whl "$wheel_dir/x"
    mkdir -p "$cublas/nvidia/cu13"
    cp -r "$wheel_dir/x/nvidia/cu13/include" "$cublas/nvidia/cu13/"
    rm -rf "$wheel_dir"
fi
# The definitions ggml-cuda's CMake gives these files (FlashAttention
# combinations: the default q4_0-q4_0, q8_0-q8_0, f16-f16, bf16-bf16).
types="q4_0 q4_1 q5_0 q5_1 q8_0 bf16 f16"
defs=(-DGGML_CUDA_SEERATTN -DGGML_CUDA_USE_GRAPHS -DGGML_BACKEND_BUILD -DGGML_SCHED_MAX_COPIES=4
    '-DGGML_CUDA_FA_QUANTS="q4_0-q4_0,q8_0-q8_0,f16-f16,bf16-bf16"')
for v in $types; do
    for k in $types; do
        case "$k-$v" in f16-f16 | q4_0-q4_0 | q8_0-q8_0 | bf16-bf16) c=1 ;; *) c=0 ;; esac
        defs+=("-DGGML_CUDA_FA_${k^^}_${v^^}=$c")
    done
done
for f in seerattn ggml-cuda fattn; do
    start=$(date +%s)
    nice -n 10 "$nvcc" -std=c++17 -arch=sm_90 -O2 -c --extended-lambda "${defs[@]}" -I"$patched/ggml/include" \
        -I"$patched/ggml/src" -I"$patched/ggml/src/ggml-cuda" -I"$root/bindings/llama.cpp" -I"$root/include" \
        -I"$cuda_inc" -I"$cublas/nvidia/cu13/include" "$patched/ggml/src/ggml-cuda/$f.cu" -o "$dir/patched-$f.o"
    echo "ggml/src/ggml-cuda/$f.cu compiled ($(($(date +%s) - start)) s)"
done
