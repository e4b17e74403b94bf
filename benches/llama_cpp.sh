#!/usr/bin/env bash
# llama.cpp reference figures for a GGUF: builds llama.cpp (CPU only, Release, native flags,
# no BLAS/CUDA) from the llama.cpp tree vendored in the PyPI sdist of llama-cpp-python (the
# only source reachable from a registry), once, into $LLAMA_CPP_DIR, then runs llama-bench:
#   tg32 : llama-bench -m MODEL -t 2 -p 0 -n 32 -r 5           (Markdown table)
#   pp512/tg128 : llama-bench -m MODEL -t 2 -p 512 -n 128 -r 3 -o json
#
#   bash benches/llama_cpp.sh MODEL.gguf     # build if needed, then bench
#   bash benches/llama_cpp.sh                # build only
#
# Pinned source: llama-cpp-python 0.3.36 (sdist sha256 below), which vendors
# ggml-org/llama.cpp@0c1e57098 ("webgpu: fix SSM_SCAN binding aliasing (#29750)",
# committed 2026-10-01). The sdist's vendor tree is a shallow git checkout, so llama.cpp's own
# build number (bNNNN) cannot be derived from it (llama-bench reports "build 1" / "build_number": 1,
# the depth of that shallow history); the commit is passed to cmake explicitly and
# `llama-bench --version` prints it. cmake comes from PyPI (pinned) in a venv under
# $LLAMA_CPP_DIR. The build is niced and -j${LLAMA_CPP_JOBS:-2}.
#
# Binaries: $LLAMA_CPP_DIR/build/bin/{llama-bench,llama-completion,llama-cli}.
# llama-completion is the raw-prompt tool (-no-cnv lives there in this llama.cpp; llama-cli is
# the chat front end built on the server code). Build llama-cli too with LLAMA_CPP_CLI=1.
set -euo pipefail

LLAMA_CPP_PY_VERSION=0.3.36
LLAMA_CPP_PY_SHA256=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
LLAMA_CPP_COMMIT=0c1e570
CMAKE_PYPI_VERSION=3.31.10

dir=${LLAMA_CPP_DIR:-/work/llama.cpp-build}
jobs=${LLAMA_CPP_JOBS:-2}
bin=$dir/build/bin
targets=(llama-bench llama-completion)
[ "${LLAMA_CPP_CLI:-0}" = 1 ] && targets+=(llama-cli)

need_build=0
for t in "${targets[@]}"; do [ -x "$bin/$t" ] || need_build=1; done

if [ "$need_build" = 1 ]; then
  echo "llama_cpp.sh: building ${targets[*]} into $dir" >&2
  mkdir -p "$dir/src"
  sdist=$dir/src/llama_cpp_python-$LLAMA_CPP_PY_VERSION.tar.gz
  if [ ! -f "$sdist" ]; then
    # --no-binary for this one package only: ':all:' would also build its build requirements
    # (cmake, ninja) from source just to prepare metadata.
    python3 -m pip download --quiet --no-deps --no-binary llama-cpp-python \
      "llama-cpp-python==$LLAMA_CPP_PY_VERSION" -d "$dir/src"
  fi
  echo "$LLAMA_CPP_PY_SHA256  $sdist" | sha256sum -c --quiet
  srcroot=$dir/src/llama_cpp_python-$LLAMA_CPP_PY_VERSION
  [ -f "$srcroot/vendor/llama.cpp/CMakeLists.txt" ] || tar -xzf "$sdist" -C "$dir/src"
  src=$srcroot/vendor/llama.cpp

  # The one change to upstream: GCC 12 (Debian 12's compiler) drops the stores that build the AMX
  # tile config on the stack before `_tile_loadconfig`, so ldtilecfg faults (SIGSEGV in
  # ggml_backend_amx_mul_mat on any batch > 1: prompt processing, pp512; known upstream,
  # llama.cpp #20824, fix proposed in #26954). A compiler barrier that reads the struct keeps
  # the stores. Dropping AMX instead (-mno-amx-*) would also avoid the fault, but the AMX buffer
  # type's batch-1 AVX512-VNNI kernel is llama.cpp's fastest Q4_1 decode path on this CPU
  # (tg32 of SmolLM2-135M Q4_1, 2 threads: ~330 t/s with it, ~155 t/s with `--repack 0`, which
  # bypasses it).
  mmq=$src/ggml/src/ggml-cpu/amx/mmq.cpp
  if ! grep -q 'tpde: keep the tile config' "$mmq"; then
    python3 - "$mmq" <<'PY'
import sys
p = sys.argv[1]
s = open(p).read()
old = "    _tile_loadconfig(&tc);\n    done = true;"
assert s.count(old) == 1, "AMX tile-config patch: anchor not found in " + p
s = s.replace(old, '    asm volatile("" : : "m"(tc) : "memory"); // tpde: keep the tile config stores\n' + old)
open(p, "w").write(s)
PY
  fi

  if [ ! -x "$dir/venv/bin/cmake" ]; then
    python3 -m venv "$dir/venv"
    "$dir/venv/bin/pip" install --quiet "cmake==$CMAKE_PYPI_VERSION"
  fi
  cmake=$dir/venv/bin/cmake

  start=$(date +%s)
  nice -n 19 "$cmake" -S "$src" -B "$dir/build" \
    -DCMAKE_BUILD_TYPE=Release \
    -DBUILD_SHARED_LIBS=OFF \
    -DGGML_NATIVE=ON -DGGML_CPU=ON \
    -DGGML_CUDA=OFF -DGGML_BLAS=OFF -DGGML_VULKAN=OFF -DGGML_METAL=OFF -DGGML_OPENCL=OFF \
    -DGGML_RPC=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF \
    -DLLAMA_OPENSSL=OFF \
    -DLLAMA_BUILD_COMMIT="$LLAMA_CPP_COMMIT" \
    >"$dir/cmake-configure.log" 2>&1 || { tail -40 "$dir/cmake-configure.log" >&2; exit 1; }
  nice -n 19 "$cmake" --build "$dir/build" --config Release -j "$jobs" --target "${targets[@]}" \
    >"$dir/cmake-build.log" 2>&1 || { tail -40 "$dir/cmake-build.log" >&2; exit 1; }
  echo "llama_cpp.sh: build took $(( $(date +%s) - start )) s (log: $dir/cmake-build.log)" >&2
fi

"$bin/llama-bench" --version >&2 || true

if [ $# -eq 0 ]; then
  echo "llama_cpp.sh: built; pass a GGUF to benchmark it" >&2
  exit 0
fi
model=$1
[ -f "$model" ] || { echo "llama_cpp.sh: no such model: $model" >&2; exit 2; }

"$bin/llama-bench" -m "$model" -t 2 -p 0 -n 32 -r 5
"$bin/llama-bench" -m "$model" -t 2 -p 512 -n 128 -r 3 -o json
