#!/usr/bin/env bash
# Install (idempotently) what tests/e2e/test_browser.py needs:
#   - Debian's `chromium` (+ fonts-liberation), via apt, only when /usr/bin/chromium is missing;
#   - the Python `playwright` client in the project venv (it drives that external chromium; its own
#     browser download, `playwright install`, is never used).
# A second run with everything in place takes ~1-2 s (it checks versions and launches chromium once
# headless through Playwright to prove they work together).
#   playwright version: the pin in constraints.txt if there is one, else $PLAYWRIGHT_VERSION (1.65.2)
#   venv: $SAM_BACKEND_VENV or .venv        chromium: $SAM_BACKEND_CHROMIUM or /usr/bin/chromium
#   SAM_BACKEND_BROWSER_NO_CHECK=1 skips the launch check.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${SAM_BACKEND_VENV:-.venv}
CHROMIUM=${SAM_BACKEND_CHROMIUM:-/usr/bin/chromium}
pinned=$(sed -n 's/^playwright==\([^ ;#]*\).*/\1/p' constraints.txt 2>/dev/null | head -n1)
PLAYWRIGHT_VERSION=${pinned:-${PLAYWRIGHT_VERSION:-1.65.2}}

log() { echo "[setup_browser] $*" >&2; }

# --- chromium (Debian package) --------------------------------------------------------------
if [ ! -x "$CHROMIUM" ]; then
  if [ "$CHROMIUM" != /usr/bin/chromium ]; then
    log "SAM_BACKEND_CHROMIUM=$CHROMIUM does not exist"; exit 1
  fi
  if ! command -v apt-get >/dev/null; then
    log "no $CHROMIUM and no apt-get: install Chromium by hand and set SAM_BACKEND_CHROMIUM"; exit 1
  fi
  SUDO=""
  if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null; then SUDO="sudo"; else log "need root (or sudo) for apt-get"; exit 1; fi
  fi
  log "installing Debian chromium (apt-get, ~20 s)"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
    chromium fonts-liberation >/dev/null
fi
# (Debian's /usr/bin/chromium wrapper prints a harmless "[: ...: unexpected operator" on some machines)
chromium_version=$("$CHROMIUM" --version 2>/dev/null || true)
[ -n "$chromium_version" ] || { log "$CHROMIUM --version failed"; exit 1; }

# --- playwright (Python client, in the project venv) ----------------------------------------
if [ ! -x "$VENV/bin/python" ]; then
  log "no $VENV/bin/python: run scripts/setup.sh first"; exit 1
fi
have=$("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("playwright"))' 2>/dev/null || true)
if [ "$have" != "$PLAYWRIGHT_VERSION" ]; then
  log "installing playwright==$PLAYWRIGHT_VERSION into $VENV (was: ${have:-none})"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -c constraints.txt \
    "playwright==$PLAYWRIGHT_VERSION"
fi

# --- do they work together? -----------------------------------------------------------------
if [ -z "${SAM_BACKEND_BROWSER_NO_CHECK:-}" ]; then
  SAM_BACKEND_CHROMIUM="$CHROMIUM" "$VENV/bin/python" - <<'EOF'
import os, tempfile
from playwright.sync_api import sync_playwright
args = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
with tempfile.TemporaryDirectory(prefix="chromium-check-") as profile, sync_playwright() as p:
    ctx = p.chromium.launch_persistent_context(profile, executable_path=os.environ["SAM_BACKEND_CHROMIUM"],
                                               headless=True, args=args, timeout=60000)
    try:
        page = ctx.new_page()
        page.set_content("<p id=x>ok</p>")
        assert page.inner_text("#x") == "ok"
    finally:
        ctx.close()
EOF
fi
log "ready: $chromium_version, playwright $PLAYWRIGHT_VERSION"
