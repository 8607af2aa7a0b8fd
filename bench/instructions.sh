#!/bin/bash
# Instructions one stage spends per order, counted by callgrind: repeatable where CPU time on a
# shared machine is not (BENCHMARKS.md, "2026-12-04, afternoon").
#
# usage: bench/instructions.sh notifier|receiver BIN_DIR N [calls]
#
# Starts the four release stages of BIN_DIR on loopback ports 17001-17004, as the bench starts
# them (1 % of traces sampled, no exporter), with the named stage under
# `valgrind --tool=callgrind`:
# - notifier: N orders placed with the notifier stopped, then the notifier started and timed
#   until it has caught up: its instructions for N notifications;
# - receiver: N orders placed over one `PlaceOrders` stream (`orderflow load --bulk`), then the
#   pipeline left to finish: the receiver's instructions for N orders, their progress included;
#   with `calls`, one `PlaceOrder` call per order instead.
# Prints the stage's total instructions and keeps callgrind's file (for `callgrind_annotate`)
# as callgrind.<stage>.<N>.out in the current directory. Needs valgrind, grpcurl and python3.
# Startup costs ≈ 15 M instructions: compare runs of the same N.
set -euo pipefail
STAGE=$1 BIN=$2 N=$3 HOW=${4:-stream}
case $STAGE in notifier | receiver) ;; *) echo "usage: $0 notifier|receiver BIN_DIR N [calls]" >&2; exit 2 ;; esac
case $HOW in stream) BULK=(--bulk) ;; calls) BULK=() ;; *) echo "usage: $0 notifier|receiver BIN_DIR N [calls]" >&2; exit 2 ;; esac
D=$(mktemp -d)
PIDS=()
trap 'kill "${PIDS[@]}" 2>/dev/null || true; rm -rf "$D"' EXIT
for i in 0 1 2 3 4 5 6 7; do
  printf '[[items]]\nsku = "SKU-%d"\nname = "Item %d"\nunit_price_minor = %d\ncurrency = "EUR"\navailable = 1000000000000\n\n' \
    "$i" "$i" $((700 + i * 1000))
done > "$D/catalog.toml"
export RUST_LOG=info OTEL_TRACES_SAMPLER=parentbased_traceidratio OTEL_TRACES_SAMPLER_ARG=0.01
url() { echo "http://127.0.0.1:$((17001 + $1))"; }
start() { # name index args…
  local name=$1 index=$2
  shift 2
  local run=()
  [ "$name" = "$STAGE" ] && run=(valgrind --tool=callgrind "--callgrind-out-file=$D/callgrind.out")
  "${run[@]}" "$BIN/orderflow-$name" --listen "127.0.0.1:$((17001 + index))" --data-dir "$D/$name" \
    --metrics-listen none "$@" > "$D/$name.log" 2>&1 &
  PIDS+=($!)
  eval "PID_$name=$!"
}
head_of() { # stage index → its log's next offset and the named consumer's acknowledged one
  grpcurl -plaintext -d '{}' "127.0.0.1:$((17001 + $1))" orderflow.v1.EventLog/Head |
    python3 -c 'import json, sys
d = json.load(sys.stdin)
acked = [int(c.get("ackedOffset", 0)) for c in d.get("consumers", []) if c["consumer"] == sys.argv[1]]
print(int(d.get("nextOffset", 0)), max(acked or [0]))' "$2"
}
wait_until() { # stage index consumer field minimum
  until out=$(head_of "$1" "$2" 2>/dev/null) && [ "$(echo "$out" | cut -d' ' -f"$3")" -ge "$4" ]; do
    sleep 0.5
  done
}
start receiver 0 --http-listen none --max-backlog 100000000 \
  --stock-url "$(url 1)" --invoice-url "$(url 2)" --notifier-url "$(url 3)"
start stock 1 --upstream "$(url 0)" --invoice-url "$(url 2)" --catalog "$D/catalog.toml"
start invoice 2 --upstream "$(url 1)" --tax-rate-bps 2000
[ "$STAGE" = receiver ] && start notifier 3 --upstream "$(url 2)"
wait_until 0 stock 1 0
sleep 3
"$BIN/orderflow" --receiver "$(url 0)" load --concurrency 128 --orders "$N" --duration 1h \
  --skus SKU-0,SKU-1,SKU-2,SKU-3,SKU-4,SKU-5,SKU-6,SKU-7 "${BULK[@]}" --no-notified > "$D/load.txt"
if [ "$STAGE" = notifier ]; then
  wait_until 2 notifier 1 "$N"
  start notifier 3 --upstream "$(url 2)"
  wait_until 2 notifier 2 "$N"
else
  wait_until 3 receiver 1 "$N"
  wait_until 3 receiver 2 "$N"
  sleep 5
fi
pid=PID_$STAGE
kill "${!pid}"
wait "${!pid}" || true
echo "$STAGE: $(grep -h '^totals' "$D/callgrind.out" | cut -d' ' -f2) instructions for $N orders"
cp "$D/callgrind.out" "callgrind.$STAGE.$N.out"
