#!/usr/bin/env bash
# Fetch the pinned llama.cpp source (with ggml) that the shim is built and
# tested against, and optionally build ggml's CPU library from it.
#
#   bindings/llama.cpp/fetch.sh            # source only; prints its directory
#   bindings/llama.cpp/fetch.sh --ggml     # also build ggml (CPU backend, static); prints the install prefix
#
# The source comes from the llama-cpp-python source distribution on PyPI,
# which vendors the full llama.cpp tree (vendor/llama.cpp, a git checkout).
# Pinned by version and sha256; nothing of llama.cpp is committed here.
# Everything lands in the git-ignored target/llama.cpp/ (override with
# SEERATTN_LLAMA_DIR) and is reused by later runs: the download when its
# sha256 matches, the source tree and the ggml build when their stamps do.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)

LLAMA_CPP_PYTHON_VERSION=0.3.36
LLAMA_CPP_PYTHON_SHA256=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
# The llama.cpp commit vendored in that sdist (vendor/llama.cpp's HEAD); checked after unpacking.
LLAMA_CPP_COMMIT=0c1e57098bba43ac29e6e3b677cdceebdd22334f

dir=${SEERATTN_LLAMA_DIR:-$root/target/llama.cpp}
sdist="$dir/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION.tar.gz"
# The whole sdist is unpacked (vendor/llama.cpp's .git points into the sdist's .git/modules).
tree="$dir/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION"
src="$tree/vendor/llama.cpp"
mkdir -p "$dir"

sha_ok() { [ -f "$1" ] && [ "$(sha256sum "$1" | cut -d' ' -f1)" = "$LLAMA_CPP_PYTHON_SHA256" ]; }

if ! sha_ok "$sdist"; then
    # The sdist's URL from PyPI's JSON API (files.pythonhosted.org).
    url=$(python3 - "$LLAMA_CPP_PYTHON_VERSION" <<'PY'
import json, sys, urllib.parse, urllib.request
v = sys.argv[1]
with urllib.request.urlopen("https://pypi.org/pypi/llama-cpp-python/json", timeout=60) as r:
    files = json.load(r)["releases"].get(v, [])
sdists = [f["url"] for f in files if f["packagetype"] == "sdist"]
if len(sdists) != 1:
    sys.exit(f"llama-cpp-python {v}: expected one sdist on PyPI, found {len(sdists)}")
url = sdists[0]
url = urllib.parse.urljoin("https://pypi.org/pypi/llama-cpp-python/json", url)  # mirrors may answer with relative links
print(url)
PY
)
    echo "fetch.sh: downloading $url" >&2
    curl -sSfL --retry 3 -o "$sdist.part" "$url"
    mv "$sdist.part" "$sdist"
    if ! sha_ok "$sdist"; then
        echo "fetch.sh: sha256 of $sdist is $(sha256sum "$sdist" | cut -d' ' -f1), expected $LLAMA_CPP_PYTHON_SHA256" >&2
        rm -f "$sdist"
        exit 1
    fi
fi

if [ "$(cat "$tree.stamp" 2>/dev/null)" != "$LLAMA_CPP_PYTHON_SHA256" ]; then
    rm -rf "$tree" "$tree.stamp"
    tar -xzf "$sdist" -C "$dir"
    head=$(git -C "$src" rev-parse HEAD 2>/dev/null || echo none)
    if [ "$head" != "$LLAMA_CPP_COMMIT" ]; then
        echo "fetch.sh: vendor/llama.cpp is at $head, expected $LLAMA_CPP_COMMIT" >&2
        exit 1
    fi
    echo "$LLAMA_CPP_PYTHON_SHA256" >"$tree.stamp"
fi

if [ "${1:-}" != "--ggml" ]; then
    echo "$src"
    exit 0
fi

# ggml's CPU library: static, CPU backend only, no OpenMP, BLAS, llamafile,
# repacking, tests or examples; portable x86-64 code (AVX2/FMA/F16C, not
# -march=native), so that binaries linking it run on the GPU machine too.
# Configured through llama.cpp's top-level CMakeLists (ggml/ alone does not
# configure in this tree: its ggml.pc.in lives only in the ggml repository)
# with llama.cpp's own programs off, and only the ggml targets built. The
# headers and the three static libraries are then copied to $prefix.
build="$dir/ggml-build-$LLAMA_CPP_PYTHON_VERSION"
prefix="$dir/ggml-$LLAMA_CPP_PYTHON_VERSION"
options=(
    -DCMAKE_BUILD_TYPE=Release
    -DCMAKE_POSITION_INDEPENDENT_CODE=ON
    -DBUILD_SHARED_LIBS=OFF
    -DLLAMA_BUILD_COMMON=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_EXAMPLES=OFF
    -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_OPENSSL=OFF
    -DGGML_NATIVE=OFF -DGGML_CPU=ON -DGGML_BACKEND_DL=OFF -DGGML_OPENMP=OFF -DGGML_BLAS=OFF
    -DGGML_LLAMAFILE=OFF -DGGML_CPU_REPACK=OFF -DGGML_CCACHE=OFF -DGGML_METAL=OFF
)
stamp="$LLAMA_CPP_PYTHON_SHA256 ${options[*]}"
if [ "$(cat "$prefix/.seerattn-stamp" 2>/dev/null)" != "$stamp" ]; then
    rm -rf "$prefix"
    log="$dir/ggml-build.log"
    echo "fetch.sh: building ggml (CPU) in $build, log $log (one job: a few minutes)" >&2
    { cmake -S "$src" -B "$build" "${options[@]}" &&
        nice -n 10 cmake --build "$build" -j "${GGML_BUILD_JOBS:-1}" --target ggml ggml-base ggml-cpu; } >"$log" 2>&1 ||
        { tail -n 40 "$log" >&2; exit 1; }
    mkdir -p "$prefix/include" "$prefix/lib"
    cp "$src"/ggml/include/*.h "$prefix/include/"
    for lib in ggml ggml-base ggml-cpu; do
        cp "$(find "$build/ggml/src" -name "lib$lib.a" | head -n 1)" "$prefix/lib/"
    done
    echo "$stamp" >"$prefix/.seerattn-stamp"
fi
echo "$prefix"
