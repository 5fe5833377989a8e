#!/usr/bin/env bash
# Build llama.cpp's checking tools once, from the source that ships inside the
# llama-cpp-python source distribution, and run them.
#
#   bench/llamacpp.sh build               # downloads the sdist with pip, builds into the cache
#   bench/llamacpp.sh bin                 # prints the folder holding the binaries
#   bench/llamacpp.sh perplexity ARGS...  # runs llama-perplexity (also: quantize, imatrix)
#
# The cache is $AUTOCOMPRESS_LLAMACPP (default $AUTOCOMPRESS_CACHE/llamacpp, ~/.cache/autocompress/llamacpp).
# Tests that need the binaries look there and skip with a reason when absent.
set -euo pipefail

cache="${AUTOCOMPRESS_LLAMACPP:-${AUTOCOMPRESS_CACHE:-$HOME/.cache/autocompress}/llamacpp}"
version="${LLAMACPP_PYTHON_VERSION:-0.3.36}"
jobs="${JOBS:-2}"
bin="$cache/bin"
tools=(llama-perplexity llama-quantize llama-imatrix)

build() {
    if [[ -x "$bin/llama-perplexity" && -x "$bin/llama-quantize" && -x "$bin/llama-imatrix" ]]; then
        echo "llama.cpp tools already built in $bin"
        return
    fi
    mkdir -p "$cache/src"
    local sdist="$cache/src/llama_cpp_python-$version.tar.gz"
    if [[ ! -f "$sdist" ]]; then
        python -m pip download --no-binary :all: --no-deps --dest "$cache/src" "llama-cpp-python==$version"
    fi
    local src="$cache/src/llama_cpp_python-$version/vendor/llama.cpp"
    if [[ ! -f "$src/CMakeLists.txt" ]]; then
        tar -xzf "$sdist" -C "$cache/src" "llama_cpp_python-$version/vendor/llama.cpp"
    fi
    local build_dir="$cache/build-$version"
    cmake -S "$src" -B "$build_dir" -G Ninja -DCMAKE_BUILD_TYPE=Release \
        -DBUILD_SHARED_LIBS=OFF -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \
        -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_TOOLS=ON >/dev/null
    cmake --build "$build_dir" --target "${tools[@]}" -j "$jobs"
    mkdir -p "$bin.tmp"
    for tool in "${tools[@]}"; do cp "$build_dir/bin/$tool" "$bin.tmp/"; done
    rm -rf "$bin" && mv "$bin.tmp" "$bin"
    echo "built ${tools[*]} into $bin"
}

case "${1:-}" in
    build) build ;;
    bin) echo "$bin" ;;
    perplexity|quantize|imatrix)
        tool="$bin/llama-$1"; shift
        [[ -x "$tool" ]] || { echo "error: $tool is missing; run bench/llamacpp.sh build first" >&2; exit 2; }
        exec "$tool" "$@" ;;
    *) echo "usage: bench/llamacpp.sh build | bin | perplexity|quantize|imatrix ARGS..." >&2; exit 2 ;;
esac
