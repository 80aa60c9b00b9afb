#!/usr/bin/env bash
# Install (idempotently) the Redis server the shared-embedding-store tests start on loopback ports:
# Debian's `redis-server` package, via apt, only when `redis-server` is missing. The tests start
# their own instances (`redis-server --port N --save '' --appendonly no`); the package's system
# service is not needed and is left as the package sets it up.
set -euo pipefail
log() { echo "[setup_redis] $*" >&2; }
if command -v redis-server >/dev/null; then
  exit 0
fi
if ! command -v apt-get >/dev/null; then
  log "no redis-server and no apt-get: install Redis (>= 6) by hand"; exit 1
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then
  if command -v sudo >/dev/null; then SUDO="sudo"; else log "need root (or sudo) for apt-get"; exit 1; fi
fi
log "installing Debian redis-server (apt-get)"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends redis-server >/dev/null
log "ready: $(redis-server --version)"
