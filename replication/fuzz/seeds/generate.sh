#!/usr/bin/env bash
# Regenerates seeds/values/ (the `values` fuzz target's seed corpus) from a running PostgreSQL:
# one file per row of values.sql, holding exactly the text PostgreSQL printed. psql connects with
# the usual libpq variables (PGHOST, PGPORT, PGUSER, PGDATABASE).
set -euo pipefail
cd "$(dirname "$0")"
rm -rf values && mkdir values
psql -X -q -v ON_ERROR_STOP=1 -f values.sql | while IFS=, read -r name b64; do
  printf '%s' "$b64" | base64 -d > "values/$name"
done
ls values | wc -l | xargs echo "seeds written:"
