#!/usr/bin/env bash
# `make run`: the embedded default. Creates a demo API key in the SQLite ledger, prints a
# ready-to-paste curl line, then runs `tidepool serve` in the foreground (Ctrl-C stops it).
set -euo pipefail
bin=$1 config=$2 listen=$3
db_url=$(sed -n 's/^database_url *= *"\(.*\)"/\1/p' "$config" | head -n1)
key=$("$bin" keys create --database-url "$db_url" --tenant demo --create-tenant --name "make-run-$(date +%s)" | grep -o 'tp-[A-Za-z0-9_-]*' | head -n1)
[[ -n $key ]] || { echo "could not create a demo key" >&2; exit 1; }
# Pay-as-you-go: requests reserve against the tenant's prepaid balance. Give the demo 5 USD.
"$bin" credit add --database-url "$db_url" --tenant demo 5 --note "make run demo credit" >/dev/null
cat <<MSG

Tidepool is starting on http://$listen (models load in a few seconds). Your demo key: $key
Try:

  curl -N http://$listen/v1/chat/completions -H "Authorization: Bearer $key" -H 'Content-Type: application/json' \\
    -d '{"model":"smollm2-135m-instruct","stream":true,"messages":[{"role":"user","content":"Say hello in French."}]}'

MSG
exec "$bin" serve --config "$config" --listen "$listen"
