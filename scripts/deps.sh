#!/usr/bin/env bash
# Makes sure what `make run` and `make test` need is installed: PostgreSQL's server binaries
# (initdb, pg_ctl, pgbench, pg_recvlogical), MariaDB's (mariadbd, mariadb-install-db, the
# mariadb and mariadb-binlog clients: the embedded server of MySQL projects) and, for the tests, Node.js and npm, curl, Chromium (the
# dashboard's browser tests drive it headless), a C++ compiler (the fuzz targets' libfuzzer-sys
# builds libFuzzer, also on stable), nats-server with JetStream (the cluster tests start one; Debian
# ships 2.9), from PyPI (into .fluxbase/tools/venv) schemathesis and
# openapi-spec-validator, and from npm (into tests/browser/node_modules) puppeteer-core. As root on
# Debian/Ubuntu it installs missing pieces from the distribution's packages; otherwise it says
# exactly what to install.
set -euo pipefail
need_test_tools=${1:-}

missing=()
have_pg() { ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { [ -n "${FLUXBASE_PG_BINDIR:-}" ] && [ -x "$FLUXBASE_PG_BINDIR/initdb" ]; }; }
have_pg || missing+=(postgresql postgresql-contrib)
have_mariadb() {
  if [ -n "${FLUXBASE_MARIADB_BINDIR:-}" ]; then [ -x "$FLUXBASE_MARIADB_BINDIR/mariadbd" ] && [ -x "$FLUXBASE_MARIADB_BINDIR/mariadb-install-db" ]; return; fi
  { [ -x /usr/sbin/mariadbd ] || command -v mariadbd >/dev/null 2>&1; } && command -v mariadb-install-db >/dev/null 2>&1
}
# An operator's MySQL server (FLUXBASE_MYSQL_URL) needs no local MariaDB.
[ -n "${FLUXBASE_MYSQL_URL:-}" ] || have_mariadb || missing+=(mariadb-server mariadb-client)
# Debian installs it in /usr/sbin, which is not on every user's PATH.
have_nats() { [ -n "${NATS_SERVER:-}" ] && [ -x "$NATS_SERVER" ] || command -v nats-server >/dev/null 2>&1 || [ -x /usr/sbin/nats-server ]; }
have_chromium() { [ -n "${CHROMIUM:-}" ] && [ -x "$CHROMIUM" ] || command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; }
if [ "$need_test_tools" = "test" ]; then
  command -v node >/dev/null 2>&1 || missing+=(nodejs)
  command -v npm >/dev/null 2>&1 || missing+=(npm)
  have_chromium || missing+=(chromium fonts-dejavu-core)
  command -v curl >/dev/null 2>&1 || missing+=(curl)
  command -v c++ >/dev/null 2>&1 || missing+=(g++)
  have_nats || missing+=(nats-server)
  command -v python3 >/dev/null 2>&1 && python3 -c 'import venv, ensurepip' 2>/dev/null || missing+=(python3 python3-venv)
fi
command -v cargo >/dev/null 2>&1 || { echo "cargo is missing: install Rust with rustup (https://rustup.rs)"; exit 1; }

# The OpenAPI checks (tests/it/openapi.rs): schemathesis and openapi-spec-validator from PyPI, in a
# virtual environment of their own under .fluxbase/tools (pinned, so a run is reproducible).
install_python_tools() {
  local venv=.fluxbase/tools/venv
  local want="schemathesis==4.32.5 openapi-spec-validator==0.7.2"
  if [ -x "$venv/bin/st" ] && [ -x "$venv/bin/openapi-spec-validator" ] && [ "$(cat "$venv/.pinned" 2>/dev/null)" = "$want" ]; then return 0; fi
  echo "Installing $want from PyPI into $venv..."
  python3 -m venv "$venv"
  # shellcheck disable=SC2086
  "$venv/bin/pip" install --quiet --disable-pip-version-check $want
  echo "$want" > "$venv/.pinned"
}

# The browser tests' driver (tests/browser): puppeteer-core from npm, pinned by its lock file;
# it downloads no browser (Debian's Chromium is used).
install_node_tools() {
  local dir=tests/browser
  if [ -d "$dir/node_modules/puppeteer-core" ] && cmp -s "$dir/package-lock.json" "$dir/node_modules/.package-lock.json.installed"; then return 0; fi
  echo "Installing the browser tests' npm packages (puppeteer-core) into $dir/node_modules..."
  (cd "$dir" && npm ci --no-audit --no-fund --loglevel=error)
  cp "$dir/package-lock.json" "$dir/node_modules/.package-lock.json.installed"
}

if [ ${#missing[@]} -eq 0 ]; then
  if [ "$need_test_tools" = "test" ]; then install_python_tools; install_node_tools; fi
  exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "Installing ${missing[*]} from Debian's packages..."
  # Fluxbase runs its own cluster; do not let the package create and start a system one.
  mkdir -p /etc/postgresql-common
  if [ ! -f /etc/postgresql-common/createcluster.conf ] || ! grep -q '^create_main_cluster' /etc/postgresql-common/createcluster.conf; then
    echo "create_main_cluster = false" >> /etc/postgresql-common/createcluster.conf
  fi
  # Nor a system MariaDB: no package may start a service while this runs (policy-rc.d answers
  # 101, "action forbidden", to invoke-rc.d and deb-systemd-invoke); removed again afterwards
  # unless it was there before.
  policy=/usr/sbin/policy-rc.d
  own_policy=
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\n# fluxbase scripts/deps.sh: no service starts during this install\nexit 101\n' > "$policy"
    chmod 755 "$policy"
    own_policy=1
  fi
  trap '[ -n "$own_policy" ] && rm -f "$policy"' EXIT
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  have_pg || { echo "PostgreSQL was installed but initdb is still not found"; exit 1; }
  [ -n "${FLUXBASE_MYSQL_URL:-}" ] || have_mariadb || { echo "MariaDB was installed but mariadbd is still not found"; exit 1; }
  if [ "$need_test_tools" = "test" ]; then install_python_tools; install_node_tools; fi
else
  echo "Missing: ${missing[*]}."
  echo "Install them with: sudo apt-get install ${missing[*]}"
  echo "(or set FLUXBASE_PG_BINDIR to a directory holding initdb and pg_ctl,"
  echo " or FLUXBASE_DATABASE_URL to an existing PostgreSQL cluster;"
  echo " FLUXBASE_MARIADB_BINDIR to a directory holding mariadbd and mariadb-install-db,"
  echo " or FLUXBASE_MYSQL_URL to an existing MySQL/MariaDB server)"
  exit 1
fi
