#!/usr/bin/env bash
# A local Ampora cluster on this machine: 2 gateways and 2 coordinators (the `ampora` binary)
# over the local NATS, Redis and PostgreSQL, behind nginx on one port.
#
# Usage: deploy/local-cluster.sh [--tls] [up|status|down|reset]
#   up      build if needed, start what is not running, wait until ready (the default)
#   status  what runs, and whether each node is ready
#   down    stop everything this script started (by its pid files)
#   reset   down, then drop the database, delete every Redis key under the prefix and the
#           state directory
#   --tls   (or AMPORA_LOCAL_TLS=1) with `up`: nginx terminates TLS with a certificate from a
#           CA generated in the state directory (tls/ca.pem: agents trust it), checks client
#           certificates against the same CA, which the coordinators use as the agent CA, and
#           passes them on; agents bootstrap over wss:// and are issued identities
#
# nginx is the nodes' trusted proxy (tls.trusted_proxies = 127.0.0.1) and proves it with a
# random secret generated into the state directory (proxy-secret, tls.trusted_proxy_secret_file).
#
# Environment:
#   LOCAL_CLUSTER_PORT  nginx port (default 4320); the nodes use the next four ports
#   LOCAL_CLUSTER_BIND  nginx's address (default 127.0.0.1; the nodes listen on 127.0.0.1 only)
#   LOCAL_CLUSTER_DIR   state: configs, logs, pids, nginx prefix, data (default target/local-cluster)
#   LOCAL_CLUSTER_DB    PostgreSQL database, also the NATS subject and Redis key prefix
#                       (default ampora; a second cluster needs its own, and its own port and dir)
#   LOCAL_CLUSTER_BIN   an `ampora` binary to use instead of building target/release/ampora
#   LOCAL_CLUSTER_WAIT  seconds to wait for readiness (default 90)
#   AMPORA_LOCAL_TLS    1: as --tls
# NATS (4222), Redis (6379) and PostgreSQL (5432, trust auth, user postgres) are started, and
# installed with apt-get, when nothing answers on their port; `down` stops them again only if
# this script started them.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

cmd=up
tls_mode="${AMPORA_LOCAL_TLS:-0}"
for arg in "$@"; do
  case "$arg" in
    --tls) tls_mode=1 ;;
    *) cmd="$arg" ;;
  esac
done
case "$tls_mode" in 1 | true | yes) tls_mode=1 ;; *) tls_mode=0 ;; esac

port="${LOCAL_CLUSTER_PORT:-4320}"
bind="${LOCAL_CLUSTER_BIND:-127.0.0.1}"
# Where clients reach nginx: a wildcard bind is reached over loopback.
case "$bind" in 0.0.0.0 | "[::]" | "::") host=127.0.0.1 ;; *) host="$bind" ;; esac
db="${LOCAL_CLUSTER_DB:-ampora}"
[[ $db =~ ^[a-z_][a-z0-9_]*$ ]] || { echo "!! LOCAL_CLUSTER_DB must match [a-z_][a-z0-9_]*" >&2; exit 1; }
wait_secs="${LOCAL_CLUSTER_WAIT:-90}"
state="${LOCAL_CLUSTER_DIR:-target/local-cluster}"
mkdir -p "$state"
state="$(cd "$state" && pwd)"
run="$state/run"
logs="$state/logs"
prefix="$state/nginx"
template="$root/deploy/nginx/ampora.conf.template"
# The proxy secret nginx sends and the nodes check; the CA and nginx's certificate (--tls).
secret_file="$state/proxy-secret"
download_key_file="$state/download-key"
tls_dir="$state/tls"
# What the running cluster was started with (plain or tls), so that status, and an `up`
# that finds it running, know.
mode_file="$state/mode"

nats_port=4222
redis_port=6379
pg_port=5432
# Short enough that `down` is quick; in production the window spreads reconnects out.
drain_window_secs=3

# name:role:port, coordinators first: coordinator-1 starts alone so that it, and only it,
# creates the admin token.
nodes=(
  "coordinator-1:coordinator:$((port + 3))"
  "coordinator-2:coordinator:$((port + 4))"
  "gateway-1:gateway:$((port + 1))"
  "gateway-2:gateway:$((port + 2))"
)

say() { printf '==> %s\n' "$*"; }
warn() { printf '!! %s\n' "$*" >&2; }
die() {
  warn "$*"
  exit 1
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

apt_install() {
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null 2>&1 || {
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@"
  }
}

wait_port() {
  local deadline=$((SECONDS + 20))
  until port_open "$1"; do
    ((SECONDS < deadline)) || die "$2 did not come up on port $1"
    sleep 0.1
  done
}

# The pid in pid file $1 if that process is alive and its command line contains $2 (so a
# recycled pid is never mistaken for ours); fails otherwise.
live_pid() {
  local pid
  [[ -s $1 ]] || return 1
  pid="$(<"$1")"
  [[ $pid =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$2" || return 1
  echo "$pid"
}

node_name() { echo "${1%%:*}"; }
node_role() { local r="${1#*:}"; echo "${r%%:*}"; }
node_port() { echo "${1##*:}"; }
node_conf() { echo "$state/$1/ampora.toml"; }
node_pid() { live_pid "$run/$1.pid" "$(node_conf "$1")"; }
nginx_pid() { live_pid "$prefix/logs/nginx.pid" "$prefix/"; }

# ready PORT [HOST]: the node (or nginx) answers /health/ready with 200.
ready() { curl -fsS -m 2 -o /dev/null "http://${2:-127.0.0.1}:$1/health/ready" 2>/dev/null; }

# nginx answers /health/ready with 200, over TLS (trusting our CA) when it terminates TLS.
nginx_ready() {
  if ((tls_mode)); then
    curl -fsS -m 2 -o /dev/null --cacert "$tls_dir/ca.pem" \
      "https://$host:$port/health/ready" 2>/dev/null
  else
    ready "$port" "$host"
  fi
}

nginx_bin() {
  if [[ -x /usr/sbin/nginx ]]; then
    echo /usr/sbin/nginx
  else
    command -v nginx
  fi
}

ampora_bin() {
  if [[ -n ${LOCAL_CLUSTER_BIN:-} ]]; then
    [[ -x $LOCAL_CLUSTER_BIN ]] || die "LOCAL_CLUSTER_BIN=$LOCAL_CLUSTER_BIN is not executable"
    echo "$LOCAL_CLUSTER_BIN"
    return
  fi
  # cargo decides whether the binary is stale; when it is fresh this takes a second.
  say "cargo build --release -p coordinator --bin ampora" >&2
  cargo build --release -p coordinator --bin ampora >&2
  echo "$root/target/release/ampora"
}

admin_token_path() {
  local spec
  for spec in "${nodes[@]}"; do
    local f
    f="$state/$(node_name "$spec")/data/admin-token"
    if [[ -s $f ]]; then
      echo "$f"
      return
    fi
  done
  return 1
}

# --- secrets and certificates ---------------------------------------------------------------

random_hex() { head -c "$1" /dev/urandom | od -An -tx1 | tr -d ' \n'; }

# The proxy secret: made once, kept until `reset`, so nginx and the nodes always agree.
ensure_proxy_secret() {
  [[ -s $secret_file ]] && return
  say "generating the proxy secret ($secret_file)"
  (umask 077 && random_hex 32 >"$secret_file" && echo >>"$secret_file")
}

# The key of package download credentials, shared by every node: made once, kept until
# `reset`, so credentials a coordinator puts in an offer open builds on every gateway.
ensure_download_key() {
  [[ -s $download_key_file ]] && return
  say "generating the package download key ($download_key_file)"
  (umask 077 && random_hex 32 >"$download_key_file" && echo >>"$download_key_file")
}

# A CA (tls/ca.pem, ca-key.pem) and nginx's server certificate from it (tls/server.pem,
# server-key.pem) for localhost, 127.0.0.1, the agent endpoint's host and this machine's
# name. The CA is the agent CA too, as `ampora serve`'s local CA is: the OTel Collector's
# supervisor trusts the ca_cert of its certificate offer for the server as well.
ensure_tls() {
  local f missing=0
  for f in ca.pem ca-key.pem server.pem server-key.pem; do
    [[ -s $tls_dir/$f ]] || missing=1
  done
  ((missing)) || return 0
  command -v openssl >/dev/null || apt_install openssl
  say "creating a CA and nginx's certificate in $tls_dir"
  rm -rf "$tls_dir"
  (umask 077 && mkdir -p "$tls_dir")
  local sans="IP:127.0.0.1,DNS:localhost" name
  for name in "$host" "$(hostname)"; do
    case ",$sans," in *":$name,"*) continue ;; esac
    if [[ $name =~ ^[0-9.]+$ || $name == *:* ]]; then
      sans+=",IP:$name"
    else
      sans+=",DNS:$name"
    fi
  done
  local ec=(-algorithm EC -pkeyopt ec_paramgen_curve:P-256)
  (
    umask 077
    cd "$tls_dir"
    openssl genpkey "${ec[@]}" -out ca-key.pem 2>/dev/null
    openssl req -x509 -new -key ca-key.pem -sha256 -days 3650 \
      -subj "/CN=Ampora local cluster CA" \
      -addext "basicConstraints=critical,CA:TRUE" \
      -addext "keyUsage=critical,keyCertSign,cRLSign" -out ca.pem
    openssl genpkey "${ec[@]}" -out server-key.pem 2>/dev/null
    openssl req -new -key server-key.pem -subj "/CN=$host" |
      openssl x509 -req -CA ca.pem -CAkey ca-key.pem -set_serial "0x$(random_hex 16)" \
        -days 825 -sha256 -out server.pem -extfile <(
          printf '%s\n' "subjectAltName=$sans" "basicConstraints=critical,CA:FALSE" \
            "keyUsage=critical,digitalSignature" "extendedKeyUsage=serverAuth"
        ) 2>/dev/null
    chmod 644 ca.pem server.pem
  ) || die "openssl could not create the certificates in $tls_dir"
}

# --- backing services -----------------------------------------------------------------------

start_postgres() {
  if ! port_open "$pg_port"; then
    say "starting PostgreSQL"
    command -v pg_ctlcluster >/dev/null || apt_install postgresql
    local version
    version="$(find /etc/postgresql -mindepth 1 -maxdepth 1 -printf '%f\n' | sort -V | tail -n1)"
    [[ -n $version ]] || die "no PostgreSQL cluster under /etc/postgresql"
    pg_ctlcluster --skip-systemctl-redirect "$version" main start
    echo "$version" >"$run/postgres.started"
    wait_port "$pg_port" PostgreSQL
  fi
  command -v psql >/dev/null || apt_install postgresql-client
  local psql=(psql -h 127.0.0.1 -p "$pg_port" -U postgres -d postgres -v ON_ERROR_STOP=1 -qtA)
  if [[ -z "$("${psql[@]}" -c "SELECT 1 FROM pg_database WHERE datname = '$db'")" ]]; then
    say "creating database $db"
    "${psql[@]}" -c "CREATE DATABASE \"$db\""
  fi
}

start_redis() {
  port_open "$redis_port" && return
  say "starting Redis"
  command -v redis-server >/dev/null || apt_install redis-server
  redis-server --daemonize yes --bind 127.0.0.1 --port "$redis_port" --save "" \
    --appendonly no --pidfile "$run/redis.pid" --logfile "$logs/redis.log"
  wait_port "$redis_port" Redis
}

start_nats() {
  port_open "$nats_port" && return
  say "starting NATS"
  command -v nats-server >/dev/null || apt_install nats-server
  mkdir -p "$state/nats"
  setsid nats-server -a 127.0.0.1 -p "$nats_port" -js -sd "$state/nats" \
    -P "$run/nats.pid" -l "$logs/nats.log" </dev/null >/dev/null 2>&1 &
  wait_port "$nats_port" NATS
}

# --- Ampora nodes ---------------------------------------------------------------------------

write_node_config() {
  local name="$1" role="$2" port_="$3" scheme=ws plaintext=true
  # nginx connects from loopback and proves itself with the secret.
  local tls="trusted_proxies = [\"127.0.0.1\"]"$'\n'"trusted_proxy_secret_file = \"$secret_file\""
  if ((tls_mode)); then
    # Agents bootstrap over TLS at nginx and are issued identities by the CA: coordinators
    # sign (only they get its key), gateways verify the certificates nginx passes on.
    scheme=wss plaintext=false
    tls+=$'\n'"agent_ca_cert_file = \"$tls_dir/ca.pem\""
    if [[ $role == coordinator ]]; then
      tls+=$'\n'"agent_ca_key_file = \"$tls_dir/ca-key.pem\""
    fi
  fi
  mkdir -p "$state/$name/data"
  cat >"$(node_conf "$name")" <<EOF
# Written by deploy/local-cluster.sh; rewritten on every start of $name.
[server]
listen = "127.0.0.1:$port_"
data_dir = "$state/$name/data"
public_endpoint = "$scheme://$host:$port/v1/opamp"

[opamp]
bootstrap_plaintext_allowed = $plaintext

[tls]
$tls

[cluster]
node_id = "$name"
nats_url = "nats://127.0.0.1:$nats_port"
subject_prefix = "$db"
redis_url = "redis://127.0.0.1:$redis_port"
redis_key_prefix = "$db"
postgres_url = "postgres://postgres@127.0.0.1:$pg_port/$db"
drain_window_secs = $drain_window_secs

[packages]
# Hosted builds live in Postgres; gateways cache them under their data directory.
download_key_file = "$download_key_file"
EOF
}

start_node() {
  local spec="$1" bin="$2" name role port_ pid
  name="$(node_name "$spec")"
  role="$(node_role "$spec")"
  port_="$(node_port "$spec")"
  if pid="$(node_pid "$name")"; then
    echo "    $name already running (pid $pid)"
    return
  fi
  port_open "$port_" && die "port $port_ for $name is taken by another process (LOCAL_CLUSTER_PORT)"
  write_node_config "$name" "$role" "$port_"
  # setsid: the node outlives this script and a Ctrl-C in its terminal.
  setsid "$bin" "$role" --config "$(node_conf "$name")" \
    </dev/null >>"$logs/$name.log" 2>&1 &
  echo $! >"$run/$name.pid"
  echo "    $name ($role) on 127.0.0.1:$port_, pid $!"
}

# Waits (bounded) until every node in "$@" answers /health/ready; fails early with the log tail
# of a node that exited.
wait_ready() {
  local deadline=$((SECONDS + wait_secs)) spec name pending
  while :; do
    pending=()
    for spec in "$@"; do
      name="$(node_name "$spec")"
      # kill -0 only: just after the fork the child may not have exec'd ampora yet.
      if ! kill -0 "$(cat "$run/$name.pid" 2>/dev/null)" 2>/dev/null; then
        warn "$name exited; last lines of $logs/$name.log:"
        tail -n 20 "$logs/$name.log" >&2 || true
        exit 1
      fi
      ready "$(node_port "$spec")" || pending+=("$name")
    done
    ((${#pending[@]} == 0)) && return
    if ((SECONDS >= deadline)); then
      die "not ready after ${wait_secs}s: ${pending[*]} (see $logs/)"
    fi
    sleep 0.2
  done
}

# --- nginx ----------------------------------------------------------------------------------

start_nginx() {
  local pid servers_gw="" servers_co="" spec bin
  if pid="$(nginx_pid)"; then
    echo "    nginx already running (pid $pid)"
    return
  fi
  port_open "$port" && die "port $port for nginx is taken by another process (LOCAL_CLUSTER_PORT)"
  bin="$(nginx_bin)" || {
    say "installing nginx"
    apt_install nginx-light || apt_install nginx
    bin="$(nginx_bin)"
  }
  for spec in "${nodes[@]}"; do
    case "$(node_role "$spec")" in
      gateway) servers_gw+="server 127.0.0.1:$(node_port "$spec"); " ;;
      coordinator) servers_co+="server 127.0.0.1:$(node_port "$spec"); " ;;
    esac
  done
  mkdir -p "$prefix/logs"
  local listen="$bind:$port" tls=""
  if ((tls_mode)); then
    # The template's TLS directives: our certificate, and client certificates checked against
    # the agent CA (optional: new agents have none) and passed on to the gateways.
    listen+=" ssl"
    tls="ssl_certificate $tls_dir/server.pem; ssl_certificate_key $tls_dir/server-key.pem;"
    tls+=" ssl_client_certificate $tls_dir/ca.pem; ssl_verify_client optional;"
    tls+=" ssl_verify_depth 2;"
  fi
  # The rendered file holds the proxy secret: readable by its owner only.
  rm -f "$prefix/nginx.conf"
  # shellcheck disable=SC2016 # the single-quoted names are envsubst's list, not expansions
  (umask 077 && NGINX_LISTEN="$listen" NGINX_TLS="$tls" GATEWAY_SERVERS="$servers_gw" \
    COORDINATOR_SERVERS="$servers_co" AMPORA_PROXY_SECRET="$(head -n1 "$secret_file")" \
    envsubst '${NGINX_LISTEN} ${NGINX_TLS} ${GATEWAY_SERVERS} ${COORDINATOR_SERVERS} ${AMPORA_PROXY_SECRET}' \
    <"$template" >"$prefix/nginx.conf")
  local args=(-p "$prefix/" -c "$prefix/nginx.conf" -e "$prefix/logs/error.log")
  "$bin" -t -q "${args[@]}" || die "nginx rejected $prefix/nginx.conf"
  # Daemonises; the master's pid lands in $prefix/logs/nginx.pid.
  "$bin" "${args[@]}"
  local deadline=$((SECONDS + 20))
  until pid="$(nginx_pid)" && nginx_ready; do
    ((SECONDS < deadline)) || die "nginx did not come up (see $prefix/logs/error.log)"
    sleep 0.1
  done
  echo "    nginx on $bind:$port$( ((tls_mode)) && echo " (TLS)"), pid $pid"
}

# --- commands -------------------------------------------------------------------------------

all_up() {
  local spec
  nginx_pid >/dev/null || return 1
  for spec in "${nodes[@]}"; do
    node_pid "$(node_name "$spec")" >/dev/null || return 1
  done
}

any_up() {
  local spec
  nginx_pid >/dev/null && return 0
  for spec in "${nodes[@]}"; do
    node_pid "$(node_name "$spec")" >/dev/null && return 0
  done
  return 1
}

# The mode the cluster was last started in (status follows it, not the flag).
recorded_mode() { [[ -s $mode_file ]] && [[ $(<"$mode_file") == tls ]]; }
mode_name() { ((tls_mode)) && echo tls || echo plain; }

print_endpoints() {
  local token data_dir
  if token="$(admin_token_path)"; then
    data_dir="$(dirname "$token")"
  else
    token="none written: the database already had an API token ('reset' starts afresh)"
    data_dir="DIR-WITH-admin-token"
  fi
  local ws=ws http=http cli_server="http://$host:$port"
  if ((tls_mode)); then
    ws=wss http=https
    # The CLI speaks plain HTTP only: straight to a coordinator, on loopback.
    cli_server="http://127.0.0.1:$((port + 3))"
  fi
  cat <<EOF

Ampora local cluster is up$( ((tls_mode)) && echo ", TLS at nginx").
  agent endpoint:  $ws://$host:$port/v1/opamp   (plain HTTP: $http://$host:$port/v1/opamp)
  API:             $http://$host:$port/api/v1
  admin token:     $token
EOF
  if ((tls_mode)); then
    cat <<EOF
  CA:              $tls_dir/ca.pem
                   (agents trust it for nginx; it also issues their identities)
EOF
  fi
  cat <<EOF
  nodes:           gateways :$((port + 1)) :$((port + 2)), coordinators :$((port + 3)) :$((port + 4))
                   (each serves /health/live, /health/ready, /metrics)
  logs:            $logs/ and $prefix/logs/
For example:
  target/release/ampora tokens create --name laptop --server $cli_server --data-dir $data_dir
EOF
}

cmd_up() {
  mkdir -p "$run" "$logs"
  # Every agent is a file descriptor in a gateway and two in nginx: allow as many as we may.
  ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
  if any_up && [[ -s $mode_file && $(<"$mode_file") != "$(mode_name)" ]]; then
    die "the cluster runs in $(<"$mode_file") mode: 'down' first to start it in $(mode_name) mode"
  fi
  if all_up; then
    say "already up"
    print_endpoints
    return
  fi
  local bin
  bin="$(ampora_bin)"
  mode_name >"$mode_file"
  ensure_proxy_secret
  ensure_download_key
  if ((tls_mode)); then ensure_tls; fi
  start_nats
  start_redis
  start_postgres
  say "starting nodes"
  start_node "${nodes[0]}" "$bin"
  wait_ready "${nodes[0]}"
  local spec
  for spec in "${nodes[@]:1}"; do
    start_node "$spec" "$bin"
  done
  wait_ready "${nodes[@]}"
  say "starting nginx"
  start_nginx
  print_endpoints
}

# Sends SIGTERM to pid file $1's process (checked against $2) and waits up to $3 seconds
# before SIGKILL.
stop_pid() {
  local file="$1" match="$2" grace="$3" what="$4" pid
  if ! pid="$(live_pid "$file" "$match")"; then
    rm -f "$file"
    return
  fi
  kill -TERM "$pid" 2>/dev/null || true
  local deadline=$((SECONDS + grace))
  while kill -0 "$pid" 2>/dev/null; do
    if ((SECONDS >= deadline)); then
      warn "$what (pid $pid) still running after ${grace}s: SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
      break
    fi
    sleep 0.1
  done
  rm -f "$file"
  echo "    stopped $what (pid $pid)"
}

# Stops nginx and the nodes.
stop_cluster() {
  say "stopping"
  stop_pid "$prefix/logs/nginx.pid" "$prefix/" 10 nginx
  local spec name role
  # Gateways drain in parallel, then the coordinators go.
  for role in gateway coordinator; do
    for spec in "${nodes[@]}"; do
      [[ $(node_role "$spec") == "$role" ]] || continue
      name="$(node_name "$spec")"
      stop_pid "$run/$name.pid" "$(node_conf "$name")" $((drain_window_secs + 15)) "$name" &
    done
    wait
  done
}

# Stops whichever of NATS, Redis and PostgreSQL `up` started.
stop_services() {
  stop_pid "$run/nats.pid" nats-server 10 "NATS (started by up)"
  stop_pid "$run/redis.pid" redis-server 10 "Redis (started by up)"
  if [[ -s $run/postgres.started ]]; then
    pg_ctlcluster --skip-systemctl-redirect "$(<"$run/postgres.started")" main stop || true
    rm -f "$run/postgres.started"
    echo "    stopped PostgreSQL (started by up)"
  fi
}

cmd_down() {
  stop_cluster
  stop_services
}

cmd_status() {
  local spec name pid health token rc=0
  if recorded_mode; then tls_mode=1; else tls_mode=0; fi
  printf '%-14s %-8s %-22s %-8s %s\n' COMPONENT PID ADDRESS STATE HEALTH
  for spec in "${nodes[@]}"; do
    name="$(node_name "$spec")"
    health=-
    if pid="$(node_pid "$name")"; then
      health=unready
      ready "$(node_port "$spec")" && health=ready
    else
      pid=- rc=3
    fi
    [[ $health == ready ]] || rc=3
    printf '%-14s %-8s %-22s %-8s %s\n' "$name" "$pid" "127.0.0.1:$(node_port "$spec")" \
      "$([[ $pid == - ]] && echo stopped || echo running)" "$health"
  done
  health=-
  if pid="$(nginx_pid)"; then
    health=unready
    nginx_ready && health=ready
  else
    pid=- rc=3
  fi
  [[ $health == ready ]] || rc=3
  printf '%-14s %-8s %-22s %-8s %s\n' nginx "$pid" "$bind:$port" \
    "$([[ $pid == - ]] && echo stopped || echo running)" "$health"
  local svc
  for svc in "NATS:$nats_port" "Redis:$redis_port" "PostgreSQL:$pg_port"; do
    printf '%-14s %-8s %-22s %s\n' "${svc%%:*}" - "127.0.0.1:${svc##*:}" \
      "$(port_open "${svc##*:}" && echo open || echo closed)"
  done
  echo "mode: $(mode_name)$( ((tls_mode)) && echo " (CA: $tls_dir/ca.pem)")"
  if token="$(admin_token_path)"; then
    echo "admin token: $token"
  fi
  return "$rc"
}

# Deletes every Redis key under the cluster's prefix ("$db:", e.g. the ownership epoch),
# with SCAN and DEL in batches: never KEYS or FLUSHALL, other data may share this Redis.
clean_redis() {
  if ! port_open "$redis_port"; then
    warn "Redis is not reachable on $redis_port: keys under '$db:' remain"
    return
  fi
  command -v redis-cli >/dev/null || apt_install redis-tools
  local cli=(redis-cli -h 127.0.0.1 -p "$redis_port") keys=() i
  mapfile -t keys < <("${cli[@]}" --scan --pattern "$db:*")
  for ((i = 0; i < ${#keys[@]}; i += 500)); do
    "${cli[@]}" DEL "${keys[@]:i:500}" >/dev/null
  done
  say "deleted ${#keys[@]} Redis keys under '$db:'"
}

cmd_reset() {
  # Nodes first, so that none writes again; then their data in the services, which must still
  # run for that; then the services `up` started; then the files.
  stop_cluster
  clean_redis
  if port_open "$pg_port"; then
    say "dropping database $db"
    psql -h 127.0.0.1 -p "$pg_port" -U postgres -d postgres -v ON_ERROR_STOP=1 -qtA \
      -c "DROP DATABASE IF EXISTS \"$db\" WITH (FORCE)"
  else
    warn "PostgreSQL is not reachable on $pg_port: database $db remains"
  fi
  stop_services
  say "removing $state"
  rm -rf "$state"
}

case "$cmd" in
  up) cmd_up ;;
  down) cmd_down ;;
  status) cmd_status ;;
  reset) cmd_reset ;;
  -h | --help | help) sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//' ;;
  *) die "unknown command '$cmd' (usage: $0 [--tls] [up|status|down|reset])" ;;
esac
