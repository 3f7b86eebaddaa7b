#!/usr/bin/env python3
"""Enrollment throughput: N machines enrolling at once against a real server.

The server is `dynfarm.py server` in its own process on 127.0.0.1 (TLS, CSR
checking and signing with openssl, sqlite), fed N simultaneous enrollments of
N distinct machines (keys and CSRs made beforehand). Printed: enrollments/s,
p50/p99 latency, failures, distinct addresses, and this machine's floor
measured in the same run:

    floor = cores / (server CPU of one TLS handshake + CPU of one signing call)

i.e. what the server could do if it spent nothing but the two costs it cannot
avoid. Usage: bench/enroll.py [N] (default 500). Loopback only; bounded.
"""

import concurrent.futures
import hashlib
import json
import os
import resource
import selectors
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import dynfarm  # noqa: E402

DYNFARM = os.path.join(REPO, "dynfarm.py")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_site(tmp, port):
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", os.path.join(tmp, "admin")], check=True)
    conf = os.path.join(tmp, "site.conf")
    with open(conf, "w") as f:
        f.write(f"[site]\nstate_dir = state\nlisten = 127.0.0.1:{port}\npublic_address = 127.0.0.1\n"
                "ssh_keys = admin.pub\nrequest_timeout = 60\n\n"
                "[provider:bench]\nvpn_port = 1194\nvpn_subnet = 10.64.0.0/21\n")
    subprocess.run([sys.executable, DYNFARM, "-c", conf, "init"], check=True, stdout=subprocess.DEVNULL)
    return conf


def make_machines(tmp, n):
    """n (key, CSR) pairs, made in parallel before the clock starts."""
    def one(i):
        key = os.path.join(tmp, f"m{i}.key")
        dynfarm.make_key(key)
        return dynfarm.make_csr(key, "dynfarm-client")
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        return list(pool.map(one, range(n)))


def cpu_seconds():
    """This process's CPU time plus its reaped children's."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def handshake_cpu(config, rounds=200):
    """Server-side CPU of one TLS handshake, with the server's own context, in memory."""
    server_ctx = dynfarm.server_tls_context(config)
    client_ctx = ssl.create_default_context(cafile=config.state("pki", "ca.crt"))
    spent = 0.0
    for _ in range(rounds):
        c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
        client = client_ctx.wrap_bio(c_in, c_out, server_hostname="127.0.0.1")
        server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
        done = {client: False, server: False}
        while not all(done.values()):
            for side, out, peer_in in ((client, c_out, s_in), (server, s_out, c_in)):
                if not done[side]:
                    started = time.thread_time()
                    try:
                        side.do_handshake()
                        done[side] = True
                    except ssl.SSLWantReadError:
                        pass
                    if side is server:
                        spent += time.thread_time() - started
                peer_in.write(out.read())
    return spent / rounds


def signing_cpu(config, csrs, rounds=40):
    """CPU of one signing call as the server makes it (openssl included)."""
    pki = dynfarm.PKI(config.state("pki"))
    started = cpu_seconds()
    for i in range(rounds):
        pki.sign_client(csrs[i % len(csrs)], f"bench-{i:04d}")
    return (cpu_seconds() - started) / rounds


class Enrollment:
    """One enrollment over its own non-blocking TLS connection, driven by
    drive(): connect, handshake, send the prebuilt request, read to EOF."""

    def __init__(self, port, ctx, request):
        self.request = request
        self.started = time.monotonic()
        self.chunks = []
        self.result = None
        raw = socket.socket()
        raw.setblocking(False)
        raw.connect_ex(("127.0.0.1", port))
        self.tls = ctx.wrap_socket(raw, server_hostname="127.0.0.1", do_handshake_on_connect=False)
        self.step = self.handshake

    def handshake(self):
        self.tls.do_handshake()
        self.step = self.send
        return self.send()

    def send(self):
        while self.request:
            self.request = self.request[self.tls.send(self.request):]
        self.step = self.receive
        return self.receive()

    def receive(self):
        while True:
            chunk = self.tls.recv(65536)
            if not chunk:
                return self.finish()
            self.chunks.append(chunk)

    def finish(self):
        head, _, body = b"".join(self.chunks).partition(b"\r\n\r\n")
        status = int(head.split(None, 2)[1])
        return status, json.loads(body).get("address"), time.monotonic() - self.started

    def advance(self):
        """Run as far as the socket allows; the selector event it waits for
        next, or None once self.result is set."""
        try:
            self.result = self.step()
            return None
        except ssl.SSLWantReadError:
            return selectors.EVENT_READ
        except ssl.SSLWantWriteError:
            return selectors.EVENT_WRITE
        except (OSError, ValueError, IndexError) as e:
            self.result = repr(e), None, time.monotonic() - self.started
            return None


def drive(port, ctx, requests, timeout):
    """All requests at once, from this one thread: the load generator shares
    the cores with the server, and 500 client threads fighting for the GIL
    would spend more CPU than the server's own Python does."""
    selector = selectors.DefaultSelector()
    pending = [Enrollment(port, ctx, request) for request in requests]
    for e in pending:
        selector.register(e.tls, selectors.EVENT_WRITE, e)   # writable once connected
    left, deadline = len(pending), time.monotonic() + timeout
    while left and time.monotonic() < deadline:
        for key, _ in selector.select(1):
            e = key.data
            wanted = e.advance()
            if wanted is None:
                selector.unregister(e.tls)
                e.tls.close()
                left -= 1
            elif wanted != key.events:
                selector.modify(e.tls, wanted, e)
    for e in pending:
        if e.result is None:
            e.result = "timed out", None, time.monotonic() - e.started
            e.tls.close()
    return [e.result for e in pending]


def http_post(path, body):
    return (f"POST {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def process_cpu(pid):
    """(own, reaped children's) CPU seconds of a live process, from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / tick, (int(fields[13]) + int(fields[14])) / tick


def machine_idle():
    """Seconds all cores spent idle so far, from /proc/stat."""
    with open("/proc/stat") as f:
        fields = f.readline().split()
    return (int(fields[4]) + int(fields[5])) / os.sysconf("SC_CLK_TCK")


def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 500
    cores = os.cpu_count()
    with tempfile.TemporaryDirectory(prefix="dynfarm-bench-") as tmp:
        port = free_port()
        conf = make_site(tmp, port)
        config = dynfarm.load_config(conf)
        token = subprocess.run([sys.executable, DYNFARM, "-c", conf, "token", "bench", "--uses", str(n)],
                               check=True, capture_output=True, text=True).stdout.strip()
        print(f"making {n} machine keys and CSRs ...", flush=True)
        csrs = make_machines(tmp, n)
        hs = handshake_cpu(config)
        sig = signing_cpu(config, csrs)
        floor = cores / (hs + sig)
        version = hashlib.sha256(dynfarm.read_own_source()).hexdigest()
        bodies = [http_post("/v1/enroll", json.dumps({
            "version": version, "token": token, "machine_id": f"bench{i}", "hostname": f"vm{i}",
            "csr": csr, "host_keys": [], "facts": {}}).encode()) for i, csr in enumerate(csrs)]
        server = subprocess.Popen([sys.executable, DYNFARM, "-c", conf, "server"],
                                  stdout=subprocess.DEVNULL, stderr=open(os.path.join(tmp, "server.log"), "w"))
        try:
            ctx = ssl.create_default_context(cafile=config.state("pki", "ca.crt"))
            deadline = time.monotonic() + 20
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        sys.exit("bench: the server did not start; see its log")
                    time.sleep(0.05)
            os.sync()   # the keys just written must not be flushed on the clock
            cpu_before = process_cpu(server.pid)
            load_before = cpu_seconds()
            idle_before = machine_idle()
            started = time.monotonic()
            results = drive(port, ctx, bodies, 180)
            elapsed = time.monotonic() - started
            own, children = (after - before for after, before in zip(process_cpu(server.pid), cpu_before))
            load = cpu_seconds() - load_before
            idle = machine_idle() - idle_before
        finally:
            server.terminate()
            server.wait(10)
    ok = [r for r in results if r and r[0] == 200]
    failures = n - len(ok)
    latencies = sorted(r[2] for r in results if r)
    rate = len(ok) / elapsed
    print(f"\nenrollments:     {n} at once, {len(ok)} ok, {failures} failed, "
          f"{len({r[1] for r in ok})} distinct addresses")
    if failures:
        kinds = {}
        for r in results:
            if not r or r[0] != 200:
                kinds[str(r and r[0])] = kinds.get(str(r and r[0]), 0) + 1
        print(f"failures:        {kinds}")
    per = 1000 / max(len(ok), 1)
    print(f"throughput:      {rate:.0f} enrollments/s over {elapsed:.2f} s")
    print(f"server CPU:      {(own + children) * per:.1f} ms per enrollment: {own * per:.1f} ms in the server "
          f"process, {children * per:.1f} ms in openssl")
    print(f"load generator:  {load * per:.1f} ms CPU per enrollment (this process, on the same cores)")
    print(f"idle:            {idle / (cores * elapsed):.0%} of the {cores} cores' time during the run")
    print(f"latency:         p50 {statistics.median(latencies) * 1000:.0f} ms, "
          f"p99 {latencies[int(0.99 * (len(latencies) - 1))] * 1000:.0f} ms")
    print(f"floor:           {floor:.0f} enrollments/s = {cores} cores / "
          f"({hs * 1000:.2f} ms TLS handshake + {sig * 1000:.2f} ms signing), measured in this run")
    print(f"ratio:           {rate / floor:.0%} of the floor (target: at least 70%)")
    return 0 if failures == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
