#!/usr/bin/env bash
# Interop test driver (ctest: interop_node_sdk): runs the official Azure IoT
# Node SDK (interop.js) against a real provisiond.
#
#   run.sh <path-to-provisiond>
#
# INTEROP_REGISTER_WAIT_MS=N sets [device_api] register_wait_ms (0 = the
# classic 202-then-poll flow; unset = the server's default, where a register
# is answered 200 with its outcome and the SDK does not poll).
#
# Starts `provisiond serve` on an ephemeral loopback port with a fresh data
# dir, waits for the server to publish <dir>/endpoints.json, runs interop.js
# with NODE_EXTRA_CA_CERTS=<dir>/tls/ca.pem, stops the server and exits with
# node's status. Exit 77 (ctest SKIP_RETURN_CODE) only when `node` is absent.
set -uo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
bin="${1:-}"

if ! command -v node >/dev/null 2>&1; then
  echo "##############################################################"
  echo "##  SKIPPED: interop_node_sdk -- 'node' is not installed.   ##"
  echo "##  The Azure IoT Node SDK interop test did NOT run.        ##"
  echo "##  Install Node.js >= 14 and npm to run it.                ##"
  echo "##############################################################"
  exit 77
fi

if [ -z "$bin" ] || [ ! -x "$bin" ]; then
  echo "interop: usage: run.sh <path-to-provisiond> (got '${bin}')" >&2
  exit 2
fi

# The SDK is pinned by package-lock.json; install it when missing or stale.
if [ ! -d "$here/node_modules/azure-iot-provisioning-device-http" ] ||
   [ ! -d "$here/node_modules/azure-iot-provisioning-device-mqtt" ] ||
   [ "$here/package-lock.json" -nt "$here/node_modules/.package-lock.json" ]; then
  if ! command -v npm >/dev/null 2>&1; then
    echo "interop: FAILED: node is present but npm is not, cannot install the SDK" >&2
    exit 1
  fi
  echo "interop: npm ci (Azure IoT Node SDK)"
  (cd "$here" && npm ci --no-audit --no-fund --loglevel=error) || {
    echo "interop: FAILED: npm ci" >&2
    exit 1
  }
fi

dir="$(mktemp -d "${TMPDIR:-/tmp}/provisiond-interop.XXXXXX")"
log="$dir/server.log"
server_pid=""

stop_server() {
  if [ -n "$server_pid" ] && kill -0 "$server_pid" 2>/dev/null; then
    kill -TERM "$server_pid" 2>/dev/null
    for _ in $(seq 1 100); do
      kill -0 "$server_pid" 2>/dev/null || break
      sleep 0.1
    done
    if kill -0 "$server_pid" 2>/dev/null; then
      echo "interop: WARNING: provisiond did not exit within 10 s of SIGTERM; sending SIGKILL" >&2
      kill -KILL "$server_pid" 2>/dev/null
    fi
    wait "$server_pid" 2>/dev/null
  fi
}

cleanup() {
  stop_server
  if [ "${keep_dir:-0}" = 1 ]; then
    echo "interop: data dir kept at $dir"
  else
    rm -rf "$dir"
  fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

dump_log() {
  echo "---- provisiond log (last 60 lines) ----"
  tail -n 60 "$log" 2>/dev/null
  echo "----------------------------------------"
}

# Two linked hubs so assignments can be asserted, when serve takes a config.
hubs=""
serve_args=(serve --data-dir "$dir" --listen 127.0.0.1:0)
if "$bin" serve --help 2>/dev/null | grep -q -- '--mqtt-listen'; then
  serve_args+=(--mqtt-listen 127.0.0.1:0)
fi
if "$bin" serve --help 2>/dev/null | grep -q -- '--config'; then
  cat >"$dir/provisiond.toml" <<'EOF'
[[hubs]]
hostname = "interop-hub-1.azure-devices.net"

[[hubs]]
hostname = "interop-hub-2.azure-devices.net"

[metrics]
listen = ""
EOF
  # The custom allocation webhook (webhook.js) serves HTTPS for "localhost"
  # with a certificate from a CA of its own, which provisiond is told to trust.
  if command -v openssl >/dev/null 2>&1; then
    wh="$dir/webhook"
    mkdir -p "$wh"
    printf 'basicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign,cRLSign\n' >"$wh/ca.ext"
    printf 'basicConstraints=critical,CA:FALSE\nextendedKeyUsage=serverAuth\nsubjectAltName=DNS:localhost\n' >"$wh/leaf.ext"
    if openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$wh/ca.key" \
         -out "$wh/ca.csr" -subj "/CN=provisiond interop webhook CA" 2>/dev/null &&
       openssl x509 -req -in "$wh/ca.csr" -signkey "$wh/ca.key" -days 2 -extfile "$wh/ca.ext" \
         -out "$wh/ca.pem" 2>/dev/null &&
       openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$wh/leaf.key" \
         -out "$wh/leaf.csr" -subj "/CN=localhost" 2>/dev/null &&
       openssl x509 -req -in "$wh/leaf.csr" -CA "$wh/ca.pem" -CAkey "$wh/ca.key" -set_serial 7 \
         -days 2 -extfile "$wh/leaf.ext" -out "$wh/leaf.pem" 2>/dev/null; then
      printf '\n[custom_allocation]\nca_file = "%s"\n' "$wh/ca.pem" >>"$dir/provisiond.toml"
      export PROV_WEBHOOK_CERT="$wh/leaf.pem" PROV_WEBHOOK_KEY="$wh/leaf.key"
    else
      echo "interop: FAILED: cannot make the webhook's certificates with openssl" >&2
      exit 1
    fi
  fi
  if [ -n "${INTEROP_REGISTER_WAIT_MS:-}" ]; then
    printf '\n[device_api]\nregister_wait_ms = %s\n' "$INTEROP_REGISTER_WAIT_MS" >>"$dir/provisiond.toml"
  fi
  serve_args+=(--config "$dir/provisiond.toml")
  hubs="interop-hub-1.azure-devices.net,interop-hub-2.azure-devices.net"
fi

echo "interop: starting $bin ${serve_args[*]} (register_wait_ms: ${INTEROP_REGISTER_WAIT_MS:-default})"
"$bin" "${serve_args[@]}" >"$log" 2>&1 &
server_pid=$!

# endpoints.json appears once the server is listening.
for _ in $(seq 1 300); do
  [ -s "$dir/endpoints.json" ] && break
  if ! kill -0 "$server_pid" 2>/dev/null; then
    echo "interop: FAILED: provisiond exited before listening" >&2
    dump_log
    keep_dir=1
    exit 1
  fi
  sleep 0.1
done
if [ ! -s "$dir/endpoints.json" ]; then
  echo "interop: FAILED: no $dir/endpoints.json after 30 s" >&2
  dump_log
  keep_dir=1
  exit 1
fi

# Read endpoints.json / identity.json with node itself (no jq needed).
read_env() {
  node -e '
    const fs = require("fs");
    const dir = process.argv[1];
    const ep = JSON.parse(fs.readFileSync(dir + "/endpoints.json", "utf8"));
    const id = JSON.parse(fs.readFileSync(dir + "/identity.json", "utf8"));
    const addr = String(ep.device_api || "");
    const m = addr.match(/^\[?([^\]]*?)\]?:(\d+)$/);
    if (!m) { console.error("bad device_api in endpoints.json: " + addr); process.exit(1); }
    let host = m[1];
    if (host === "0.0.0.0") host = "127.0.0.1";
    if (host === "::") host = "::1";
    const cs = "HostName=" + (id.service_host || "localhost") +
               ";SharedAccessKeyName=" + (id.policy_name || "provisioningserviceowner") +
               ";SharedAccessKey=" + id.primary_key;
    const q = (s) => "\x27" + String(s).replace(/\x27/g, "\x27\\\x27\x27") + "\x27";
    console.log("PROV_HOST=" + q(host));
    console.log("PROV_PORT=" + q(m[2]));
    const mq = String(ep.mqtt || "").match(/:(\d+)$/);
    console.log("PROV_MQTT_PORT=" + q(mq ? mq[1] : ""));
    console.log("PROV_ID_SCOPE=" + q(id.id_scope));
    console.log("PROV_CONNECTION_STRING=" + q(cs));
  ' "$dir"
}
# Retry briefly in case a file is caught mid-write.
vars=""
for _ in $(seq 1 20); do
  vars="$(read_env 2>/dev/null)" && break
  vars=""
  sleep 0.1
done
if [ -z "$vars" ]; then
  read_env >/dev/null # shows why on stderr
  echo "interop: FAILED: cannot read endpoints.json / identity.json" >&2
  cat "$dir/endpoints.json" "$dir/identity.json" 2>/dev/null
  keep_dir=1
  exit 1
fi
eval "$vars"
if [ ! -s "$dir/tls/ca.pem" ]; then
  echo "interop: FAILED: $dir/tls/ca.pem missing" >&2
  keep_dir=1
  exit 1
fi

echo "interop: server at $PROV_HOST:$PROV_PORT (scope $PROV_ID_SCOPE)"
(
  cd "$here" &&
  PROV_HOST="$PROV_HOST" PROV_PORT="$PROV_PORT" PROV_MQTT_PORT="$PROV_MQTT_PORT" \
  PROV_ID_SCOPE="$PROV_ID_SCOPE" \
  PROV_CONNECTION_STRING="$PROV_CONNECTION_STRING" PROV_HUBS="$hubs" \
  NODE_EXTRA_CA_CERTS="$dir/tls/ca.pem" \
  node interop.js
)
rc=$?

# Which answer did the SDK's registers get? The diagnostic log (stderr, so
# server.log, complete once the server has stopped) has one
# DeviceRegistration line per register request.
if [ "$rc" -eq 0 ]; then
  stop_server
  regs="$(grep '"operationName":"DeviceRegistration"' "$log" || true)"
  n200="$(printf '%s\n' "$regs" | grep -c '"resultSignature":200' || true)"
  n202="$(printf '%s\n' "$regs" | grep -c '"resultSignature":202' || true)"
  echo "interop: register answers: $n200 x 200 (outcome), $n202 x 202 (then polls)"
  if [ "${INTEROP_REGISTER_WAIT_MS:-}" = 0 ]; then
    if [ "$n200" -ne 0 ] || [ "$n202" -lt 1 ]; then
      echo "interop: FAILED: with register_wait_ms = 0 every register must be answered 202" >&2
      rc=1
    fi
  elif [ "$n200" -lt 1 ]; then
    echo "interop: FAILED: no register was answered 200 with its outcome" >&2
    rc=1
  fi
fi

if [ "$rc" -ne 0 ]; then
  dump_log
  if ! kill -0 "$server_pid" 2>/dev/null; then
    echo "interop: provisiond is no longer running" >&2
  fi
fi
exit "$rc"
