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
exec .venv/bin/python -m pytest "$@"
