#!/usr/bin/env bash
# The project's test command (README "Run the tests"; .ci/run calls it).
#
# 1. Rust unit and integration tests: CPU reference, checkpoint readers,
#    upstream conformance, the C ABI from Rust, the header being current.
# 2. The install (scripts/install.sh) into a temporary prefix, and the C
#    programs in examples-c/ built against the installed tree with -Wall
#    -Wextra -Werror, once through pkg-config and once through CMake's
#    find_package (shared and static), then run: the bad-input table through
#    the C API, the end-to-end example, and gate training (distill.c); then
#    again under ASan/UBSan/LSan and valgrind (scripts/asan.sh).
#    The llama.cpp shim (bindings/llama.cpp) against ggml_flash_attn_ext,
#    with ggml's CPU library built from the pinned llama.cpp source.
# 3. The Python binding (bindings/python): pip-installed from a copy of its
#    source, its tests run with python3 -m unittest against the installed
#    library (the CPU tests; the GPU tests report SKIPPED here and run on
#    the GPU machine through scripts/gpu-test.sh).
# 4. A fuzz smoke where cargo-fuzz and nightly exist (the committed seeds
#    are replayed on stable by cargo test in any case).
#
# The CUDA kernels are compiled for real: scripts/setup-cuda.sh provides a
# pinned nvcc (installed from PyPI into .cuda/ when none is found) and the
# build fails if any kernel does not compile. No GPU is needed: the GPU tests
# are #[ignore]d here and run on a GPU machine through scripts/gpu-test.sh
# (see README); this script runs none of them and claims none.
#
# Needs cargo, a C compiler with libasan, a C++ compiler (ggml), valgrind,
# pkg-config, cmake, curl, and python3 with pip (for nvcc on the first run,
# and to install the Python binding, for which it fetches setuptools; the
# first run also downloads the pinned llama.cpp source, 77 MB).
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== nvcc"
NVCC=$(scripts/setup-cuda.sh)
export NVCC
echo "$NVCC"
# tests/cuda.rs fails if the library was built without kernels.
export SEERATTN_REQUIRE_KERNELS=1

mkdir -p target
echo "== cargo test"
cargo test --all-targets 2>&1 | tee target/cargo-test.log | grep -E '^(test result|running|error|warning: unused)|FAILED|panicked' || true
if ! grep -q '^test result' target/cargo-test.log || grep -qE '^test result: FAILED|^error' target/cargo-test.log; then
    echo "cargo test failed:"; tail -n 60 target/cargo-test.log; exit 1
fi

# The C programs are built against an installed tree, as a C or C++ consumer
# would build them: the debug build cargo test just made, installed into a
# temporary prefix (nothing compiles; a release install would compile the
# library and its kernels again for minutes).
echo "== install (scripts/install.sh --debug) into a temporary prefix"
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
prefix="$scratch/prefix"
scripts/install.sh --debug --prefix "$prefix"
# The soname is the C ABI version of the header; the file name, the crate
# version (tests/header.rs ties the header to both).
abi=$(sed -n 's/^#define SEER_ABI_VERSION \([0-9]*\)$/\1/p' include/seerattn.h)
version=$(sed -n 's/^#define SEER_VERSION_STRING "\(.*\)"$/\1/p' include/seerattn.h)
soname="libseerattn.so.$abi"
got=$(readelf -d "$prefix/lib/libseerattn.so.$version" | sed -n 's/.*(SONAME).*\[\(.*\)\]/\1/p')
[ "$got" = "$soname" ] || { echo "installed library's soname is '$got', expected $soname"; exit 1; }
echo "lib/libseerattn.so.$version: SONAME $got"
# A program must load the installed library through its soname, never the
# one in target/.
loads_installed() {
    local got
    got=$(ldd "$1" | awk '/libseerattn/ {print $1, $3}')
    [ "$got" = "$soname $prefix/lib/$soname" ] || { echo "$1 loads '$got', not $prefix/lib/$soname"; exit 1; }
}
CC=${CC:-cc}
cflags=(-std=c11 -Wall -Wextra -Werror -pedantic -O1)
gate=tests/data/upstream/gqa4_s1000_gates

echo "== C programs via pkg-config --cflags --libs seerattn (cc ${cflags[*]})"
out=target/c
mkdir -p "$out"
export PKG_CONFIG_PATH="$prefix/lib/pkgconfig"
read -ra seerattn_flags < <(pkg-config --cflags --libs seerattn)
for prog in api_errors prefill distill; do
    "$CC" "${cflags[@]}" "examples-c/$prog.c" "${seerattn_flags[@]}" -lm -Wl,-rpath,"$prefix/lib" -o "$out/$prog"
    loads_installed "$out/$prog"
done
# The CUDA example needs a GPU to run (scripts/gpu-test.sh runs it there);
# here it is compiled against the CUDA runtime headers of the same toolkit,
# so that an API change that breaks it fails CI.
cuda_root=$(dirname "$(dirname "$NVCC")")
cudart_dir=$(dirname "$(ls "$cuda_root"/lib/libcudart_static.a "$cuda_root"/lib64/libcudart_static.a 2>/dev/null | head -n 1)")
"$CC" "${cflags[@]}" -I"$cuda_root/include" examples-c/cuda_prefill.c "${seerattn_flags[@]}" \
    -L"$cudart_dir" -l:libcudart_static.a -ldl -lpthread -lrt -lm -Wl,-rpath,"$prefix/lib" -o "$out/cuda_prefill"
echo "examples-c/cuda_prefill.c compiled (it runs on the GPU machine: scripts/gpu-test.sh run)"

# The llama.cpp shim (bindings/llama.cpp) against ggml itself: ggml's CPU
# library built from the pinned llama.cpp source (fetch.sh downloads and
# builds it once into target/llama.cpp/; later runs reuse both), the test
# program built with it and the installed seerattn, run on the CPU path;
# its CUDA build compiled (it runs on the GPU machine: scripts/gpu-test.sh run).
echo "== llama.cpp shim: ggml_flash_attn_ext against the shim (bindings/llama.cpp/test_shim.c)"
ggml_prefix=$(bindings/llama.cpp/fetch.sh --ggml)
ggml_libs=("$ggml_prefix/lib/libggml.a" "$ggml_prefix/lib/libggml-cpu.a" "$ggml_prefix/lib/libggml-base.a" -lstdc++ -lm -lpthread)
shim=(-Ibindings/llama.cpp -I"$ggml_prefix/include" bindings/llama.cpp/test_shim.c bindings/llama.cpp/seerattn_ggml.c)
"$CC" "${cflags[@]}" "${shim[@]}" "${seerattn_flags[@]}" "${ggml_libs[@]}" -Wl,-rpath,"$prefix/lib" -o "$out/test_shim"
loads_installed "$out/test_shim"
"$CC" "${cflags[@]}" -DSEER_GGML_TEST_CUDA -I"$cuda_root/include" "${shim[@]}" "${seerattn_flags[@]}" "${ggml_libs[@]}" \
    -L"$cudart_dir" -l:libcudart_static.a -ldl -lrt -Wl,-rpath,"$prefix/lib" -o "$out/test_shim_cuda"
"$out/test_shim" "$gate" >target/test-shim.log 2>&1 || { cat target/test-shim.log; echo "test_shim failed"; exit 1; }
grep -E '^(FAIL|[0-9]+ passed)' target/test-shim.log
"$out/prefill" "$gate" 1
"$out/api_errors" "$gate" "$scratch/pkg-config"
"$out/distill" "$scratch/pkg-config-distill-gate" | tail -n 2
echo "pkg-config build: prefill, api_errors and distill passed, loading $prefix/lib/$soname"

echo "== C programs via CMake find_package(seerattn) (examples-c/CMakeLists.txt)"
cmake -S examples-c -B "$scratch/cmake" -DCMAKE_PREFIX_PATH="$prefix" >"$scratch/cmake.log" 2>&1 &&
    cmake --build "$scratch/cmake" >>"$scratch/cmake.log" 2>&1 ||
    { echo "CMake build failed:"; cat "$scratch/cmake.log"; exit 1; }
for prog in api_errors prefill distill; do loads_installed "$scratch/cmake/$prog"; done
# (awk, not grep -q: with pipefail, a grep that stops reading fails readelf.)
if readelf -d "$scratch/cmake/prefill_static" | awk '/NEEDED.*libseerattn/ {n++} END {exit n == 0}'; then
    echo "prefill_static needs libseerattn.so: seerattn::seerattn_static did not link libseerattn.a"; exit 1
fi
"$scratch/cmake/prefill" "$gate" 1 | tail -n 1
"$scratch/cmake/prefill_static" "$gate" 1 | tail -n 1
"$scratch/cmake/api_errors" "$gate" "$scratch/cmake-api" | tail -n 1
"$scratch/cmake/distill" "$scratch/cmake-distill-gate" | tail -n 1
echo "CMake build: prefill, prefill_static (libseerattn.a), api_errors and distill passed, loading $prefix/lib/$soname"

# The Python binding as a user gets it: pip install (from a copy, so that
# setuptools' build/ stays out of the checkout), then its tests, against the
# same installed library.
echo "== Python binding (pip install bindings/python; python3 -m unittest)"
cp -r bindings/python "$scratch/python-src"
PIP_ROOT_USER_ACTION=ignore python3 -m pip install --quiet --disable-pip-version-check --no-deps \
    --target "$scratch/python" "$scratch/python-src"
SEERATTN_LIBRARY="$prefix/lib/libseerattn.so" PYTHONPATH="$scratch/python" \
    python3 -m unittest discover -s bindings/python/tests -v 2>&1 | tee target/python-tests.log

# The C programs under ASan/UBSan/LSan, api_errors under valgrind memcheck,
# against the same installed library.
scripts/asan.sh "$prefix"

# Fuzz smoke: cargo test above replayed every committed seed through the
# fuzz targets' bodies on stable (tests/fuzz_replay.rs). Where cargo-fuzz and
# a nightly toolchain exist, each libFuzzer target also runs 2000 inputs
# mutated from those seeds (a fixed seed, so the run is reproducible).
echo "== fuzz smoke"
if cargo +nightly fuzz --version >/dev/null 2>&1; then
    for t in pth gate_files c_api; do
        # New inputs go to a scratch corpus (the first directory), never into seeds/.
        mkdir -p "$scratch/fuzz-$t"
        (cd fuzz && cargo +nightly fuzz run -O "$t" "$scratch/fuzz-$t" seeds/"$t" -- -runs=2000 -seed=1 \
            -max_len=4096 -len_control=0 >"../target/fuzz-smoke-$t.log" 2>&1) ||
            { echo "fuzz smoke $t failed:"; tail -n 40 "target/fuzz-smoke-$t.log"; exit 1; }
        grep -E '^Done [0-9]+ runs' "target/fuzz-smoke-$t.log" | sed "s/^/$t: /"
    done
else
    echo "cargo-fuzz or the nightly toolchain is missing: no libFuzzer smoke (the seeds were replayed on stable)"
fi
