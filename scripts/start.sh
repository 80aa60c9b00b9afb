#!/usr/bin/env bash
# Set up (first run only) and start the backend the way Label Studio users know:
#   label-studio-ml start sam --with model_name=mobile_sam device=cpu
# Extra arguments are passed on, e.g.  bash scripts/start.sh -p 9091 --with out_poly=true
# The default checkpoint (weights/mobile_sam.pt) is downloaded at start when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/${SAM_BACKEND_VENV:-.venv}/bin:$PATH"  # label-studio-ml runs `python sam/_wsgi.py`
with=(model_name=mobile_sam device=cpu)
extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --with) shift; while [ $# -gt 0 ] && [[ "$1" != -* ]]; do with+=("$1"); shift; done ;;
    *) extra+=("$1"); shift ;;
  esac
done
exec label-studio-ml start sam --with "${with[@]}" "${extra[@]}"
