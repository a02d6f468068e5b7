#!/usr/bin/env bash
# What of llama.cpp.patch can be checked without a GPU (README: "What was
# built and run"). Not part of scripts/test.sh: the CPU build of llama.cpp
# takes minutes.
#
#   bindings/llama.cpp/check-patch.sh          the patch applies (git apply --check, patch --dry-run) to the
#                                              pinned tree; the patched tree's libllama builds on the CPU
#                                              (GGML_CUDA off, -j1) and llama-simple links against it
#   bindings/llama.cpp/check-patch.sh --cuda   also configures the patched tree with GGML_CUDA=ON and
#                                              GGML_CUDA_SEERATTN=ON (seerattn installed into target/, the
#                                              nvidia-cublas 13.0 wheel fetched with pip) and builds, with
#                                              ggml-cuda's own flags, the objects the patch touches:
#                                              seerattn.cu, the shim, fattn.cu, ggml-cuda.cu (sm_90); not
#                                              the rest of ggml-cuda (hours on 2 cores), no link
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
git -C "$src" worktree add -q --detach "$patched" HEAD
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
echo "== the patch's ggml-cuda part: configured with GGML_CUDA_SEERATTN=ON, its objects built (sm_90)"
# A CUDA toolkit tree CMake's FindCUDAToolkit accepts, from the project's
# pinned nvcc wheels (.cuda/) and the nvidia-cublas wheel of the same CUDA
# release (pip download; headers and libraries): nvcc copied so that its
# nvcc.profile sees this tree, lib64 -> lib.
nvcc=$(scripts/setup-cuda.sh)
cuda=$(dirname "$(dirname "$nvcc")")
cublas="$dir/cublas-13.0.2.14/nvidia/cu13"
if [ ! -f "$cublas/lib/libcublas.so.13" ]; then
    wheel_dir=$(mktemp -d)
    python3 -m pip download --quiet --no-deps --only-binary :all: "nvidia-cublas==13.0.2.14" -d "$wheel_dir"
    rm -rf "$dir/cublas-13.0.2.14"
    python3 -m zipfile -e "$wheel_dir"/nvidia_cublas-*.whl "$dir/cublas-13.0.2.14"
    rm -rf "$wheel_dir"
fi
toolkit="$dir/cuda-toolkit-view"
rm -rf "$toolkit"
mkdir -p "$toolkit/include" "$toolkit/lib"
cp -r "$cuda/bin" "$toolkit/bin"
ln -s "$cuda/nvvm" "$toolkit/nvvm"
ln -s lib "$toolkit/lib64"
for f in "$cuda"/include/* "$cublas"/include/*; do ln -sf "$f" "$toolkit/include/"; done
for f in "$cuda"/lib/* "$cublas"/lib/*; do ln -sf "$f" "$toolkit/lib/"; done
for l in cudart cublas cublasLt; do ln -sf "lib$l.so.13" "$toolkit/lib/lib$l.so"; done
# seerattn installed where find_package(seerattn) looks (the debug build).
scripts/install.sh --debug --prefix "$dir/seerattn-prefix" >/dev/null
cbuild="$dir/patched-build-cuda"
rm -rf "$cbuild"
# GGML_CUDA_NO_VMM: the wheels have no libcuda stub to link the driver API against.
cmake -S "$patched" -B "$cbuild" -DGGML_CUDA=ON -DGGML_CUDA_SEERATTN=ON -DSEERATTN_SHIM_DIR="$root/bindings/llama.cpp" \
    -DCMAKE_PREFIX_PATH="$dir/seerattn-prefix" -DCUDAToolkit_ROOT="$toolkit" -DCMAKE_CUDA_COMPILER="$toolkit/bin/nvcc" \
    -DCMAKE_CUDA_ARCHITECTURES=90 -DGGML_CUDA_NO_VMM=ON -DGGML_CUDA_NCCL=OFF -DGGML_CCACHE=OFF -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_OPENSSL=OFF \
    -DLLAMA_BUILD_COMMON=OFF >"$dir/patched-cmake-cuda.log" 2>&1 || { tail -n 40 "$dir/patched-cmake-cuda.log"; exit 1; }
echo "configured: $(grep -c 'seerattn' "$cbuild/ggml/src/ggml-cuda/CMakeFiles/ggml-cuda.dir/build.make") lines of ggml-cuda's build name seerattn"
shim_obj="${root#/}/bindings/llama.cpp/seerattn_ggml.o"
for obj in seerattn.o "$shim_obj" fattn.o ggml-cuda.o; do
    start=$(date +%s)
    nice -n 10 make -s -C "$cbuild/ggml/src/ggml-cuda" "$obj" >"$dir/patched-obj.log" 2>&1 || { cat "$dir/patched-obj.log"; exit 1; }
    warnings=$(grep -c 'warning' "$dir/patched-obj.log" || true)
    echo "ggml-cuda: $obj built with ggml-cuda's flags ($(($(date +%s) - start)) s, $warnings warnings)"
done
