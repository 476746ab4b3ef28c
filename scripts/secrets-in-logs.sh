#!/usr/bin/env bash
# After `make test`: fails when a secret the test suite hands to service processes appears in any log those
# processes wrote during the run (files keel-test-*.log in DIR, the run's own temp directory).
#
#   scripts/secrets-in-logs.sh DIR
set -euo pipefail
dir=${1:?usage: $0 DIR}
# The credentials the tests give processes: the accounts operator token of the cache tests, and the secrets of
# echo's `no_secret_appears_in_any_log_line`.
secrets=(cache-tests-admin-token consul-token-3b1f9c db-password-77aa01 query-password-5e5e5e operator-token-c0ffee)
mapfile -t logs < <(find "$dir" -maxdepth 1 -name 'keel-test-*.log' | sort)
if ((${#logs[@]} == 0)); then
  echo "secrets in logs: no process log in $dir" >&2
  exit 1
fi
leaks=0
for s in "${secrets[@]}"; do
  if found=$(grep -lF -- "$s" "${logs[@]}"); then
    echo "secret ${s:0:4}… found in: $found" >&2
    leaks=$((leaks + 1))
  fi
done
echo "secrets in logs: ${#logs[@]} process logs checked for ${#secrets[@]} secrets"
if ((leaks)); then
  echo "secrets in logs: 0 passed, 1 failed"
  exit 1
fi
echo "secrets in logs: 1 passed, 0 failed"
