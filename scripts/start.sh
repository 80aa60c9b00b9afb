#!/usr/bin/env bash
# Set up (first run only) and start the backend the way Label Studio users know:
#   label-studio-ml start sam --with model_name=mobile_sam device=cpu
# Extra arguments are passed on, e.g.  bash scripts/start.sh -p 9091 --with out_poly=true
# The default checkpoint (weights/mobile_sam.pt) is downloaded at start when missing.
#
# `label-studio-ml start sam ARGS` only runs `python sam/_wsgi.py ARGS` (os.system, from the
# repository root) and, in label-studio-ml 1.0.9, throws away its exit status: a backend that
# cannot start (no checkpoint, bad option) would look like a clean exit. This script runs that
# same command itself, with exec, so that the exit status (non-zero on failure) and signals go
# between the server and whoever started it (systemd, Docker restart policies, a shell).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
venv=${SAM_BACKEND_VENV:-.venv}
case "$venv" in /*) ;; *) venv="$PWD/$venv" ;; esac
export PATH="$venv/bin:$PATH"
with=(model_name=mobile_sam device=cpu)
extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --with) shift; while [ $# -gt 0 ] && [[ "$1" != -* ]]; do with+=("$1"); shift; done ;;
    *) extra+=("$1"); shift ;;
  esac
done
exec python sam/_wsgi.py --with "${with[@]}" "${extra[@]}"
