#!/usr/bin/env bash
# Serves the dashboard from the working tree (FLUXBASE_DASHBOARD_DIR), so that an edit to
# dashboard/ shows on the next reload without rebuilding the binary. Its own embedded cluster
# and data under $FLUXBASE_DATA_DIR (default .fluxbase/dev); any port ($FLUXBASE_LISTEN,
# default 127.0.0.1:8090). Run a browser spec against it:
#   FLUXBASE_URL=http://127.0.0.1:8090 node tests/browser/specs/projects.mjs
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${FLUXBASE_BIN:-target/debug/fluxbase}
[ -x "$bin" ] || cargo build --bin fluxbase
export FLUXBASE_DATA_DIR=${FLUXBASE_DATA_DIR:-$PWD/.fluxbase/dev}
export FLUXBASE_LISTEN=${FLUXBASE_LISTEN:-127.0.0.1:8090}
export FLUXBASE_DASHBOARD_DIR=$PWD/dashboard
# Loopback receivers for the webhook views; generous limits for specs run again and again.
export FLUXBASE_WEBHOOK_ALLOW_PRIVATE=${FLUXBASE_WEBHOOK_ALLOW_PRIVATE:-true}
export FLUXBASE_RATE_LIMIT_REQUESTS=${FLUXBASE_RATE_LIMIT_REQUESTS:-10000}
export FLUXBASE_AUTH_ATTEMPTS_PER_ADDRESS=${FLUXBASE_AUTH_ATTEMPTS_PER_ADDRESS:-10000}
export FLUXBASE_AUTH_FAILURES_PER_ADDRESS=${FLUXBASE_AUTH_FAILURES_PER_ADDRESS:-10000}
mkdir -p "$FLUXBASE_DATA_DIR"
exec "$bin" serve
