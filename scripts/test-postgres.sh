#!/usr/bin/env bash
# The throwaway PostgreSQL cluster that the Rust tests start for themselves when
# TIDEPOOL_TEST_POSTGRES_URL is unset and nothing answers at 127.0.0.1:5432
# (crates/tidepool-ledger/src/testing/postgres.rs). It is shared by every test process of a run
# and outlives them; `make rust-test` runs `scripts/test-postgres.sh stop` at the end.
#
#   scripts/test-postgres.sh status   # its URL, or that none runs
#   scripts/test-postgres.sh stop     # stop it and delete its directory (no-op if none)
set -euo pipefail

base="${TMPDIR:-/tmp}"
base="${base%/}/tidepool-test-postgres-$(id -u)"
lock="$base.lock"

case "${1:-}" in
  status)
    if [[ -f "$base/port" ]]; then
      echo "postgres://postgres@127.0.0.1:$(cat "$base/port")/postgres ($base)"
    else
      echo "no throwaway test cluster ($base)"
    fi
    ;;
  stop)
    [[ -d "$base" ]] || exit 0
    # The same lock the tests take (flock(2), as Rust's File::lock): never stop it while a
    # test process is starting it.
    exec 9>>"$lock"
    flock 9
    if [[ -f "$base/pg_ctl" && -d "$base/cluster/data" ]]; then
      pg_ctl=$(cat "$base/pg_ctl")
      run_as=$(cat "$base/run_as" 2>/dev/null || true)
      cmd=("$pg_ctl" -D "$base/cluster/data" -m fast -w stop)
      if [[ -n "$run_as" ]]; then
        cmd=(runuser -u "$run_as" -- "${cmd[@]}")
      fi
      "${cmd[@]}" >/dev/null 2>&1 || true
    fi
    rm -rf "$base"
    echo "stopped the throwaway test PostgreSQL ($base)"
    ;;
  *)
    echo "usage: $0 status|stop" >&2
    exit 2
    ;;
esac
