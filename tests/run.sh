#!/usr/bin/env bash
# Runs every check and test of the workspace on a fresh machine:
# formatting, clippy, then all unit, conformance and end-to-end tests, then a bounded
# schemathesis pass over the REST API (tests/python/schemathesis.sh).
# It prepares what the tests need first: a Python virtual environment with the third-party
# OpAMP client (PyPI opentelemetry-opamp-client) used by the interoperability test.
set -euo pipefail
cd "$(dirname "$0")/.."

venv="target/pyenv"
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import opentelemetry._opamp.client' 2>/dev/null; then
  echo "==> preparing $venv with opentelemetry-opamp-client"
  if ! python3 -m venv "$venv" 2>/dev/null; then
    apt-get update -qq && apt-get install -y -qq python3-venv
    python3 -m venv "$venv"
  fi
  "$venv/bin/pip" install -q --disable-pip-version-check 'opentelemetry-opamp-client==0.5b0'
fi
export AMPORA_TEST_PYTHON="$PWD/$venv/bin/python"

# Cluster tests talk to real Postgres, Redis and NATS on their standard local ports, the
# deploy test runs Debian's nginx and the console tests Debian's chromium. Install and start
# whatever is missing; if one still cannot be reached the tests that need it fail loudly.
apt_install() {
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null 2>&1 || {
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@"
  }
}
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
wait_port() {
  for _ in $(seq 1 100); do port_open "$1" && return 0; sleep 0.1; done
  echo "!! $2 did not come up on port $1" >&2
}
command -v nginx >/dev/null || { echo "==> installing nginx"; apt_install nginx-light || apt_install nginx; }
# The console tests drive a real browser.
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
  echo "==> installing chromium and chromium-driver"
  apt_install chromium chromium-driver
fi
if ! port_open 5432; then
  echo "==> starting PostgreSQL"
  command -v pg_ctlcluster >/dev/null || apt_install postgresql
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start || true
  wait_port 5432 PostgreSQL
fi
if ! port_open 6379; then
  echo "==> starting Redis"
  command -v redis-server >/dev/null || apt_install redis-server
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no
  wait_port 6379 Redis
fi
if ! port_open 4222; then
  echo "==> starting NATS"
  command -v nats-server >/dev/null || apt_install nats-server
  mkdir -p /var/lib/nats-server
  start-stop-daemon --start --oknodo --background --exec "$(command -v nats-server)" -- \
    -a 127.0.0.1 -p 4222 -js -sd /var/lib/nats-server
  wait_port 4222 NATS
fi

# The alert rules and the dashboard's queries are checked with Prometheus's own promtool
# (Debian package prometheus): the rules' syntax, their unit tests (each alert firing and
# staying quiet), and every dashboard expression parsed as PromQL. Which metrics they name is
# checked against a running Ampora by the metrics tests (tests/metrics/deploy.rs).
command -v promtool >/dev/null || { echo "==> installing promtool"; apt_install prometheus; }
command -v promtool >/dev/null || { echo "!! promtool is missing (Debian package prometheus)" >&2; exit 1; }
echo "==> promtool check rules / test rules"
promtool check rules deploy/prometheus/ampora-alerts.yml
promtool test rules deploy/prometheus/ampora-alerts.test.yml
mkdir -p target
python3 - deploy/grafana/ampora-fleet.json >target/dashboard-queries.rules.yml <<'PY'
import json, re, sys
# Each panel query as a recording rule, Grafana's variables replaced by plain values.
exprs = []
def walk(v):
    if isinstance(v, dict):
        exprs.extend(t["expr"] for t in v.get("targets", []) if "expr" in t)
        for x in v.values():
            walk(x)
    elif isinstance(v, list):
        for x in v:
            walk(x)
walk(json.load(open(sys.argv[1])))
if not exprs:
    sys.exit("no queries found in " + sys.argv[1])
print("groups:\n  - name: dashboard-queries\n    rules:")
for i, e in enumerate(exprs):
    e = re.sub(r"\$__\w+", "5m", e)
    e = re.sub(r"\$\w+", "x", e)
    print(f"      - record: dashboard:query{i}\n        expr: {json.dumps(e)}")
PY
promtool check rules target/dashboard-queries.rules.yml

echo "==> cargo fmt --check"
cargo fmt --all -- --check
echo "==> cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "==> cargo test"
# A failing test's error then ends with its message, not an error backtrace CI cuts short.
RUST_LIB_BACKTRACE=0 cargo test --workspace --locked
echo "==> schemathesis"
bash tests/python/schemathesis.sh
echo "==> fuzz smoke"
bash tests/fuzz/smoke.sh
