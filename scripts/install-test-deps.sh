#!/usr/bin/env bash
# Installs what the interop tests need: the official Azure IoT Node SDK from npm
# (pinned by tests/interop/node/package-lock.json). Quiet when already present.
set -euo pipefail
cd "$(dirname "$0")/../tests/interop/node" 2>/dev/null || exit 0
command -v npm >/dev/null 2>&1 || { echo "install-test-deps: npm not found; interop tests will be skipped" >&2; exit 0; }
[ -f package.json ] || exit 0
if [ -d node_modules ] && [ node_modules/.package-lock.json -nt package-lock.json ]; then
  exit 0
fi
echo "install-test-deps: npm ci (Azure IoT Node SDK)"
npm ci --no-audit --no-fund --loglevel=error >/dev/null
