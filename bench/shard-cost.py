#!/usr/bin/env python3
"""The stock stage's CPU per order over P shards (BENCHMARKS.md, "2026-12-04, night").

usage: bench/shard-cost.py BIN_DIR P LINES

Starts one receiver and one stock replica of BIN_DIR (release binaries) over P partitions on
loopback ports 52051/52052 (metrics 52952), no later stage; runs `orderflow load --concurrency
128 --duration 5s --no-notified --lines LINES`; waits until the stock has decided every accepted
order; prints one JSON line: orders, hold requests (orders that asked other shards), and the
stock's (utime + stime) from /proc/<pid>/stat over that time, per order.
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request

TICK = os.sysconf("SC_CLK_TCK")
METRICS = "http://127.0.0.1:52952/metrics"


def cpu_seconds(pid):
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def processed(*outcomes):
    text = urllib.request.urlopen(METRICS).read().decode()
    total = 0.0
    for line in text.splitlines():
        if (
            line.startswith("orderflow_events_processed_total{")
            and 'stage="stock"' in line
            and any(f'outcome="{o}"' in line for o in outcomes)
        ):
            total += float(line.rsplit(" ", 1)[1])
    return total


def main():
    bin_dir, partitions, lines = sys.argv[1], sys.argv[2], sys.argv[3]
    data = tempfile.mkdtemp()
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    receiver = subprocess.Popen(
        [f"{bin_dir}/orderflow-receiver", "--listen", "127.0.0.1:52051",
         "--metrics-listen", "none", "--http-listen", "none", "--data-dir", f"{data}/r",
         "--stock-url", "none", "--invoice-url", "none", "--notifier-url", "none",
         "--retain-for", "stock", "--partitions", partitions],
        **quiet,
    )
    stock = subprocess.Popen(
        [f"{bin_dir}/orderflow-stock", "--listen", "127.0.0.1:52052",
         "--metrics-listen", "127.0.0.1:52952", "--data-dir", f"{data}/s",
         "--upstream", "http://127.0.0.1:52051", "--invoice-url", "http://127.0.0.1:52059",
         "--retain-for", "none", "--partitions", partitions],
        **quiet,
    )
    try:
        time.sleep(1.5)
        before = cpu_seconds(stock.pid)
        load = subprocess.run(
            [f"{bin_dir}/orderflow", "--receiver", "http://127.0.0.1:52051", "load",
             "--concurrency", "128", "--duration", "5s", "--no-notified", "--json",
             "--lines", lines],
            capture_output=True, text=True, check=True,
        )
        accepted = json.loads(load.stdout)["accepted"]
        deadline = time.time() + 120
        decided = 0.0
        while time.time() < deadline:
            decided = processed("reserved", "rejected")
            if decided >= accepted:
                break
            time.sleep(0.2)
        after = cpu_seconds(stock.pid)
        print(json.dumps({
            "partitions": int(partitions),
            "lines": int(lines),
            "orders": accepted,
            "decided": decided,
            "hold_requests": processed("held", "refused"),
            "stock_cpu_us_per_order": round((after - before) / accepted * 1e6, 1),
        }))
    finally:
        for process in (receiver, stock):
            process.kill()
            process.wait()
        shutil.rmtree(data, ignore_errors=True)


if __name__ == "__main__":
    main()
