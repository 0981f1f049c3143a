#!/usr/bin/env bash
# Dependencies point down: the pool, the simulator and core never pull in tokio (they are sans-IO);
# the pool never depends on the engine, gateway or ledger; the simulator never on the engine or
# gateway; the ledger and engine never on the gateway; the runtime (pool on the engine) never on
# the gateway, the ledger or the simulator. Only the `tidepool` binary depends on the benchmarks
# (`tidepool-bench`). Every crate root opens with a `//!` header. Within a crate, the top-level
# modules never depend on each other in a cycle (check-module-cycles.py).
set -euo pipefail
fail=0
deps() { cargo tree --locked -p "$1" -e normal --prefix none 2>/dev/null | awk '{print $1}' | sort -u; }
forbid() { # crate, forbidden deps...
  local crate=$1; shift
  local have; have=$(deps "$crate")
  for bad in "$@"; do
    if grep -qx "$bad" <<<"$have"; then echo "layering: $crate must not depend on $bad"; fail=1; fi
  done
}
forbid tidepool-core tokio sqlx axum tidepool-pool tidepool-engine tidepool-ledger tidepool-gateway tidepool-sim
forbid tidepool-pool tokio tidepool-engine tidepool-gateway tidepool-ledger tidepool-sim
forbid tidepool-sim tokio tidepool-engine tidepool-gateway tidepool-ledger
forbid tidepool-ledger tidepool-gateway tidepool-engine tidepool-pool
forbid tidepool-engine tidepool-gateway tidepool-ledger tidepool-pool
forbid tidepool-runtime tidepool-gateway tidepool-ledger tidepool-sim
for manifest in crates/*/Cargo.toml; do
  crate=$(basename "$(dirname "$manifest")")
  [[ $crate == tidepool || $crate == tidepool-bench ]] || forbid "$crate" tidepool-bench
done
for root in crates/*/src/lib.rs crates/*/src/main.rs; do
  [[ -f $root ]] || continue
  head -n1 "$root" | grep -q '^//!' || { echo "layering: $root must open with a //! header"; fail=1; }
done
python3 "$(dirname "$0")/check-module-cycles.py" || fail=1
exit $fail
