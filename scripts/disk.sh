#!/usr/bin/env bash
# Says how much disk the integration tests have (`before`) or had left when they failed
# (`after`). They start PostgreSQL and MariaDB clusters, write 200 MB uploads and the WAL of
# large rows under target/; a full disk fails them all at once (storage, webhooks, large
# rows), which reads like a regression without this line. Measured 2026-12-07 on a clean
# clone: the build takes 2.6 GB (.ci/run: no incremental caches, line tables only) and a run
# leaves 15 GB under target/tmp (the shared cluster's ~900 project databases, 7.3 GB, and the
# WAL its ended tests' slots keep, 4.7 GB; each test's clusters besides).
set -euo pipefail
# Not FLUXBASE_…: the server refuses unknown FLUXBASE_ variables, and the tests' servers inherit
# this environment.
want_gb=${TEST_DISK_GB:-20}
free_kb=$(df -Pk target 2>/dev/null | awk 'NR == 2 { print $4 }')
[ -n "$free_kb" ] || exit 0
free_gb=$((free_kb / 1024 / 1024))
case "${1:-before}" in
  before)
    if [ "$free_gb" -lt "$want_gb" ]; then
      echo "disk: only ${free_gb} GB free under target/; the integration tests need about ${want_gb} GB (TEST_DISK_GB): expect failures from a full disk"
    else
      echo "disk: ${free_gb} GB free under target/"
    fi ;;
  after)
    echo "disk: ${free_gb} GB free under target/ after the failure (df -h target):"
    df -h target ;;
esac
