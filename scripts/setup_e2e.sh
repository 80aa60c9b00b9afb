#!/usr/bin/env bash
# What the end-to-end tests need besides the project venv, installed once and cached:
# a real Label Studio 1.23.2 in its own venv, and headless Chromium + Playwright for the browser test.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_label_studio.sh >/dev/null
if [ -f scripts/setup_browser.sh ]; then
  bash scripts/setup_browser.sh
fi
