#!/usr/bin/env python3
"""A boot storm: 1,000 VMs enrolling at the same moment, as when a provider
starts a fleet, against a real `dynfarm.py server` on 127.0.0.1.

First, in the same run and against the same server, the baseline: one
client alone, ten times in a row (its median latency). Then all N at once,
each on its own TLS connection opened in the same instant, from N/100
source addresses of 127/8 (as from several NATs: each under the server's
per-source cap, so that this measures the burst and not the cap).

Printed: failures (the target is none: every VM enrolled at the first try,
no 429 or 503 to retry), distinct addresses, throughput, latency p50/p99/max
of the burst, and p99 against one client alone.

Usage: bench/burst.py [N] (default 1000). Loopback only; bounded (180 s).
"""

import ssl
import statistics
import sys
import tempfile
import time

from enroll import PER_SOURCE, drive, enroll_requests, free_port, make_machines, make_site, running_server

import dynfarm  # noqa: E402  (enroll put the repository on sys.path)

ALONE = 10


def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
    dynfarm.raise_open_files_limit(n + 256)        # one socket per VM in this process
    with tempfile.TemporaryDirectory(prefix="dynfarm-burst-") as tmp:
        print(f"making {n + ALONE} machine keys and CSRs ...", flush=True)
        csrs = make_machines(tmp, n + ALONE)
        port = free_port()
        conf = make_site(tmp, port)
        requests = enroll_requests(conf, csrs)
        ctx = ssl.create_default_context(cafile=dynfarm.load_config(conf).state.ca_cert)
        with running_server([sys.executable, dynfarm.__file__, "-c", conf, "server"], port, tmp):
            alone = [drive(port, ctx, [request], 30)[0] for request in requests[:ALONE]]
            started = time.monotonic()
            burst = drive(port, ctx, requests[ALONE:], 180)
            elapsed = time.monotonic() - started
    failed = [r for r in alone + burst if r[0] != 200]
    ok = [r for r in burst if r[0] == 200]
    one = statistics.median(r[2] for r in alone)
    latencies = sorted(r[2] for r in burst)
    p50, p99 = statistics.median(latencies), latencies[int(0.99 * (len(latencies) - 1))]
    print(f"one client alone:  {one * 1000:.0f} ms (median of {ALONE}, "
          f"{min(r[2] for r in alone) * 1000:.0f}-{max(r[2] for r in alone) * 1000:.0f} ms)")
    print(f"{n} at once:       {len(ok)} enrolled, {len(failed)} failed, {len({r[1] for r in ok})} distinct "
          f"addresses, from {-(-n // PER_SOURCE)} source addresses")
    if failed:
        kinds = {}
        for r in failed:
            kinds[str(r[0])] = kinds.get(str(r[0]), 0) + 1
        print(f"  failures:        {kinds}")
    print(f"  throughput:      {len(ok) / elapsed:.0f} enrollments/s, all done in {elapsed:.2f} s")
    print(f"  latency:         p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms, max {latencies[-1] * 1000:.0f} ms")
    print(f"  p99 / alone:     {p99 / one:.0f}x: the last VMs of the storm wait for the {n} before them "
          f"({n} / throughput = {n / (len(ok) / elapsed):.2f} s)")
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
