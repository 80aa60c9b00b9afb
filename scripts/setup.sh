#!/usr/bin/env bash
# Create .venv and install the project with the pinned stack (constraints.txt). Idempotent: a stamp
# records what was installed, so a second run with unchanged pins returns at once.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${SAM_BACKEND_VENV:-.venv}
stamp="$VENV/.sam_backend-installed"
want=$(cat constraints.txt setup.py scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip setuptools wheel
"$VENV/bin/python" -m pip install --quiet -c constraints.txt -e '.[test]'
# label-studio-ml pins Flask 1.1.2 / Werkzeug 2.0.2 (published vulnerabilities); it runs on the
# maintained releases setup.py asks for, so it is installed without its pins (README: Security).
"$VENV/bin/python" -m pip install --quiet --no-deps -c constraints.txt label-studio-ml==1.0.9
# SAM 2 (model_name=sam2): an sdist whose build needs the pinned torch already installed (no build
# isolation, which would pull another torch) and builds without its optional CUDA extension.
SAM2_BUILD_CUDA=0 "$VENV/bin/python" -m pip install --quiet --no-build-isolation -c constraints.txt \
  hydra-core iopath sam2
echo "$want" > "$stamp"
