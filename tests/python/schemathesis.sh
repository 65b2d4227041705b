#!/usr/bin/env bash
# Owns the bounded schemathesis pass over the REST API (issue 14): starts `ampora serve` (the
# embedded default) on a free loopback port with a temporary data dir, and fuzzes every
# operation of its OpenAPI document (/api/v1/openapi.json) with the admin token, checking that
# no response is a 5xx and that every response matches the document. Exits non-zero on any
# failure; the server is always stopped.
#
# Environment: AMPORA_BIN (default: the debug build of `ampora`),
# ST_MAX_EXAMPLES (default 20 per operation), ST_SEED (a fixed seed: a failure reproduces).
set -euo pipefail
cd "$(dirname "$0")/../.."

venv="target/pyenv"
# Pinned: the check names and CLI flags below are those of schemathesis 4.
st_version="4.32.5"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
if ! "$venv/bin/st" --version 2>/dev/null | grep -q "$st_version"; then
  echo "==> installing schemathesis $st_version into $venv"
  "$venv/bin/pip" install -q --disable-pip-version-check "schemathesis==$st_version"
fi

# A no-op after `cargo test --workspace`; AMPORA_BIN runs another build instead.
if [ -z "${AMPORA_BIN:-}" ]; then
  cargo build -q --locked -p coordinator --bin ampora
fi
bin="${AMPORA_BIN:-${CARGO_TARGET_DIR:-target}/debug/ampora}"

work="$(mktemp -d)"
server_pid=""
cleanup() {
  if [ -n "$server_pid" ]; then
    kill "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT
trap "exit 130" INT TERM

# Port 0: the server picks a free port and prints the address once everything is up.
coproc SERVER {
  exec "$bin" serve --listen 127.0.0.1:0 --data-dir "$work/data" 2>"$work/server.log"
}
server_pid=$SERVER_PID
addr=""
while IFS= read -r -t 120 -u "${SERVER[0]}" line; do
  case "$line" in
    *" listening on "*) addr="${line##* listening on }"; break ;;
  esac
done
if [ -z "$addr" ]; then
  echo "!! ampora serve did not come up" >&2
  cat "$work/server.log" >&2
  exit 1
fi
# Keep draining its stdout so the server never blocks on a full pipe (a copy of the fd:
# bash does not pass coproc fds to other children).
exec {server_out}<&"${SERVER[0]}"
cat <&"$server_out" >/dev/null &
token="$(cat "$work/data/admin-token")"

echo "==> schemathesis against http://$addr/api/v1/openapi.json"
status=0
# schemathesis_hooks.py keeps token batches small (see there). Run from the temporary dir:
# schemathesis keeps a cache of failures in its working directory.
hooks_dir="$PWD/tests/python"
st="$PWD/$venv/bin/st"
(cd "$work" && PYTHONPATH="$hooks_dir" SCHEMATHESIS_HOOKS=schemathesis_hooks \
  "$st" run "http://$addr/api/v1/openapi.json" \
  --header "Authorization: Bearer $token" \
  --checks not_a_server_error,response_schema_conformance \
  --max-examples "${ST_MAX_EXAMPLES:-20}" \
  --seed "${ST_SEED:-14}" \
  --workers 2 \
  --generation-database none \
  --request-timeout 30 \
  --report-dir "$work/report" \
  --no-color) || status=$?
if [ "$status" -ne 0 ]; then
  echo "!! schemathesis found failures (server log follows)" >&2
  tail -n 50 "$work/server.log" >&2
fi
exit "$status"
