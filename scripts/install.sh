#!/usr/bin/env bash
# Build the library and install it for C and C++ consumers (Linux):
#
#   PREFIX/lib/libseerattn.so.VERSION      the shared library (soname libseerattn.so.ABI)
#   PREFIX/lib/libseerattn.so.ABI          -> libseerattn.so.VERSION (what programs load)
#   PREFIX/lib/libseerattn.so              -> libseerattn.so.ABI     (what -lseerattn links)
#   PREFIX/lib/libseerattn.a               the static library
#   PREFIX/include/seerattn.h              the committed, generated header
#   PREFIX/lib/pkgconfig/seerattn.pc       pkg-config --cflags --libs seerattn
#   PREFIX/lib/cmake/seerattn/             find_package(seerattn): seerattn::seerattn (shared),
#                                          seerattn::seerattn_static
#
# VERSION is the crate's (Cargo.toml); ABI is the C ABI version
# (SEER_ABI_VERSION), which build.rs writes into the library as its soname and
# which this script reads back from it, so the links match what the loader
# looks for.
#
# Needs cargo, python3 (reads cargo metadata; pip for nvcc on a first run)
# and readelf (binutils).
#
# Usage: scripts/install.sh [--prefix DIR] [--debug]
#   --prefix DIR  where to install (default /usr/local)
#   --debug       install the dev-profile build instead of the release one
#                 (CI: scripts/test.sh has built it already, so nothing compiles)
set -euo pipefail
cd "$(dirname "$0")/.."

usage() { sed -n '/^# Usage:/,/^set /{/^set /d; s/^# \{0,1\}//; p}' "$0"; }
prefix=/usr/local
profile=release
while [ $# -gt 0 ]; do
    case $1 in
    --prefix) [ $# -ge 2 ] || { usage >&2; exit 2; }; prefix=$2; shift 2 ;;
    --prefix=*) prefix=${1#--prefix=}; shift ;;
    --debug) profile=debug; shift ;;
    -h | --help) usage; exit 0 ;;
    *) echo "install.sh: unknown argument $1" >&2; usage >&2; exit 2 ;;
    esac
done
mkdir -p "$prefix"
# Absolute: the pkg-config file names it.
prefix=$(cd "$prefix" && pwd)

# The installed library carries its CUDA kernels: provide nvcc as the tests do.
NVCC=$(scripts/setup-cuda.sh)
export NVCC
if [ "$profile" = release ]; then
    cargo build --release --lib --quiet
else
    cargo build --lib --quiet
fi

{ read -r version; read -r description; read -r target_dir; } < <(cargo metadata --no-deps --format-version 1 |
    python3 -c '
import json, sys
m = json.load(sys.stdin)
p = next(p for p in m["packages"] if p["name"] == "seerattn")
print(p["version"], " ".join(p["description"].split()), m["target_directory"], sep="\n")')
built="$target_dir/$profile"
soname=$(readelf -d "$built/libseerattn.so" | sed -n 's/.*(SONAME).*\[\(.*\)\]/\1/p')
if [ -z "$soname" ]; then
    echo "install.sh: $built/libseerattn.so has no soname (build.rs sets one on Linux only)" >&2
    exit 1
fi

lib="$prefix/lib"
install -d "$lib/pkgconfig" "$lib/cmake/seerattn" "$prefix/include"
install -m 755 "$built/libseerattn.so" "$lib/libseerattn.so.$version"
ln -sfn "libseerattn.so.$version" "$lib/$soname"
ln -sfn "$soname" "$lib/libseerattn.so"
install -m 644 "$built/libseerattn.a" "$lib/libseerattn.a"
install -m 644 include/seerattn.h "$prefix/include/seerattn.h"

# What a program linking libseerattn.a needs besides it: the system libraries
# of the Rust standard library and of the dependencies (libloading's dlopen for
# the CUDA driver), exactly as `cargo rustc --lib --crate-type staticlib --
# --print native-static-libs` lists them. Computing them here would rebuild
# the library with other crate types; CI links a program statically through
# the CMake target instead, so a library missing here fails it.
static_libs=(dl gcc_s util rt pthread m dl c)

cat >"$lib/pkgconfig/seerattn.pc" <<EOF
prefix=$prefix
libdir=\${prefix}/lib
includedir=\${prefix}/include

Name: seerattn
Description: $description
Version: $version
Cflags: -I\${includedir}
Libs: -L\${libdir} -lseerattn
Libs.private: ${static_libs[*]/#/-l}
EOF

# Relocatable, like CMake's own exported configs: paths are relative to
# this file, so the tree can be moved or packaged.
cat >"$lib/cmake/seerattn/seerattnConfig.cmake" <<EOF
# seerattn $version, installed by scripts/install.sh.
get_filename_component(_seerattn_prefix "\${CMAKE_CURRENT_LIST_DIR}/../../.." ABSOLUTE)
if(NOT TARGET seerattn::seerattn)
    add_library(seerattn::seerattn SHARED IMPORTED)
    set_target_properties(seerattn::seerattn PROPERTIES
        IMPORTED_LOCATION "\${_seerattn_prefix}/lib/libseerattn.so.$version"
        IMPORTED_SONAME "$soname"
        INTERFACE_INCLUDE_DIRECTORIES "\${_seerattn_prefix}/include")
    add_library(seerattn::seerattn_static STATIC IMPORTED)
    set_target_properties(seerattn::seerattn_static PROPERTIES
        IMPORTED_LOCATION "\${_seerattn_prefix}/lib/libseerattn.a"
        INTERFACE_INCLUDE_DIRECTORIES "\${_seerattn_prefix}/include"
        INTERFACE_LINK_LIBRARIES "$(IFS=';'; echo "${static_libs[*]}")")
endif()
unset(_seerattn_prefix)
EOF

# Compatible versions follow Cargo's semver rule: at least the version asked
# for, with the same major version (the same minor while the major is 0).
IFS=. read -r major minor _ <<<"$version"
if [ "$major" = 0 ]; then
    same_series="PACKAGE_FIND_VERSION_MAJOR EQUAL 0 AND PACKAGE_FIND_VERSION_MINOR EQUAL $minor"
else
    same_series="PACKAGE_FIND_VERSION_MAJOR EQUAL $major"
fi
cat >"$lib/cmake/seerattn/seerattnConfigVersion.cmake" <<EOF
set(PACKAGE_VERSION "$version")
if(NOT PACKAGE_FIND_VERSION)
    set(PACKAGE_VERSION_COMPATIBLE TRUE)
elseif(PACKAGE_FIND_VERSION VERSION_LESS_EQUAL PACKAGE_VERSION AND $same_series)
    set(PACKAGE_VERSION_COMPATIBLE TRUE)
    if(PACKAGE_FIND_VERSION VERSION_EQUAL PACKAGE_VERSION)
        set(PACKAGE_VERSION_EXACT TRUE)
    endif()
else()
    set(PACKAGE_VERSION_COMPATIBLE FALSE)
endif()
EOF

echo "installed seerattn $version ($profile, soname $soname) into $prefix"
