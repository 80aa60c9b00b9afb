#!/usr/bin/env bash
# Set up (first run only) and run the whole test suite, end-to-end tests included.
# Arguments go to pytest, e.g. the fast suite:  bash scripts/test.sh -m "not slow and not e2e"
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/setup_redis.sh   # Debian's redis-server: the shared embedding store tests start it
if [ $# -eq 0 ] || [[ "$*" != *"not e2e"* ]]; then
  bash scripts/setup_e2e.sh   # a real Label Studio (own venv) and headless Chromium, cached
fi
if [ $# -gt 0 ]; then
  exec .venv/bin/python -m pytest "$@"
fi
# The whole suite. The vit_b ONNX export and fidelity checks need most of the machine's memory
# on their own (~17 GB), so each of their files runs in a fresh pytest process of its own, after
# the rest; the closing line adds up all three runs.
heavy=(tests/models/test_onnx_runtime.py tests/models/test_model_fidelity.py)
status=0 passed=0 failed=0 log=$(mktemp)
for group in "${heavy[*]/#/--ignore=}" "${heavy[0]}" "${heavy[1]}"; do
  # shellcheck disable=SC2086  # a group is one or more words
  .venv/bin/python -m pytest $group 2>&1 | tee "$log" || status=1
  summary=$(grep -E '^=+ .* in [0-9.]+s' "$log" | tail -n 1)
  [[ "$summary" =~ ([0-9]+)\ passed ]] && passed=$((passed + BASH_REMATCH[1]))
  [[ "$summary" =~ ([0-9]+)\ failed ]] && failed=$((failed + BASH_REMATCH[1]))
  [[ "$summary" =~ ([0-9]+)\ error ]] && failed=$((failed + BASH_REMATCH[1]))
done
rm -f "$log"
echo "total: $passed passed, $failed failed"
[ "$passed" -gt 0 ] || status=1
exit $status
