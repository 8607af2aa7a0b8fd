#!/usr/bin/env python3
"""What forwarding costs the receiver (BENCHMARKS.md, "2026-12-04, late night").

usage: bench/forward-cost.py BIN_DIR ORDERS [calls]

Starts two receiver replicas of BIN_DIR (release binaries) over two partitions on loopback ports
53051/53052, no later stage, and places ORDERS orders at replica 0 with `orderflow load
--concurrency 128 --orders ORDERS --no-notified` over `PlaceOrders` streams (`--bulk`), or with
`calls` one `PlaceOrder` call each. Orders come from many customers, so about half live in
partition 1 and are forwarded to replica 1. Prints one JSON line: orders, the orders each replica
holds, and each replica's (utime + stime) from /proc/<pid>/stat over the load, per order placed.
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

TICK = os.sysconf("SC_CLK_TCK")
PEERS = "http://127.0.0.1:53051,http://127.0.0.1:53052"


def cpu_seconds(pid):
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def head(port):
    out = subprocess.run(
        ["grpcurl", "-plaintext", "-d", '{"partition": %d}' % (port - 53051),
         f"127.0.0.1:{port}", "orderflow.v1.EventLog/Head"],
        capture_output=True, text=True, check=True,
    ).stdout
    return int(json.loads(out).get("nextOffset", 0))


def main():
    bin_dir, orders = sys.argv[1], sys.argv[2]
    how = sys.argv[3] if len(sys.argv) > 3 else "stream"
    if how not in ("stream", "calls"):
        sys.exit(f"usage: {sys.argv[0]} BIN_DIR ORDERS [calls]")
    data = tempfile.mkdtemp()
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env.update(OTEL_TRACES_SAMPLER="parentbased_traceidratio", OTEL_TRACES_SAMPLER_ARG="0.01")
    replicas = [
        subprocess.Popen(
            [f"{bin_dir}/orderflow-receiver", "--listen", f"127.0.0.1:{53051 + i}",
             "--metrics-listen", "none", "--http-listen", "none", "--data-dir", f"{data}/{i}",
             "--stock-url", "none", "--invoice-url", "none", "--notifier-url", "none",
             "--retain-for", "none", "--partitions", "2", "--replicas", "2",
             "--replica", str(i), "--peers", PEERS],
            env=env, **quiet,
        )
        for i in range(2)
    ]
    try:
        time.sleep(1.5)
        before = [cpu_seconds(r.pid) for r in replicas]
        load = subprocess.run(
            [f"{bin_dir}/orderflow", "--receiver", "http://127.0.0.1:53051", "load",
             "--concurrency", "128", "--orders", orders, "--duration", "1h", "--no-notified",
             "--json", "--customers", "1000"] + (["--bulk"] if how == "stream" else []),
            capture_output=True, text=True, check=True, env=env,
        )
        accepted = json.loads(load.stdout)["accepted"]
        time.sleep(0.5)
        after = [cpu_seconds(r.pid) for r in replicas]
        print(json.dumps({
            "how": how,
            "orders": accepted,
            "held": [head(53051), head(53052)],
            "cpu_us_per_order": [round((a - b) / accepted * 1e6, 1) for a, b in zip(after, before)],
            "receivers_cpu_us_per_order": round((sum(after) - sum(before)) / accepted * 1e6, 1),
        }))
    finally:
        for process in replicas:
            process.kill()
            process.wait()
        shutil.rmtree(data, ignore_errors=True)


if __name__ == "__main__":
    main()
