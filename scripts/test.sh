#!/usr/bin/env bash
# The project's test command (README "Run the tests"; .ci/run calls it).
#
# 1. Rust unit and integration tests: CPU reference, checkpoint readers,
#    upstream conformance, the C ABI from Rust, the header being current.
# 2. The C programs in examples-c/, compiled with -Wall -Wextra -Werror
#    against include/seerattn.h and the freshly built shared library, then run:
#    the bad-input table through the C API, and the end-to-end example; then
#    again under ASan/UBSan/LSan and valgrind (scripts/asan.sh).
# 3. A fuzz smoke where cargo-fuzz and nightly exist (the committed seeds
#    are replayed on stable by cargo test in any case).
#
# The CUDA kernels are compiled for real: scripts/setup-cuda.sh provides a
# pinned nvcc (installed from PyPI into .cuda/ when none is found) and the
# build fails if any kernel does not compile. No GPU is needed: the GPU tests
# are #[ignore]d here and run on a GPU machine through scripts/gpu-test.sh
# (see README); this script runs none of them and claims none.
#
# Needs cargo, a C compiler with libasan, valgrind, and python3 with pip (for
# nvcc, first run only).
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

echo "== C programs (cc -std=c11 -Wall -Wextra -Werror)"
cargo build --lib --quiet
CC=${CC:-cc}
out=target/c
mkdir -p "$out"
lib="$PWD/target/debug"
for prog in api_errors prefill; do
    "$CC" -std=c11 -Wall -Wextra -Werror -pedantic -O1 -Iinclude "examples-c/$prog.c" \
        -L"$lib" -lseerattn -lm -Wl,-rpath,"$lib" -o "$out/$prog"
done
# The CUDA example needs a GPU to run (scripts/gpu-test.sh runs it there);
# here it is compiled against the CUDA runtime headers of the same toolkit,
# so that an API change that breaks it fails CI.
cuda_root=$(dirname "$(dirname "$NVCC")")
cudart_dir=$(dirname "$(ls "$cuda_root"/lib/libcudart_static.a "$cuda_root"/lib64/libcudart_static.a 2>/dev/null | head -n 1)")
"$CC" -std=c11 -Wall -Wextra -Werror -pedantic -O1 -Iinclude -I"$cuda_root/include" examples-c/cuda_prefill.c \
    -L"$lib" -lseerattn -L"$cudart_dir" -l:libcudart_static.a -ldl -lpthread -lrt -lm -Wl,-rpath,"$lib" \
    -o "$out/cuda_prefill"
echo "examples-c/cuda_prefill.c compiled (it runs on the GPU machine: scripts/gpu-test.sh run)"
gate=tests/data/upstream/gqa4_s1000_gates
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
"$out/prefill" "$gate" 1
"$out/api_errors" "$gate" "$scratch"

# The C programs under ASan/UBSan/LSan, api_errors under valgrind memcheck.
scripts/asan.sh

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
