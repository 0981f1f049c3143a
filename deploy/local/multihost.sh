#!/usr/bin/env bash
# Tidepool's scaled-out topology on one Linux machine, every host a network namespace on one
# bridge (docs/deploy.md, "Several hosts on one machine"):
#
#   10.231.<net>.1   this shell (the client)
#   10.231.<net>.2   lb    HAProxy: health-checks /readyz, retries refused or emptied requests
#   10.231.<net>.5   db    PostgreSQL (a fresh cluster made with initdb)
#   10.231.<net>.11  gw1   tidepool serve (replica gw1)
#   10.231.<net>.12  gw2   tidepool serve (replica gw2)
#   10.231.<net>.21  weu   tidepool worker --region eu   (SmolLM2)
#   10.231.<net>.22  wus   tidepool worker --region us   (SmolLM2)
#
# Usage (as root; needs iproute2, haproxy and Debian's postgresql package):
#   deploy/local/multihost.sh up   [state-dir]   # builds nothing: TIDEPOOL_BIN or the release binary
#   deploy/local/multihost.sh down [state-dir]
# Then: curl http://10.231.<net>.2:8080/v1/chat/completions with the key `up` prints; kill a
# gateway (`kill -9 $(cat state/gw1.pid)`) or a worker and watch the traffic move.
set -euo pipefail

cmd=${1:-}
state=${2:-multihost-state}
net=${MULTIHOST_NET:-250}
bin=${TIDEPOOL_BIN:-${CARGO_TARGET_DIR:-$HOME/.cache/tidepool/target}/release/tidepool}
models=${TIDEPOOL_MODELS_DIR:-$HOME/.cache/tidepool/models}
addr() { echo "10.231.$net.$1"; }
hosts=(lb:2 db:5 gw1:11 gw2:12 weu:21 wus:22)

pg_bin() {
    local dir
    dir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n1)
    [[ -n $dir ]] || { echo "no PostgreSQL server binaries: apt-get install postgresql" >&2; exit 1; }
    echo "$dir"
}

as_postgres() { if [[ $(id -u) == 0 ]]; then runuser -u postgres -- "$@"; else "$@"; fi; }

down() {
    for pidfile in "$state"/*.pid; do
        [[ -e $pidfile ]] && kill -9 "$(cat "$pidfile")" 2>/dev/null || true
        rm -f "$pidfile"
    done
    if [[ -d $state/pg/data ]]; then
        ip netns exec "tpm${net}db" runuser -u postgres -- "$(pg_bin)/pg_ctl" -D "$state/pg/data" -m fast stop >/dev/null 2>&1 || true
    fi
    for h in "${hosts[@]}" sw:0; do
        ns="tpm${net}${h%%:*}"
        { ip netns pids "$ns" 2>/dev/null || true; } | xargs -r kill -9
        ip netns del "$ns" 2>/dev/null || true
    done
    ip link del "tpm${net}r" 2>/dev/null || true
}

# Starts `$@` in host $1's namespace in the background; its pid goes to state/<name>.pid.
start() {
    local name=$1
    shift
    ip netns exec "tpm${net}${name}" "$@" >"$state/$name.log" 2>&1 &
    echo $! >"$state/$name.pid"
}

wait_ready() { # url
    for _ in $(seq 1 600); do
        curl -sf -o /dev/null "$1" && return 0
        sleep 0.2
    done
    echo "not ready: $1 (see $state/*.log)" >&2
    exit 1
}

up() {
    [[ -x $bin ]] || { echo "no binary at $bin: run 'make build' or set TIDEPOOL_BIN" >&2; exit 1; }
    down
    mkdir -p "$state"
    state=$(cd "$state" && pwd)
    # The switch and this shell's leg on it.
    sw="tpm${net}sw"
    ip netns add "$sw"
    ip -n "$sw" link add br0 type bridge && ip -n "$sw" link set br0 up
    ip link add "tpm${net}r" type veth peer name "tpm${net}rp"
    ip link set "tpm${net}rp" netns "$sw" && ip -n "$sw" link set "tpm${net}rp" master br0 up
    ip addr add "$(addr 1)/24" dev "tpm${net}r" && ip link set "tpm${net}r" up
    for h in "${hosts[@]}"; do
        name=${h%%:*} n=${h##*:} ns="tpm${net}${h%%:*}"
        ip netns add "$ns"
        ip link add "tpm${net}h$n" type veth peer name "tpm${net}s$n"
        ip link set "tpm${net}s$n" netns "$sw" && ip -n "$sw" link set "tpm${net}s$n" master br0 up
        ip link set "tpm${net}h$n" netns "$ns" && ip -n "$ns" link set "tpm${net}h$n" name eth0
        ip -n "$ns" addr add "$(addr "$n")/24" dev eth0
        ip -n "$ns" link set eth0 up && ip -n "$ns" link set lo up
    done

    # PostgreSQL on host db, trusting the private subnet only.
    mkdir -p "$state/pg" && chown postgres: "$state/pg" 2>/dev/null || true
    as_postgres "$(pg_bin)/initdb" -A trust -U postgres -D "$state/pg/data" >/dev/null
    echo "host all all 10.231.$net.0/24 trust" >>"$state/pg/data/pg_hba.conf"
    ip netns exec "tpm${net}db" runuser -u postgres -- "$(pg_bin)/pg_ctl" -D "$state/pg/data" -w \
        -o "-c listen_addresses=$(addr 5) -c unix_socket_directories=$state/pg" -l "$state/pg/log" start >/dev/null
    as_postgres "$(pg_bin)/createdb" -h "$(addr 5)" -U postgres tidepool
    db_url="postgres://postgres@$(addr 5):5432/tidepool"

    # Workers: SmolLM2 on each, with their own SQLite ledger and one key for the gateways.
    backends=""
    for w in weu:eu:21 wus:us:22; do
        name=${w%%:*} rest=${w#*:}; region=${rest%%:*} n=${rest##*:}
        mkdir -p "$state/$name"
        cat >"$state/$name/tidepool.toml" <<TOML
[server]
listen = "$(addr "$n"):8080"
database_url = "sqlite://$state/$name/tidepool.db"
models_dir = "$models"

[billing]
enforce = false

[[models]]
id = "smollm2-135m-instruct"
kind = "chat"
file = "SmolLM2-135M-Instruct.Q4_1.gguf"
context_tokens = 2048
seqs_max = 8
TOML
        "$bin" keys create --config "$state/$name/tidepool.toml" --tenant gateways --create-tenant --name gateways \
            | grep -o 'tp-[A-Za-z0-9_-]*' | head -n1 >"$state/$name.key"
        start "$name" "$bin" worker --config "$state/$name/tidepool.toml" --region "$region" --zone "$region-a"
        backends+="[[backends]]
id = \"$name\"
kind = \"worker\"
url = \"http://$(addr "$n"):8080\"
region = \"$region\"
zone = \"$region-a\"
api_key_file = \"$state/$name.key\"
models = [\"smollm2-135m-instruct\"]

"
    done

    wait_ready "http://$(addr 21):8080/healthz"
    wait_ready "http://$(addr 22):8080/healthz"
    # The schema first (as a Kubernetes migration Job would), then two gateway replicas.
    "$bin" migrate --database-url "$db_url"
    for g in gw1:11 gw2:12; do
        name=${g%%:*} n=${g##*:}
        mkdir -p "$state/$name"
        cat >"$state/$name/tidepool.toml" <<TOML
[server]
listen = "$(addr "$n"):8080"
database_url = "$db_url"
region = "eu"
zone = "eu-a"
migrate_on_start = false

[[models]]
id = "smollm2-135m-instruct"
kind = "chat"
backend = "remote"
price_input_per_mtok = 50_000_000
price_output_per_mtok = 200_000_000

$backends
TOML
        start "$name" "$bin" serve --config "$state/$name/tidepool.toml" --replica-id "$name"
    done
    wait_ready "http://$(addr 11):8080/readyz"
    wait_ready "http://$(addr 12):8080/readyz"

    # With no gateway ready the load balancer answers like a gateway would: OpenAI-shaped 503.
    printf 'HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\nCache-Control: no-cache\r\nConnection: close\r\n\r\n{"error":{"message":"no gateway is ready, retry later","type":"server_error","param":null,"code":"unavailable"}}\n' >"$state/503.http"
    cat >"$state/haproxy.cfg" <<CFG
global
    maxconn 4096
defaults
    mode http
    timeout connect 1s
    timeout client 60s
    timeout server 60s
    retries 3
    option redispatch 1
    retry-on conn-failure empty-response response-timeout
    errorfile 503 $state/503.http
frontend api
    bind $(addr 2):8080
    default_backend gateways
backend gateways
    balance roundrobin
    option httpchk GET /readyz
    http-check expect status 200
    default-server inter 250ms fastinter 100ms downinter 250ms fall 2 rise 2
    server gw1 $(addr 11):8080 check
    server gw2 $(addr 12):8080 check
CFG
    start lb haproxy -db -f "$state/haproxy.cfg"
    wait_ready "http://$(addr 2):8080/readyz"

    key=$("$bin" keys create --database-url "$db_url" --tenant demo --create-tenant --name multihost \
        | grep -o 'tp-[A-Za-z0-9_-]*' | head -n1)
    "$bin" credit add --database-url "$db_url" --tenant demo 5 --note "multihost demo credit" >/dev/null
    cat <<MSG

Up: load balancer http://$(addr 2):8080, gateways $(addr 11) and $(addr 12), workers eu $(addr 21)
and us $(addr 22), PostgreSQL $db_url. Logs and pids in $state. Demo key: $key

  curl http://$(addr 2):8080/v1/chat/completions -H "Authorization: Bearer $key" -H 'Content-Type: application/json' \\
    -d '{"model":"smollm2-135m-instruct","messages":[{"role":"user","content":"Say hello in French."}]}'

MSG
}

case $cmd in
up) up ;;
down) down ;;
*) echo "usage: $0 up|down [state-dir]" >&2; exit 2 ;;
esac
