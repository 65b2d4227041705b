#!/usr/bin/env bash
# Runs every check and test of the workspace on a fresh machine:
# formatting, clippy, then all unit, conformance and end-to-end tests.
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

echo "==> cargo fmt --check"
cargo fmt --all -- --check
echo "==> cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "==> cargo test"
cargo test --workspace --locked
