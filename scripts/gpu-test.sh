#!/usr/bin/env bash
# The GPU tests, built on a machine with cargo and run on a GPU machine
# without it.
#
#   scripts/gpu-test.sh build   here (cargo, a C compiler, python3 for nvcc):
#       builds the library and every test binary in release with the CUDA
#       kernels compiled, and stages what the run needs in .devbuild/
#       (git-ignored, self-contained, ~80 MB; to move it to a machine with a
#       size limit, `tar -cf - .devbuild | xz -T2 -9` makes it ~7 MB: every
#       binary embeds the same kernel images, which xz's large window
#       finds; -3 leaves ~40 MB):
#         bin/    test executables (Rust tests link the library statically)
#         c/      the examples-c programs and the llama.cpp shim's test
#                 (bindings/llama.cpp), linked against lib/ through an rpath
#         lib/    libseerattn.so (and its soname's link)     include/  the header
#         python/ the Python binding, pip-installed (bindings/python)
#         MANIFEST      commit, nvcc, the binaries
#   scripts/gpu-test.sh run     on the GPU machine, from the repo root with
#       .devbuild/ present: runs every test binary with --include-ignored
#       (the #[ignore]d GPU tests included), the C programs, and the Python
#       binding's tests (bindings/python/tests, GPU tests required) and
#       example with the staged package and library; prints PASS or FAIL per
#       step and a final "N passed, M failed" line; exits non-zero on any
#       failure. Needs the NVIDIA driver, and python3 with PyTorch (CUDA) for
#       the Python steps. The hardening tests (gpu_hardening: threads,
#       graphs, the hot path, 128k/256k tokens and 2^31 elements) need about
#       20 GB of GPU and host memory; one binary alone:
#       SEERATTN_TEST_ROOT=$PWD .devbuild/bin/gpu_hardening --include-ignored
#
# Logs of the run go to $OUT/gpu-test-logs when OUT is set (the device
# runner returns that folder), else .devbuild/logs.
set -euo pipefail
cd "$(dirname "$0")/.."
stage=.devbuild

build() {
    NVCC=$(scripts/setup-cuda.sh)
    export NVCC
    echo "== nvcc: $NVCC"
    echo "== cargo build --release (library)"
    cargo build --release --lib --quiet
    echo "== cargo test --release --no-run"
    local json
    json=$(mktemp)
    cargo test --release --no-run --message-format=json >"$json"
    local target_dir
    target_dir=$(cargo metadata --format-version 1 --no-deps | jq -r .target_directory)

    rm -rf "$stage"
    mkdir -p "$stage/bin" "$stage/c" "$stage/lib"
    # One executable per test target: lib and bin unit tests, integration
    # tests. `header` is left out: it checks include/ against the Rust
    # sources, which is a property of the checkout, not of the device.
    jq -r 'select(.reason == "compiler-artifact" and .profile.test and .executable != null)
           | "\(.target.kind[0])\t\(.target.name)\t\(.executable)"' "$json" |
        while IFS=$'\t' read -r kind name exe; do
            [ "$name" = header ] && continue
            # distill_command runs the seerattn program, which is not staged:
            # a CPU test of the command, run by CI (its training loop runs on
            # the GPU in gpu_distill::gpu_dataset_run_*, through the library).
            [ "$name" = distill_command ] && continue
            local dest=$name
            case $kind in
            test) ;;
            bin) dest="bin-$name" ;;
            *) dest="lib-$name" ;; # the library's unit tests (kind cdylib/staticlib/rlib)
            esac
            # Line tables are enough for backtraces; full debug info would
            # multiply the size of what has to travel.
            objcopy --strip-debug "$exe" "$stage/bin/$dest"
        done
    rm -f "$json"
    echo "== cargo build --release --examples (benchmarks)"
    cargo build --release --examples --quiet
    mkdir -p "$stage/bench"
    for ex in examples/bench_*.rs; do
        local name
        name=$(basename "$ex" .rs)
        objcopy --strip-debug "$target_dir/release/examples/$name" "$stage/bench/$name"
    done
    objcopy --strip-debug "$target_dir/release/libseerattn.so" "$stage/lib/libseerattn.so"
    # The C programs load the library by its soname (libseerattn.so.ABI, set
    # by build.rs); a relative link travels with .devbuild/.
    local soname
    soname=$(readelf -d "$stage/lib/libseerattn.so" | sed -n 's/.*(SONAME).*\[\(.*\)\]/\1/p')
    ln -s libseerattn.so "$stage/lib/$soname"
    cp -r include "$stage/include"
    # The Python binding as pip installs it (from a copy: setuptools builds
    # in the source tree); the run points it at lib/ with SEERATTN_LIBRARY.
    local pysrc
    pysrc=$(mktemp -d)
    cp -r bindings/python/. "$pysrc"
    PIP_ROOT_USER_ACTION=ignore python3 -m pip install --quiet --disable-pip-version-check --no-deps \
        --target "$stage/python" "$pysrc"
    rm -rf "$pysrc"
    local cc=${CC:-cc}
    for prog in api_errors prefill; do
        "$cc" -std=c11 -Wall -Wextra -Werror -pedantic -O1 -Iinclude "examples-c/$prog.c" \
            -L"$stage/lib" -lseerattn -lm -Wl,-rpath,'$ORIGIN/../lib' -o "$stage/c/$prog"
    done
    # The CUDA example: the runtime linked statically, so it needs only the driver there.
    local cuda_root cudart_dir
    cuda_root=$(dirname "$(dirname "$NVCC")")
    cudart_dir=$(dirname "$(ls "$cuda_root"/lib/libcudart_static.a "$cuda_root"/lib64/libcudart_static.a 2>/dev/null | head -n 1)")
    "$cc" -std=c11 -Wall -Wextra -Werror -pedantic -O2 -Iinclude -I"$cuda_root/include" examples-c/cuda_prefill.c \
        -L"$stage/lib" -lseerattn -L"$cudart_dir" -l:libcudart_static.a -ldl -lpthread -lrt -lm \
        -Wl,-rpath,'$ORIGIN/../lib' -o "$stage/c/cuda_prefill"
    # The llama.cpp shim's test in its CUDA build: ggml's CPU library from the
    # pinned llama.cpp (bindings/llama.cpp/fetch.sh) linked statically, so
    # nothing is built on the GPU machine.
    local ggml_prefix
    ggml_prefix=$(bindings/llama.cpp/fetch.sh --ggml)
    "$cc" -std=c11 -Wall -Wextra -Werror -pedantic -O2 -DSEER_GGML_TEST_CUDA -Iinclude -Ibindings/llama.cpp \
        -I"$ggml_prefix/include" -I"$cuda_root/include" bindings/llama.cpp/test_shim.c bindings/llama.cpp/seerattn_ggml.c \
        -L"$stage/lib" -lseerattn "$ggml_prefix/lib/libggml.a" "$ggml_prefix/lib/libggml-cpu.a" \
        "$ggml_prefix/lib/libggml-base.a" -L"$cudart_dir" -l:libcudart_static.a -lstdc++ -ldl -lpthread -lrt -lm \
        -Wl,-rpath,'$ORIGIN/../lib' -o "$stage/c/test_shim_cuda"
    {
        echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (with uncommitted changes)')"
        echo "built: $(date -u +%FT%TZ) on $(uname -n)"
        echo "nvcc: $("$NVCC" --version | tail -n 2 | head -n 1)"
        echo "binaries: $(ls "$stage/bin" | tr '\n' ' ')"
    } >"$stage/MANIFEST"
    cat "$stage/MANIFEST"
    echo "== staged in $stage: $(du -sh "$stage" | cut -f1)"
}

# Stop with a hint when .devbuild/ lacks `what` (the build step makes it).
require_staged() {
    if [ ! -e "$stage/$1" ]; then
        echo "no $stage/$1: run 'scripts/gpu-test.sh build' on the build machine first" >&2
        exit 2
    fi
}

run() {
    require_staged bin
    cat "$stage/MANIFEST"
    if command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
    fi
    local logs=${OUT:+$OUT/gpu-test-logs}
    logs=${logs:-$stage/logs}
    mkdir -p "$logs"
    # The tests read their data from the staged copy, not from the path the
    # build machine compiled in.
    # The test data is tracked, so the working tree on the device has it.
    export SEERATTN_TEST_ROOT="$PWD"
    export RUST_BACKTRACE=1

    local passed=0 failed=0 tests_passed=0 tests_failed=0 summary=""
    record() { # name status log
        local name=$1 status=$2 log=$3 line
        # libtest's "test result: ok. 5 passed; 0 failed; ..." lines (none for the C programs).
        local p f
        read -r p f < <(awk '/^test result:/ {p += $4; f += $6} END {print p + 0, f + 0}' "$log")
        line=""
        if grep -q '^test result:' "$log"; then line="$p tests passed, $f failed"; fi
        # unittest's "Ran 27 tests in 9.1s" and "OK (skipped=1)" / "FAILED (failures=2)".
        if grep -qE '^Ran [0-9]+ tests? in' "$log"; then
            line="$(grep -E '^Ran [0-9]+ tests? in' "$log" | tail -n 1 | cut -d' ' -f2) Python tests: $(grep -E '^(OK|FAILED)' "$log" | tail -n 1)"
        fi
        tests_passed=$((tests_passed + p))
        tests_failed=$((tests_failed + f))
        if [ "$status" -eq 0 ]; then
            passed=$((passed + 1))
            summary+=$(printf 'PASS  %-28s %s' "$name" "$line")$'\n'
        else
            failed=$((failed + 1))
            summary+=$(printf 'FAIL  %-28s exit %s %s (log: %s)' "$name" "$status" "$line" "$log")$'\n'
            echo "---- $name failed; end of its log:"
            grep -E '^test .* FAILED|^---- ' "$log" | head -n 40 || true
            tail -n 40 "$log"
        fi
    }
    for bin in "$stage"/bin/*; do
        local name status=0
        name=$(basename "$bin")
        echo "== $name"
        "$bin" --include-ignored >"$logs/$name.log" 2>&1 || status=$?
        record "$name" "$status" "$logs/$name.log"
    done
    # The prefill kernels an H100 does not select (the mma.sync kernel with
    # TMA copies of later GPUs, the cp.async kernel of sm_80): run their
    # tests there too.
    if [ -x "$stage/bin/gpu_attention" ]; then
        local kernel status
        for kernel in tma cpasync; do
            status=0
            echo "== gpu_attention (SEERATTN_PREFILL_KERNEL=$kernel)"
            SEERATTN_PREFILL_KERNEL=$kernel "$stage/bin/gpu_attention" --include-ignored \
                >"$logs/gpu_attention-$kernel.log" 2>&1 || status=$?
            record "gpu_attention ($kernel)" "$status" "$logs/gpu_attention-$kernel.log"
        done
    fi
    # The gate's threshold rule runs on kernels/gate_select.cu from 257 key
    # blocks on and on the logits + select kernels below: the gate tests'
    # shapes are short, so run them once more with the former forced.
    if [ -x "$stage/bin/gpu_gate" ]; then
        local status=0
        echo "== gpu_gate (SEERATTN_GATE_SELECT=fused)"
        SEERATTN_GATE_SELECT=fused "$stage/bin/gpu_gate" --include-ignored \
            >"$logs/gpu_gate-fused.log" 2>&1 || status=$?
        record "gpu_gate (select fused)" "$status" "$logs/gpu_gate-fused.log"
    fi
    local gate="tests/data/upstream/gqa4_s1000_gates" scratch status
    scratch=$(mktemp -d)
    echo "== c/prefill"
    status=0
    "$stage/c/prefill" "$gate" 1 >"$logs/c-prefill.log" 2>&1 || status=$?
    record c/prefill "$status" "$logs/c-prefill.log"
    echo "== c/cuda_prefill"
    status=0
    "$stage/c/cuda_prefill" "$gate" 8192 >"$logs/c-cuda_prefill.log" 2>&1 || status=$?
    cat "$logs/c-cuda_prefill.log"
    record c/cuda_prefill "$status" "$logs/c-cuda_prefill.log"
    echo "== c/test_shim_cuda (bindings/llama.cpp: the ggml shim on the GPU and the CPU against ggml)"
    status=0
    "$stage/c/test_shim_cuda" "$gate" --cuda >"$logs/c-test_shim_cuda.log" 2>&1 || status=$?
    grep -E '^(FAIL|[0-9]+ passed)' "$logs/c-test_shim_cuda.log" || true
    record c/test_shim_cuda "$status" "$logs/c-test_shim_cuda.log"
    echo "== c/api_errors"
    status=0
    "$stage/c/api_errors" "$gate" "$scratch" >"$logs/c-api_errors.log" 2>&1 || status=$?
    record c/api_errors "$status" "$logs/c-api_errors.log"
    rm -rf "$scratch"
    # The Python binding: its CPU and GPU tests (a missing GPU or PyTorch
    # fails them rather than skipping), then the PyTorch layer example.
    local py_env=(SEERATTN_REQUIRE_GPU=1 SEERATTN_LIBRARY="$PWD/$stage/lib/libseerattn.so" PYTHONPATH="$PWD/$stage/python")
    echo "== python/tests"
    status=0
    env "${py_env[@]}" python3 -m unittest discover -s bindings/python/tests -v >"$logs/python-tests.log" 2>&1 || status=$?
    grep -E 'relative error|near-ties' "$logs/python-tests.log" || true
    record python/tests "$status" "$logs/python-tests.log"
    echo "== python/torch_layer"
    status=0
    env "${py_env[@]}" python3 bindings/python/examples/torch_layer.py >"$logs/python-torch_layer.log" 2>&1 || status=$?
    cat "$logs/python-torch_layer.log"
    record python/torch_layer "$status" "$logs/python-torch_layer.log"

    echo
    printf '%s' "$summary"
    echo "($tests_passed tests passed, $tests_failed failed in the Rust binaries)"
    echo "$passed passed, $failed failed"
    [ "$failed" -eq 0 ]
}

# Run every staged benchmark; each appends JSON lines to the results file
# ($OUT/bench.jsonl on the device machine, else .devbuild/bench.jsonl).
bench() {
    require_staged bench
    cat "$stage/MANIFEST"
    local results=${OUT:+$OUT/bench.jsonl}
    results=${results:-$stage/bench.jsonl}
    for b in "$stage"/bench/*; do
        echo "== $(basename "$b")"
        "$b" "$results"
    done
}

# The sparse prefill benchmark (bench/prefill.py, PyTorch on the GPU
# machine): seerattn against SDPA (FlashAttention-2, cuDNN) and FlexAttention
# on the same inputs, JSON lines to $OUT/prefill.jsonl (else
# .devbuild/prefill.jsonl). Extra arguments go to the script.
bench_prefill() {
    require_staged lib/libseerattn.so
    cat "$stage/MANIFEST"
    local results=${OUT:+$OUT/prefill.jsonl}
    results=${results:-$stage/prefill.jsonl}
    python3 bench/prefill.py "$results" --lib "$stage/lib/libseerattn.so" "$@"
}

# The GPU test binaries under compute-sanitizer: memcheck, initcheck,
# synccheck and racecheck must report no error and the tests must pass
# (racecheck also reorders CTAs, which once exposed an inter-CTA race that
# plain runs hid). SANITIZE_BINS picks the binaries (default: all six GPU
# suites: ffi_distill_cuda is the trainer's C API on CUDA tensors) and
# SANITIZE_TOOLS the tools. The scale tests (gpu_scale_*: 128k
# and 256k tokens, 2^31 elements) are always skipped, far too slow under the
# sanitizers, and so is gpu_distill's 600-step planted-structure run (its
# kernels run in the trainer's other tests); repeated steps run twice (SEERATTN_TEST_REPEATS, see
# tests/gpu_hardening.rs). gpu_hardening's hot-path test makes one CUDA API
# error on purpose (an allocation during a global-mode capture, its control),
# so API errors are not reported for that binary; every other error is.
# racecheck runs gpu_hardening's steps once: with 8 threads launching while
# 8 others create and destroy handles, compute-sanitizer 13.0's racecheck
# loses track of a launch from the second round on ("Internal Sanitizer
# Error: Detected a failure to track a kernel launch", counted as an error
# with no hazard named) or stops progressing; one round passes clean.
sanitize() {
    require_staged bin
    local cs
    cs=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -n 1)
    if [ -z "$cs" ]; then
        echo "compute-sanitizer not found" >&2
        exit 2
    fi
    export SEERATTN_TEST_ROOT="$PWD"
    export SEERATTN_TEST_REPEATS="${SEERATTN_TEST_REPEATS:-2}"
    local passed=0 failed=0
    for bin in ${SANITIZE_BINS:-gpu_gate gpu_attention ffi_cuda gpu_hardening gpu_distill ffi_distill_cuda}; do
        local api=()
        [ "$bin" = gpu_hardening ] && api=(--report-api-errors no)
        for tool in ${SANITIZE_TOOLS:-memcheck initcheck synccheck racecheck}; do
            local status=0 start=$SECONDS repeats=$SEERATTN_TEST_REPEATS
            [ "$bin/$tool" = gpu_hardening/racecheck ] && repeats=1
            SEERATTN_TEST_REPEATS=$repeats "$cs" --tool "$tool" "${api[@]}" --error-exitcode 3 "$stage/bin/$bin" --include-ignored --test-threads 1 \
                --skip gpu_scale_ --skip gpu_trainer_learns_ >"$stage/sanitize-$bin-$tool.log" 2>&1 || status=$?
            if [ "$status" -eq 0 ]; then
                passed=$((passed + 1))
                printf 'PASS  %-10s %-14s %4ss  %s\n' "$tool" "$bin" $((SECONDS - start)) \
                    "$(grep -m1 'ERROR SUMMARY' "$stage/sanitize-$bin-$tool.log")"
            else
                failed=$((failed + 1))
                printf 'FAIL  %-10s %s (exit %s)\n' "$tool" "$bin" "$status"
                grep -E 'panicked|ERROR SUMMARY|hazard|Invalid|Uninitialized' "$stage/sanitize-$bin-$tool.log" | head -n 10
            fi
        done
    done
    echo "$passed passed, $failed failed"
    [ "$failed" -eq 0 ]
}

case "${1:-}" in
build) build ;;
run) run ;;
bench) bench ;;
sanitize) sanitize ;;
bench-prefill)
    shift
    bench_prefill "$@"
    ;;
*)
    echo "usage: scripts/gpu-test.sh build   (here: stage release test binaries in .devbuild/)" >&2
    echo "       scripts/gpu-test.sh run     (on the GPU machine: run them all, GPU tests included)" >&2
    echo "       scripts/gpu-test.sh bench   (on the GPU machine: run the benchmarks, JSON lines to \$OUT/bench.jsonl)" >&2
    echo "       scripts/gpu-test.sh bench-prefill [args] (on the GPU machine: bench/prefill.py, \$OUT/prefill.jsonl)" >&2
    echo "       scripts/gpu-test.sh sanitize (on the GPU machine: the GPU tests under compute-sanitizer)" >&2
    exit 2
    ;;
esac
