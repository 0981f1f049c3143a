#!/usr/bin/env bash
# Dependencies point down: the pool, the simulator and core never pull in tokio (they are sans-IO);
# the pool is the bottom crate: it depends on no other Tidepool crate (core re-exports its
# `ModelId` and `PoolPolicy` and embeds its knobs in `[pool]`); the simulator never depends on the
# engine or gateway; the ledger and engine never on the gateway, and never name the pool
# themselves (they see it only through core's re-exports); the runtime (pool on the engine) never
# on the gateway, the ledger or the simulator. Only the `tidepool` binary depends on the
# benchmarks (`tidepool-bench`). Telemetry (`tidepool-telemetry`: subscriber, OTLP export, trace
# context) sits just above core: it knows no request, model or ledger, and the sans-IO crates
# never pull it in. Every crate root opens with a `//!` header. Within a crate, the
# top-level modules never depend on each other in a cycle (check-module-cycles.py).
set -euo pipefail
fail=0
deps() { cargo tree --locked -p "$1" -e normal --prefix none 2>/dev/null | awk '{print $1}' | sort -u; }
# Only what the crate's own manifest names.
direct_deps() { cargo tree --locked -p "$1" -e normal --depth 1 --prefix none 2>/dev/null | awk '{print $1}' | sort -u; }
forbid() { # crate, forbidden deps...
  local crate=$1; shift
  local have; have=$(deps "$crate")
  for bad in "$@"; do
    if grep -qx "$bad" <<<"$have"; then echo "layering: $crate must not depend on $bad"; fail=1; fi
  done
}
forbid_direct() { # crate, forbidden direct deps...
  local crate=$1; shift
  local have; have=$(direct_deps "$crate")
  for bad in "$@"; do
    if grep -qx "$bad" <<<"$have"; then echo "layering: $crate must not name $bad in its manifest"; fail=1; fi
  done
}
forbid tidepool-pool tokio tidepool-core tidepool-engine tidepool-gateway tidepool-ledger tidepool-sim tidepool-runtime
forbid tidepool-core tokio sqlx axum tidepool-engine tidepool-ledger tidepool-gateway tidepool-sim tidepool-runtime
forbid tidepool-sim tokio tidepool-engine tidepool-gateway tidepool-ledger
forbid tidepool-ledger tidepool-gateway tidepool-engine
forbid_direct tidepool-ledger tidepool-pool
forbid tidepool-engine tidepool-gateway tidepool-ledger
forbid_direct tidepool-engine tidepool-pool
forbid tidepool-runtime tidepool-gateway tidepool-ledger tidepool-sim
forbid tidepool-telemetry tidepool-gateway tidepool-ledger tidepool-engine tidepool-runtime tidepool-sim
forbid_direct tidepool-telemetry tidepool-pool
forbid tidepool-core tidepool-telemetry
forbid tidepool-pool tidepool-telemetry
forbid tidepool-sim tidepool-telemetry
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
