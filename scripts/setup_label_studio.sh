#!/usr/bin/env bash
# Install (once, cached) the Label Studio 1.23.2 used by the end-to-end tests into its own venv,
# plus a migrated template database, so CI can do it before running tests/e2e.
#   venv: $SAM_BACKEND_LS_VENV or ~/.cache/sam_backend/label-studio-1.23.2
#   extra pip arguments: $SAM_BACKEND_LS_PIP_ARGS
# Prints the venv path.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-}"
if [[ -z "$python" ]]; then
    if [[ -x "$root/.venv/bin/python" ]]; then python="$root/.venv/bin/python"; else python=python3; fi
fi
cd "$root"
exec "$python" -m tests.support.ls_harness setup
