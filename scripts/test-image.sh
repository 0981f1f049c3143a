#!/usr/bin/env bash
# The container image test (`make image-test`, part of `make test`). Goal: the image that
# deploy/Dockerfile's `runtime` target builds serves a real chat completion as its own user on a
# read-only root filesystem, with only its volumes writable.
#
# Method:
#   1. static checks: the runtime targets have no RUN, a numeric non-root USER, a HEALTHCHECK and
#      pinned bases (scripts/check-dockerfile.py, which also proves each rule can fail); the
#      image's configuration differs from the shipped tidepool.toml only in [server];
#   2. a Debian bookworm minbase root filesystem made with debootstrap (cached as a tarball) is
#      imported as debian:bookworm-slim, in a podman storage private to this run;
#   3. `podman build --target runtime` with a prebuilt binary (no RUN step may execute);
#   4. in private mount, network and PID namespaces, without a container runtime: the image is
#      mounted read-only, its volumes are bind-mounted (a data directory initialised like a new
#      volume, the models read-only), and its ENTRYPOINT/CMD runs chrooted as its USER with
#      exactly its Env and WorkingDir; the image's binary creates a key and credit, then one chat
#      completion must answer 200 with content and completion tokens; the process must run as
#      uid/gid 10001, the image's HEALTHCHECK command must pass while it runs and fail against a
#      closed port and after it stops, and the root filesystem must be unchanged;
#   5. the same image under `podman run --read-only` with a named data volume: a key made with
#      `podman exec`, one chat completion, uid 10001, `podman healthcheck run`, no write to the
#      root filesystem, exit code 0 on `podman stop`.
# Everything it creates (podman storage, mounts, processes) goes away when it exits; only the
# base tarball is kept.
#
# Usage: test-image.sh DEBUG_BIN RELEASE_BIN
#   The binary is RELEASE_BIN (`make build`) when it exists and is not older than DEBUG_BIN,
#   else DEBUG_BIN (which `make test` builds anyway); TIDEPOOL_IMAGE_BIN overrides both.
# Env: TIDEPOOL_CACHE (default ~/.cache/tidepool), TIDEPOOL_MODELS_DIR, TIDEPOOL_DEBIAN_MIRROR.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cache=${TIDEPOOL_CACHE:-$HOME/.cache/tidepool}
models=${TIDEPOOL_MODELS_DIR:-$cache/models}
image_cache=$cache/image
base_tar=$image_cache/bookworm-minbase.tar
image=localhost/tidepool:image-test
user_expected=10001:10001

fail() { echo "image test: FAIL: $*" >&2; exit 1; }
note() { echo "image test: $*"; }
phase_start=$SECONDS
phase() { note "$1 ($((SECONDS - phase_start)) s)"; phase_start=$SECONDS; }

# ---- inside the namespaces (see the end of the file for how this is entered) -----------------
if [[ ${1:-} == --inner ]]; then
  work=$2 bin=$3
  podman() {
    command podman --root "$work/storage" --runroot "$work/run" --tmpdir "$work/libpod" \
      --events-backend none "$@"
  }
  ip link set lo up

  podman import -q "$base_tar" docker.io/library/debian:bookworm-slim >/dev/null
  phase "base image imported"

  # The prebuilt context: the binary and the libraries it needs that the base lacks, which
  # must be exactly what the Dockerfile's build stage copies (libgomp.so.1).
  mkdir -p "$work/prebuilt/lib"
  ln "$bin" "$work/prebuilt/tidepool" 2>/dev/null || cp "$bin" "$work/prebuilt/tidepool"
  tar -tf "$base_tar" | sed -n 's#^\./##p' >"$work/base-files"
  while read -r soname path; do
    if ! grep -qxF -e "usr/lib/x86_64-linux-gnu/$soname" -e "lib/x86_64-linux-gnu/$soname" \
      -e "usr/lib/$soname" -e "lib/$soname" "$work/base-files"; then
      [[ $soname == libgomp.so.1 ]] || fail "the binary needs $soname, which debian:bookworm-slim lacks and deploy/Dockerfile does not copy"
      cp -L "$path" "$work/prebuilt/lib/$soname"
    fi
  done < <(ldd "$bin" | awk '$2 == "=>" && $3 ~ /^\// { print $1, $3 }')
  [[ -f $work/prebuilt/lib/libgomp.so.1 ]] || fail "the binary no longer links libgomp.so.1: drop its COPY from deploy/Dockerfile"

  podman build --pull=never --format docker -f "$repo/deploy/Dockerfile" --target runtime \
    --build-arg TIDEPOOL_BINARY_STAGE=prebuilt --build-context tidepool-prebuilt="$work/prebuilt" \
    -t "$image" "$repo" >"$work/build.log" 2>&1 || { cat "$work/build.log" >&2; fail "podman build"; }
  grep -q ' AS build$' "$work/build.log" && fail "the build stage ran although the binary was prebuilt"
  phase "image built (--target runtime, prebuilt binary)"

  # The image's configuration, as a container runtime would read it.
  podman image inspect "$image" >"$work/inspect.json"
  python3 - "$work/inspect.json" "$work" <<'PY'
import json, sys
inspect = json.load(open(sys.argv[1]))[0]
c, work = inspect["Config"], sys.argv[2]
problems = []
if c.get("User") != "10001:10001":
    problems.append(f"User is {c.get('User')!r}")
if set(c.get("Volumes") or {}) != {"/var/lib/tidepool", "/models"}:
    problems.append(f"Volumes are {sorted(c.get('Volumes') or {})}")
if "8080/tcp" not in (c.get("ExposedPorts") or {}):
    problems.append("8080/tcp is not exposed")
# The OCI view (Config) has no health check; podman shows the docker-format one beside it.
test = (inspect.get("Healthcheck") or {}).get("Test") or []
if not test or test[0] != "CMD":
    problems.append(f"no exec-form HEALTHCHECK (Test = {test})")
if problems:
    sys.exit("image config: " + "; ".join(problems))
def lines(name, items):
    with open(f"{work}/{name}", "w") as f:
        f.write("".join(f"{i}\n" for i in items))
lines("env", c.get("Env") or [])
lines("argv", (c.get("Entrypoint") or []) + (c.get("Cmd") or []))
lines("entrypoint", c.get("Entrypoint") or [])
lines("healthcheck", test[1:])
lines("workdir", [c.get("WorkingDir") or "/"])
PY
  mapfile -t image_env <"$work/env"
  mapfile -t image_argv <"$work/argv"
  mapfile -t image_entrypoint <"$work/entrypoint"
  mapfile -t image_healthcheck <"$work/healthcheck"
  workdir=$(cat "$work/workdir")

  root=$(podman image mount "$image")
  findmnt -no OPTIONS "$root" | grep -qE '(^|,)ro(,|$)' || fail "the image is not mounted read-only"
  # What a runtime gives every container: /proc, a minimal /dev. No /tmp: a read-only root
  # must be enough (docker run --read-only gives no tmpfs unless asked).
  mount -t proc proc "$root/proc"
  mount -t tmpfs -o mode=755,nosuid tmpfs "$root/dev"
  for node in null:1:3 zero:1:5 full:1:7 random:1:8 urandom:1:9 tty:5:0; do
    IFS=: read -r name major minor <<<"$node"
    mknod -m 666 "$root/dev/$name" c "$major" "$minor"
  done
  mkdir "$root/dev/shm" && mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs "$root/dev/shm"
  ln -s /proc/self/fd "$root/dev/fd"
  # A new volume starts as a copy of the image's directory, owner and mode included.
  mkdir "$work/data"
  cp -a "$root/var/lib/tidepool/." "$work/data/"
  chown --reference="$root/var/lib/tidepool" "$work/data"
  chmod --reference="$root/var/lib/tidepool" "$work/data"
  mount --bind "$work/data" "$root/var/lib/tidepool"
  mount --bind "$models" "$root/models" && mount -o remount,bind,ro "$root/models"
  manifest() { # the root filesystem without the mount points above
    (cd "$root" && find . \( -path ./proc -o -path ./dev -o -path ./var/lib/tidepool -o -path ./models \) -prune \
      -o -printf '%p %y %m %U:%G %s %T@ %l\n' | sort)
  }
  manifest >"$work/manifest.before"

  # One chat completion with KEY: 200, content, completion tokens. SHOW_LOG runs on failure.
  chat() {
    local status
    status=$(curl -s --noproxy '*' -o "$work/chat.json" -w '%{http_code}' http://127.0.0.1:8080/v1/chat/completions \
      -H "Authorization: Bearer $1" -H 'Content-Type: application/json' \
      -d '{"model":"smollm2-135m-instruct","max_tokens":24,"messages":[{"role":"user","content":"Say hello in French."}]}')
    [[ $status == 200 ]] || { cat "$work/chat.json" >&2; $2 >&2; fail "chat completion answered $status"; }
    python3 - "$work/chat.json" <<'PY' || fail "chat completion body: $(cat "$work/chat.json")"
import json, sys
r = json.load(open(sys.argv[1]))
content = r["choices"][0]["message"]["content"]
assert isinstance(content, str) and content.strip(), "empty content"
assert r["usage"]["completion_tokens"] > 0, "no completion tokens"
print(f"image test: chat answered {r['usage']['completion_tokens']} tokens: {content.strip()[:60]!r}")
PY
  }
  # Polls /healthz while ALIVE succeeds; the deadline is against a hang, not a timing assertion.
  wait_healthz() { # ALIVE SHOW_LOG
    for _ in $(seq 600); do
      $1 || { $2 >&2; fail "the server exited"; }
      curl -sf --noproxy '*' -o /dev/null http://127.0.0.1:8080/healthz && return 0
      sleep 0.2
    done
    $2 >&2
    fail "/healthz did not answer"
  }

  # As `podman run IMAGE ARGS…` would: the image's user, Env and WorkingDir.
  image_cmd() { cmd=(chroot --userspec="$user_expected" "$root" /usr/bin/env -i -C "$workdir" "${image_env[@]}" "$@"); }
  in_image() { image_cmd "$@"; "${cmd[@]}"; }
  key=$(in_image "${image_entrypoint[@]}" keys create --tenant image-test --create-tenant --name image-test \
    | grep -o 'tp-[A-Za-z0-9_-]*' | head -n1) || true
  [[ -n $key ]] || fail "tidepool keys create in the image printed no key"
  in_image "${image_entrypoint[@]}" credit add --tenant image-test 1 --note "image test" >/dev/null
  [[ $(stat -c %u:%g "$work/data/tidepool.db") == "$user_expected" ]] ||
    fail "the ledger is not at /var/lib/tidepool/tidepool.db owned by $user_expected"
  phase "key and credit created by the image's binary"

  image_cmd "${image_argv[@]}"
  "${cmd[@]}" >"$work/serve.log" 2>&1 & # a simple command: $! is chroot, which execs env, which execs tidepool
  pid=$!
  wait_healthz "kill -0 $pid" "cat $work/serve.log"
  phase "server up"

  [[ $(awk '/^Uid:/ { print $2, $3, $4, $5 }' "/proc/$pid/status") == "10001 10001 10001 10001" ]] ||
    fail "the server does not run as uid 10001: $(grep -E '^(Uid|Gid):' "/proc/$pid/status")"
  [[ $(awk '/^Gid:/ { print $2, $3, $4, $5 }' "/proc/$pid/status") == "10001 10001 10001 10001" ]] ||
    fail "the server does not run as gid 10001: $(grep -E '^(Uid|Gid):' "/proc/$pid/status")"
  [[ $(cat "/proc/$pid/comm") == tidepool ]] || fail "pid $pid is $(cat "/proc/$pid/comm"), not tidepool"

  chat "$key" "cat $work/serve.log"
  phase "chat completion answered"

  in_image "${image_healthcheck[@]}" || fail "the image's HEALTHCHECK fails against the running server"
  in_image TIDEPOOL_LISTEN=0.0.0.0:1 "${image_healthcheck[@]}" 2>/dev/null &&
    fail "the image's HEALTHCHECK passes against a port nothing listens on"
  kill -TERM "$pid"
  code=0; wait "$pid" || code=$?
  [[ $code == 0 ]] || { cat "$work/serve.log" >&2; fail "tidepool serve exited with $code on SIGTERM"; }
  in_image "${image_healthcheck[@]}" 2>/dev/null && fail "the image's HEALTHCHECK passes after the server stopped"

  manifest >"$work/manifest.after"
  diff "$work/manifest.before" "$work/manifest.after" >&2 || fail "the image's root filesystem changed"
  phase "uid, healthcheck, read-only root checked; server stopped"

  # The same image under podman: a read-only container with a named volume, the image's user
  # and HEALTHCHECK. crun cannot start a container on a hybrid cgroup hierarchy whose v2 part
  # holds controllers, nor raise limits past the hard ones: the v2 mount is dropped in this
  # mount namespace only, cgroups are not used, and the limits are this process's own.
  if mountpoint -q /sys/fs/cgroup/unified && [[ -n $(cat /sys/fs/cgroup/unified/cgroup.controllers) ]]; then
    umount /sys/fs/cgroup/unified
  fi
  limit() { local v; v=$(ulimit "$1"); [[ $v == unlimited ]] && v=-1; echo "$v"; }
  podman volume create image-test-data >/dev/null
  podman run -d --name image-test --cgroups=disabled --network host --health-interval disable \
    --ulimit "nofile=$(limit -Sn):$(limit -Hn)" --ulimit "nproc=$(limit -Su):$(limit -Hu)" \
    --read-only --read-only-tmpfs=false -v image-test-data:/var/lib/tidepool -v "$models:/models:ro" \
    "$image" >/dev/null 2>"$work/run.err" || { cat "$work/run.err" >&2; fail "podman run"; }
  running() { [[ $(podman inspect --format '{{.State.Running}}' image-test) == true ]]; }
  wait_healthz running "podman logs image-test"
  phase "container up (podman run --read-only)"
  key=$(podman exec image-test tidepool keys create --tenant image-test --create-tenant --name image-test-run \
    | grep -o 'tp-[A-Za-z0-9_-]*' | head -n1) || true
  [[ -n $key ]] || fail "podman exec tidepool keys create printed no key"
  podman exec image-test tidepool credit add --tenant image-test 1 --note "image test" >/dev/null
  chat "$key" "podman logs image-test"
  cpid=$(podman inspect --format '{{.State.Pid}}' image-test)
  [[ $(awk '/^Uid:/ { print $2, $3, $4, $5 }' "/proc/$cpid/status") == "10001 10001 10001 10001" ]] ||
    fail "the container does not run as uid 10001: $(grep -E '^(Uid|Gid):' "/proc/$cpid/status")"
  podman healthcheck run image-test >/dev/null || fail "podman healthcheck run: not healthy"
  podman exec image-test touch /var/lib/tidepool/.probe || fail "the data volume is not writable by the image's user"
  podman exec image-test touch /probe 2>/dev/null && fail "the container's root filesystem is writable"
  # Beyond the files podman itself mounts (/etc/hosts, /etc/hostname, /etc/resolv.conf,
  # /run/.containerenv), nothing may differ from the image.
  changes=$(podman diff image-test | grep -vxE 'C /etc|[AC] /etc/(hosts|hostname|resolv\.conf)|[AC] /run(/\.containerenv)?' || true)
  [[ -z $changes ]] || fail "the container changed its root filesystem: $changes"
  # (podman logs an error on stop and rm when there is no systemd to remove a health check timer
  # from; the timer is disabled above, so the output is kept for failures only.)
  podman stop -t 30 image-test >/dev/null 2>"$work/podman.err" || { cat "$work/podman.err" >&2; fail "podman stop"; }
  [[ $(podman inspect --format '{{.State.ExitCode}}' image-test) == 0 ]] ||
    { podman logs image-test >&2; fail "the container exited with $(podman inspect --format '{{.State.ExitCode}}' image-test)"; }
  podman rm image-test >/dev/null 2>"$work/podman.err" || { cat "$work/podman.err" >&2; fail "podman rm"; }
  podman volume rm image-test-data >/dev/null
  phase "container: key by podman exec, chat, uid, healthcheck, no root filesystem change, clean stop"
  exit 0
fi

# ---- outside: checks, the base tarball, then the namespaces -----------------------------------
start=$SECONDS
debug_bin=${1:?usage: test-image.sh DEBUG_BIN RELEASE_BIN} release_bin=${2:?usage: test-image.sh DEBUG_BIN RELEASE_BIN}
if [[ -n ${TIDEPOOL_IMAGE_BIN:-} ]]; then
  bin=$TIDEPOOL_IMAGE_BIN
elif [[ -x $release_bin && (! -e $debug_bin || ! $release_bin -ot $debug_bin) ]]; then
  bin=$release_bin
else
  bin=$debug_bin
fi
[[ -x $bin ]] || fail "no tidepool binary at $bin (run make build-debug)"
note "binary $bin"

python3 "$repo/scripts/check-dockerfile.py" --self-test "$repo/deploy/Dockerfile" || fail "deploy/Dockerfile"
diff <(sed -n '/^\[engine\]/,$p' "$repo/tidepool.toml") <(sed -n '/^\[engine\]/,$p' "$repo/deploy/tidepool.toml") >&2 ||
  fail "deploy/tidepool.toml differs from tidepool.toml outside [server]: copy the change over"
phase "Dockerfile and image configuration checked"

[[ $(id -u) == 0 ]] || fail "needs root (chroot, mounts, podman storage)"
for tool in podman debootstrap chroot unshare curl ip; do
  command -v "$tool" >/dev/null || fail "$tool is missing (make apt installs it)"
done
for f in SmolLM2-135M-Instruct.Q4_1.gguf gemma-3-270m-q4_k_m.gguf all-minilm-l6-v2/model.safetensors; do
  [[ -f $models/$f ]] || fail "model $models/$f is missing (make models)"
done

# The stand-in for debian:bookworm-slim: what debuerreotype builds it from (debootstrap
# --variant=minbase), slimmed the same way (no apt lists or caches, docs, man pages, locales).
if [[ ! -f $base_tar ]]; then
  mirror=${TIDEPOOL_DEBIAN_MIRROR:-}
  if [[ -z $mirror ]]; then # the mirror apt already uses for bookworm
    mirror=$(cat /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '
      /^URIs:/ { uri = $2 } /^Suites:/ { for (i = 2; i <= NF; i++) if ($i == "bookworm") found = uri }
      /^$/ { uri = "" } END { print found }')
  fi
  if [[ -z $mirror ]]; then
    mirror=$(awk '$1 == "deb" { for (i = 2; i <= NF; i++) if ($i !~ /^\[/ && $i ~ /:\/\//) { if ($(i + 1) == "bookworm") { print $i; exit } } }' \
      /etc/apt/sources.list 2>/dev/null || true)
  fi
  mirror=${mirror:-http://deb.debian.org/debian}
  note "debootstrap bookworm minbase from $mirror"
  mkdir -p "$image_cache"
  rootfs=$image_cache/rootfs.tmp
  rm -rf "$rootfs"
  debootstrap --variant=minbase bookworm "$rootfs" "$mirror" >"$image_cache/debootstrap.log" 2>&1 ||
    { tail -20 "$image_cache/debootstrap.log" >&2; fail "debootstrap (log: $image_cache/debootstrap.log)"; }
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/lib/apt/lists/* \
    "$rootfs"/dev/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/locale/* "$rootfs"/usr/share/info/*
  find "$rootfs/usr/share/doc" -mindepth 1 ! -type d ! -name copyright -delete
  tar --numeric-owner -C "$rootfs" -cf "$base_tar.tmp" . && mv "$base_tar.tmp" "$base_tar"
  rm -f "$image_cache/debootstrap.log"
  rm -rf "$rootfs"
  phase "base tarball made"
fi

mkdir -p "$image_cache"
work=$(mktemp -d "$image_cache/run.XXXXXX")
trap 'rm -rf "$work"' EXIT
trap 'exit 1' INT TERM
# Private mount, network and PID namespaces: every mount, the server's port and its processes
# end with the inner script (the kernel kills what is left in the PID namespace).
unshare --mount --propagation private --net --pid --fork --mount-proc \
  env TIDEPOOL_CACHE="$cache" TIDEPOOL_MODELS_DIR="$models" "$0" --inner "$work" "$bin"
rm -rf "$work"
trap - EXIT
note "PASS ($((SECONDS - start)) s, cleanup included)"
