#!/usr/bin/env bash
# `make run`: the embedded default. Creates a demo API key and a demo tenant-admin key (for the
# console) in the SQLite ledger, an admin token for the operator unless TIDEPOOL_ADMIN_TOKEN is
# set, prints a ready-to-paste curl line and the console's address, then runs `tidepool serve`
# in the foreground (Ctrl-C stops it).
set -euo pipefail
bin=$1 config=$2 listen=$3
db_url=$(sed -n 's/^database_url *= *"\(.*\)"/\1/p' "$config" | head -n1)
key=$("$bin" keys create --database-url "$db_url" --tenant demo --create-tenant --name "make-run-$(date +%s)" | grep -o 'tp-[A-Za-z0-9_-]*' | head -n1)
[[ -n $key ]] || { echo "could not create a demo key" >&2; exit 1; }
admin_key=$("$bin" keys create --database-url "$db_url" --tenant demo --name "console-$(date +%s)" --role tenant-admin | grep -o 'tp-[A-Za-z0-9_-]*' | head -n1)
export TIDEPOOL_ADMIN_TOKEN=${TIDEPOOL_ADMIN_TOKEN:-$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')}
# Pay-as-you-go: requests reserve against the tenant's prepaid balance. Give the demo 5 USD.
"$bin" credit add --database-url "$db_url" --tenant demo 5 --note "make run demo credit" >/dev/null
cat <<MSG

Tidepool is starting on http://$listen (models load in a few seconds). Your demo key: $key
Try:

  curl -N http://$listen/v1/chat/completions -H "Authorization: Bearer $key" -H 'Content-Type: application/json' \\
    -d '{"model":"smollm2-135m-instruct","stream":true,"messages":[{"role":"user","content":"Say hello in French."}]}'

The console: http://$listen/console/
  sign in as the demo tenant with  $admin_key
  or as the operator with          $TIDEPOOL_ADMIN_TOKEN

MSG
exec "$bin" serve --config "$config" --listen "$listen"
