#!/usr/bin/env bash
# Says how much disk the integration tests have (`before`) or had left when they failed
# (`after`). They start PostgreSQL and MariaDB clusters, write 200 MB uploads and the WAL of
# large rows under target/; a full disk fails them all at once (storage, webhooks, large
# rows), which reads like a regression without this line.
set -euo pipefail
want_gb=${FLUXBASE_TEST_DISK_GB:-8}
free_kb=$(df -Pk target 2>/dev/null | awk 'NR == 2 { print $4 }')
[ -n "$free_kb" ] || exit 0
free_gb=$((free_kb / 1024 / 1024))
case "${1:-before}" in
  before)
    if [ "$free_gb" -lt "$want_gb" ]; then
      echo "disk: only ${free_gb} GB free under target/; the integration tests need about ${want_gb} GB (FLUXBASE_TEST_DISK_GB): expect failures from a full disk"
    else
      echo "disk: ${free_gb} GB free under target/"
    fi ;;
  after)
    echo "disk: ${free_gb} GB free under target/ after the failure (df -h target):"
    df -h target ;;
esac
