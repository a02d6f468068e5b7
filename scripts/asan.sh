#!/usr/bin/env bash
# Memory checks of the C programs in examples-c/ on the CPU path (scripts/test.sh
# runs this, so CI does; about 30 s).
#
# 1. AddressSanitizer, UndefinedBehaviorSanitizer and LeakSanitizer: the C
#    programs built with -fsanitize=address,undefined against the debug
#    libseerattn.so, installed (see PREFIX below). The C side is
#    instrumented; leaks anywhere in the process fail the run (Rust
#    allocations go through malloc, which ASan intercepts).
# 2. valgrind memcheck over api_errors (every error path of the C API, the
#    library included: valgrind sees the Rust code's reads and writes, which
#    ASan does not instrument): --error-exitcode=1 --leak-check=full, so an
#    invalid access, a use of uninitialised memory or a definite or possible
#    leak fails. The prefill and distill examples take minutes under
#    valgrind (a 1000-token dense prefill, 40 training steps, in a debug
#    build), and so do the threading tests of tests/ffi_cpu.rs;
#    SEERATTN_VALGRIND_ALL=1 adds all three.
#
# Needs a C compiler with libasan/libubsan and valgrind (.ci/run installs it);
# SEERATTN_SKIP_VALGRIND=1 runs the sanitizers only and says so.
#
# Usage: scripts/asan.sh [PREFIX]
#   PREFIX: a tree installed by `scripts/install.sh --debug` (scripts/test.sh
#   passes its own); without it, the debug build is installed into a
#   temporary one. Programs load the library by its soname
#   (libseerattn.so.ABI), which only an installed tree has, not target/.
set -euo pipefail
cd "$(dirname "$0")/.."

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
prefix=${1:-}
if [ -z "$prefix" ]; then
    prefix="$scratch/prefix"
    scripts/install.sh --debug --prefix "$prefix" >/dev/null
fi
CC=${CC:-cc}
seerattn=(-I"$prefix/include" -L"$prefix/lib" -lseerattn -Wl,-rpath,"$prefix/lib")
out=target/c-sanitize
mkdir -p "$out"
gate=tests/data/upstream/gqa4_s1000_gates

echo "== C programs under ASan + UBSan + LSan"
for prog in api_errors prefill distill; do
    "$CC" -std=c11 -Wall -Wextra -Werror -pedantic -O1 -g -fno-omit-frame-pointer \
        -fsanitize=address,undefined -fno-sanitize-recover=all "examples-c/$prog.c" \
        "${seerattn[@]}" -lm -o "$out/$prog"
done
export ASAN_OPTIONS=detect_leaks=1:abort_on_error=0:halt_on_error=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
"$out/api_errors" "$gate" "$scratch" | tail -n 1
"$out/prefill" "$gate" 1 | tail -n 1
"$out/distill" "$scratch/distill-gate" | tail -n 1

if [ "${SEERATTN_SKIP_VALGRIND:-}" = 1 ]; then
    echo "== valgrind: SKIPPED (SEERATTN_SKIP_VALGRIND=1)"
    exit 0
fi
if ! command -v valgrind >/dev/null 2>&1; then
    echo "valgrind not found (apt-get install valgrind; or SEERATTN_SKIP_VALGRIND=1 to run the sanitizers only)"
    exit 1
fi
echo "== api_errors under valgrind memcheck"
for prog in api_errors prefill distill; do
    "$CC" -std=c11 -Wall -Wextra -Werror -pedantic -O1 -g "examples-c/$prog.c" \
        "${seerattn[@]}" -lm -o "$out/$prog-plain"
done
vg=(valgrind -q --error-exitcode=1 --leak-check=full --errors-for-leak-kinds=definite,possible)
"${vg[@]}" "$out/api_errors-plain" "$gate" "$scratch/vg" | tail -n 1
if [ "${SEERATTN_VALGRIND_ALL:-}" = 1 ]; then
    echo "== prefill under valgrind memcheck"
    "${vg[@]}" "$out/prefill-plain" "$gate" 1 | tail -n 1
    echo "== distill under valgrind memcheck"
    "${vg[@]}" "$out/distill-plain" "$scratch/vg-distill-gate" | tail -n 1
    # The threading tests of the C API (handles created, destroyed and
    # destroyed while in use from many threads): about 2.5 minutes.
    echo "== tests/ffi_cpu.rs threading tests under valgrind memcheck"
    bin=$(cargo test --test ffi_cpu --no-run --message-format=json 2>/dev/null |
        sed -n 's/.*"executable":"\([^"]*ffi_cpu[^"]*\)".*/\1/p' | tail -n 1)
    valgrind -q --error-exitcode=1 --leak-check=no "$bin" destroy_racing handles_created eight_threads \
        --test-threads=1 | tail -n 2
fi
echo "sanitizers and valgrind: clean"
