#!/usr/bin/env python3
"""The worst case of each parser a stranger can feed, at its size limit,
against the real `dynfarm.py server` on loopback, with health probed
throughout.

For each case: the time the server took to answer it (median of ROUNDS),
and the slowest health answer while ROUNDS of it were sent back to back,
beside the same figures for a plain health request (the baseline, same
run). A parser that backtracked, or a body that held the interpreter lock,
shows as a slow answer and a slow health.

Usage: bench/parsers.py [ROUNDS] (default 20). Loopback only; bounded.
"""

import base64
import hashlib
import json
import os
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import dynfarm  # noqa: E402

DYNFARM = os.path.join(REPO, "dynfarm.py")
VERSION = hashlib.sha256(dynfarm.read_own_source()).hexdigest()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(body):
    return (f"POST /v1/enroll HTTP/1.1\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body


def enroll_with(**fields):
    body = {"version": VERSION, "token": "0" * 12 + ".x", "machine_id": "m", "hostname": "h",
            "csr": "x", "host_keys": [], "facts": {}}
    body.update(fields)
    return post(json.dumps(body).encode())


BEGIN = "-----BEGIN CERTIFICATE REQUEST-----"
CASES = {   # name: request bytes, each at (or near) its limit
    "health (baseline)": b"GET /v1/health HTTP/1.0\r\n\r\n",
    "PEM: header + 8 KiB of spaces": enroll_with(csr=BEGIN + " " * (8192 - len(BEGIN))),
    "PEM: header + 8 KiB of newlines and junk": enroll_with(csr=BEGIN + "\n" * 8000 + "!" * 100),
    "DER: 8 KiB of nested SEQUENCEs": enroll_with(csr=BEGIN + "\n" + base64.b64encode(
        b"\x30\x82\x17\xf0" + b"\x30\x80" * 3000).decode()[:8000] + "\n-----END CERTIFICATE REQUEST-----"),
    "JSON: 64 KiB of nested lists": post(b"[" * 32000 + b"]" * 32000),
    "JSON: 64 KiB of one long number": post(b'{"a": ' + b"9" * 65000 + b"}"),
    "JSON: 64 KiB of escapes": post(b'{"a": "' + b"\\u00e9" * 10900 + b'"}'),
    "head: 16 KiB of headers": b"GET /v1/health HTTP/1.0\r\n" + b"X: " + b"a" * 16000 + b"\r\n\r\n",
    "head: 16 KiB of bare newlines": b"\n" * 16000 + b"GET /v1/health HTTP/1.0\r\n\r\n",
}


def exchange(port, ctx, data, source="127.0.0.1"):
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=60, source_address=(source, 0)) as sock:
        # As http.client does: else the request waits on the handshake's ACK (Nagle), 40 ms each.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with ctx.wrap_socket(sock, server_hostname="127.0.0.1") as tls:
            tls.sendall(data)
            line = tls.makefile("rb").readline()
    return line.split()[1].decode() if line else "closed", time.monotonic() - started


def measure(port, ctx, data, rounds):
    """(median seconds per request, its answer, slowest health meanwhile)."""
    health, stop = [], threading.Event()

    def probe():
        while not stop.is_set():
            health.append(exchange(port, ctx, CASES["health (baseline)"], source="127.0.0.2")[1])
    prober = threading.Thread(target=probe)
    prober.start()
    times, status = [], None
    try:
        for i in range(rounds):   # many sources: the guess limiter must not turn this into a 429 test
            status, seconds = exchange(port, ctx, data, source=f"127.0.1.{1 + i % 250}")
            times.append(seconds)
    finally:
        stop.set()
        prober.join()
    return statistics.median(times), status, max(health)


def main():
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 20
    with tempfile.TemporaryDirectory(prefix="dynfarm-bench-parsers-") as tmp:
        port = free_port()
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", os.path.join(tmp, "admin")], check=True)
        conf = os.path.join(tmp, "site.conf")
        with open(conf, "w") as f:
            f.write(f"[site]\nstate_dir = state\nlisten = 127.0.0.1:{port}\npublic_address = 127.0.0.1\n"
                    "ssh_keys = admin.pub\n\n[provider:bench]\nvpn_port = 1194\nvpn_subnet = 10.64.0.0/24\n")
        subprocess.run([sys.executable, DYNFARM, "-c", conf, "init"], check=True, stdout=subprocess.DEVNULL)
        server = subprocess.Popen([sys.executable, DYNFARM, "-c", conf, "server"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            ctx = ssl.create_default_context(cafile=os.path.join(tmp, "state", "pki", "ca.crt"))
            ctx.check_hostname = False
            deadline = time.monotonic() + 20
            while True:
                try:
                    exchange(port, ctx, CASES["health (baseline)"])
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.1)
            print(f"the worst input of each parser, {rounds} requests each, health probed meanwhile "
                  "(real server, loopback):")
            print(f"  {'case':44} {'answer':>7} {'per request':>12} {'slowest health':>15}")
            base = None
            for name, data in CASES.items():
                seconds, status, health = measure(port, ctx, data, rounds)
                base = base or (seconds, health)
                print(f"  {name:44} {status:>7} {seconds * 1000:9.1f} ms {health * 1000:12.1f} ms"
                      + ("" if name.startswith("health") else f"  ({seconds / base[0]:.1f}x the baseline)"))
        finally:
            server.terminate()
            server.wait(10)


if __name__ == "__main__":
    sys.exit(main())
