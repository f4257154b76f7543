#!/usr/bin/env bash
# Installs every Debian package provisiond needs to build, run and test.
# Idempotent and quiet when everything is already present.
set -euo pipefail

packages=(
  build-essential cmake ninja-build ccache pkg-config git
  libcaf-dev librdkafka-dev libssl-dev openssl librocksdb-dev prometheus-cpp-dev
  doctest-dev libboost-dev libboost-system-dev nlohmann-json3-dev libtomlplusplus-dev
  libcli11-dev libspdlog-dev libfmt-dev libjemalloc-dev
  curl ca-certificates procps nodejs npm
  libbenchmark-dev nginx-light
)
# `make fuzz` only (PROV_FUZZ_DEPS=1): clang with libFuzzer's runtime. The
# normal build and `make test` use g++ and replay the fuzz corpora without it.
if [ "${PROV_FUZZ_DEPS:-0}" = 1 ]; then
  packages+=(clang-14 libclang-rt-14-dev)
fi

missing=()
for p in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done

# node/npm may come from elsewhere (nvm, tarball); do not force Debian's then.
if command -v node >/dev/null 2>&1; then
  filtered=()
  for p in "${missing[@]}"; do [[ "$p" == nodejs || "$p" == npm ]] || filtered+=("$p"); done
  missing=("${filtered[@]+"${filtered[@]}"}")
fi

if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi

echo "install-deps: installing ${missing[*]}"
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive

# nginx-light is only the benchmark's TLS reference (provisiond-bench starts its
# own nginx on a free port). Installing it must not leave a system nginx on :80:
# keep invoke-rc.d from starting it (policy-rc.d), then disable the unit.
nginx_new=0
for p in "${missing[@]}"; do [[ "$p" == nginx-light ]] && nginx_new=1; done
policy_added=0
if [ "$nginx_new" -eq 1 ] && [ ! -e /usr/sbin/policy-rc.d ]; then
  printf '#!/bin/sh\n# temporary, from provisiond scripts/install-deps.sh\nexit 101\n' \
    | $SUDO tee /usr/sbin/policy-rc.d >/dev/null
  $SUDO chmod 755 /usr/sbin/policy-rc.d
  policy_added=1
fi
cleanup_policy() { [ "$policy_added" -eq 1 ] && $SUDO rm -f /usr/sbin/policy-rc.d; true; }
trap cleanup_policy EXIT

$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
if [ "$nginx_new" -eq 1 ] && command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
  $SUDO systemctl disable --now nginx >/dev/null 2>&1 || true
fi
echo "install-deps: done"
