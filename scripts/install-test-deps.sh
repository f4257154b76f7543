#!/usr/bin/env bash
# Installs what the interop tests need: the official Azure IoT Node SDK from npm
# (pinned by tests/interop/node/package-lock.json). Quiet when already present.
set -euo pipefail

# The TPM attestation test's device: a software TPM and the TPM2 tools
# (Debian packages). Quiet when present.
tpm_packages=(swtpm swtpm-tools tpm2-tools)
tpm_missing=()
for p in "${tpm_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || tpm_missing+=("$p")
done
if [ ${#tpm_missing[@]} -gt 0 ]; then
  echo "install-test-deps: installing ${tpm_missing[*]}"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${tpm_missing[@]}" >/dev/null
fi

cd "$(dirname "$0")/../tests/interop/node" 2>/dev/null || exit 0
command -v npm >/dev/null 2>&1 || { echo "install-test-deps: npm not found; interop tests will be skipped" >&2; exit 0; }
[ -f package.json ] || exit 0
if [ -d node_modules ] && [ node_modules/.package-lock.json -nt package-lock.json ]; then
  exit 0
fi
echo "install-test-deps: npm ci (Azure IoT Node SDK)"
npm ci --no-audit --no-fund --loglevel=error >/dev/null
