#!/usr/bin/env bash
# The default benchmark suite behind `make bench` (a few minutes on 2 cores).
# Each scenario spawns its own provisiond on a temp data dir; JSON results go
# to $OUT (default <build>/bench-results). Exit status is non-zero if any
# scenario had errors or unfinished devices. See docs/benchmarking.md.
set -uo pipefail

BUILD_DIR=${1:-build}
BENCH="$BUILD_DIR/bin/provisiond-bench"
OUT=${OUT:-$BUILD_DIR/bench-results}
# 25 ms poll interval: the server's Retry-After (1 s) would make the client wait
# dominate; 25 ms keeps ~1 poll per device (the same request mix as an SDK
# honouring Retry-After) while the measured time stays the server's.
POLL_MS=${POLL_MS:-25}
mkdir -p "$OUT"

status=0
run() {
  local name=$1; shift
  echo
  echo "### $name: $BENCH $*"
  echo "### load before: $(cut -d' ' -f1-3 /proc/loadavg)"
  "$BENCH" "$@" --json "$OUT/$name.json" || status=1
}

run keepalive  --mode keepalive --devices 100000 --concurrency 1000 --poll-interval-ms "$POLL_MS"
# The same devices as an open loop at the rate: latency at 10,000/s
# rather than at saturation (docs/benchmarking.md, "Closed loop and open loop").
run rate-10k   --mode keepalive --devices 100000 --concurrency 1000 --rate 10000 --poll-interval-ms "$POLL_MS"
# A full client TLS handshake costs more CPU (OpenSSL 3.0: ~1.5 ms) than the
# server side; two client threads keep one harness thread from capping the
# nginx reference while the server run is capped by the server.
run newconn    --mode newconn --reference --threads 2 --rounds 5 --devices 10000 --concurrency 100 --poll-interval-ms "$POLL_MS"
run enroll-10k --individual-enrollments 10000 --devices 10000 --concurrency 200 --poll-interval-ms "$POLL_MS"

echo
echo "JSON results in $OUT/. The 1M-enrollment run is separate (long):"
echo "  $BENCH --individual-enrollments 1000000 --devices 20000 --concurrency 200 --poll-interval-ms $POLL_MS"
exit $status
