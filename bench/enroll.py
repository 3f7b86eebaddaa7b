#!/usr/bin/env python3
"""Enrollment throughput: N machines enrolling at once against a real server.

The server is `dynfarm.py server` in its own process on 127.0.0.1 (TLS, CSR
checking and signing with openssl, sqlite), fed N simultaneous enrollments of
N distinct machines (keys and CSRs made beforehand). Printed: enrollments/s,
p50/p99 latency, failures, distinct addresses, and this machine's floor
measured in the same run:

    floor = cores / (server CPU of one TLS handshake + CPU of one signing call)

i.e. what the server could do if it spent nothing but the two costs it cannot
avoid. The handshake and the signing call are measured apart, before and
after each round (the mean is used): this machine's speed drifts by a tenth
from one minute to the next. The in-round floor takes openssl's share of
the signing call from the round itself (the server's reaped children), so
it is measured at the same moment as the throughput; its ratio moves by a
point or two between rounds where the other moves by ten.

Beside it, in the same round and with the same load generator, a reference:
the same path built by hand (TLS, one signing call, no HTTP library, no
database). Rounds run on fresh sites; the median ratio is the result.

Usage: bench/enroll.py [N [ROUNDS]] (default 500 3). Loopback only; bounded.
"""

import concurrent.futures
import contextlib
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
import threading
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
    client_ctx = ssl.create_default_context(cafile=config.state.ca_cert)
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
    """(caller's, openssl's) CPU of one signing call as the server makes it."""
    pki = dynfarm.PKI(config.state)
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    for i in range(rounds):
        pki.sign_client(csrs[i % len(csrs)], f"bench-{i:04d}", dynfarm.new_serial())
    own2, kids2 = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return ((own2.ru_utime + own2.ru_stime - own.ru_utime - own.ru_stime) / rounds,
            (kids2.ru_utime + kids2.ru_stime - kids.ru_utime - kids.ru_stime) / rounds)


class Enrollment:
    """One enrollment over its own non-blocking TLS connection, driven by
    drive(): connect, handshake, send the prebuilt request, read to EOF."""

    def __init__(self, port, ctx, request, source):
        self.request = request
        self.started = time.monotonic()
        self.chunks = []
        self.result = None
        raw = socket.socket()
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)    # as the client (http.client) does
        raw.bind((source, 0))
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


PER_SOURCE = 100        # under the server's per-source connection cap (TLSServer.max_per_source)


def drive(port, ctx, requests, timeout):
    """All requests at once, from this one thread: the load generator shares
    the cores with the server, and 500 client threads fighting for the GIL
    would spend more CPU than the server's own Python does."""
    selector = selectors.DefaultSelector()
    # From several addresses (many NATs), each under the server's per-source
    # cap: this measures throughput, not the cap.
    sources = -(-len(requests) // PER_SOURCE)
    pending = [Enrollment(port, ctx, request, f"127.0.{2 + i % sources // 250}.{2 + i % sources % 250}")
               for i, request in enumerate(requests)]
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


def enroll_requests(conf, csrs):
    """One enrollment request per CSR, under one token with a use for each."""
    token = subprocess.run([sys.executable, DYNFARM, "-c", conf, "token", "bench", "--uses", str(len(csrs))],
                           check=True, capture_output=True, text=True).stdout.strip()
    version = hashlib.sha256(dynfarm.read_own_source()).hexdigest()
    return [http_post("/v1/enroll", json.dumps({
        "version": version, "token": token, "machine_id": f"bench{i}", "hostname": f"vm{i}",
        "csr": csr, "host_keys": [], "facts": {}}).encode()) for i, csr in enumerate(csrs)]


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


def reference_server(conf):
    """The same path built by hand, as a baseline: TLS with the server's own
    context, one thread per connection, the request read, one signing call
    (dynfarm's own), the certificate sent back. No HTTP library, no database,
    no validation, no customization. Runs until terminated."""
    config = dynfarm.load_config(conf)
    pki = dynfarm.PKI(config.state)
    tls = dynfarm.server_tls_context(config)
    listener = socket.create_server((config.listen_host, config.listen_port), backlog=1024)
    counter = iter(range(1 << 30))

    def serve(raw):
        try:
            with tls.wrap_socket(raw, server_side=True) as conn:
                data = b""
                while b"\r\n\r\n" not in data:
                    data += conn.recv(65536)
                head, _, body = data.partition(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                while len(body) < length:
                    body += conn.recv(65536)
                i = next(counter)
                certificate = pki.sign_client(json.loads(body)["csr"], f"ref-{i:04d}", dynfarm.new_serial())
                answer = json.dumps({"address": f"ref-{i}", "certificate": certificate}).encode()
                conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n" % len(answer) + answer)
        except (OSError, ValueError, IndexError):
            pass
    while True:
        raw, _ = listener.accept()
        threading.Thread(target=serve, args=(raw,), daemon=True).start()


def file_creation_cpu(directory, count=100):
    """CPU seconds to create one small file in directory, as a new host's
    client-config entry is made: this machine's unjournaled ext4 makes that
    cost anything from 50 us to over 1 ms, depending on its recent deletions.
    The files stay (a deletion would slow the next creations)."""
    os.makedirs(directory)
    started = time.thread_time()
    for i in range(count):
        fd = os.open(os.path.join(directory, f"f{i}"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.write(fd, b"ifconfig-push 10.64.0.2 255.255.248.0\n")
        os.close(fd)
    return (time.thread_time() - started) / count


def floor_now(config, csrs):
    """(handshake, signing: caller's, signing: openssl's) CPU seconds, measured now."""
    return (handshake_cpu(config), *signing_cpu(config, csrs))


@contextlib.contextmanager
def running_server(argv, port, tmp):
    """A server process (argv) answering on port; terminated on leaving."""
    server = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=open(os.path.join(tmp, "server.log"), "a"))
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    sys.exit(f"bench: the server did not start; see {tmp}/server.log")
                time.sleep(0.05)
        os.sync()   # what the set-up wrote must not be flushed on the clock
        yield server
    finally:
        server.terminate()
        server.wait(10)


def one_round(argv, port, ctx, bodies, tmp):
    """Start a server (argv), fire all bodies at it at once; the figures of that run."""
    with running_server(argv, port, tmp) as server:
        cpu_before, load_before, idle_before = process_cpu(server.pid), cpu_seconds(), machine_idle()
        started = time.monotonic()
        results = drive(port, ctx, bodies, 180)
        elapsed = time.monotonic() - started
        own, children = (after - before for after, before in zip(process_cpu(server.pid), cpu_before))
        ok = [r for r in results if r[0] == 200]
        return {"results": results, "ok": len(ok), "rate": len(ok) / elapsed, "elapsed": elapsed,
                "addresses": len({r[1] for r in ok}), "own": own, "children": children,
                "load": cpu_seconds() - load_before, "idle": machine_idle() - idle_before}


def dynfarm_round(tmp, csrs, index):
    """A fresh site, a token, and the dynfarm server under all the enrollments."""
    site = os.path.join(tmp, f"site{index}")
    os.mkdir(site)
    port = free_port()
    conf = make_site(site, port)
    config = dynfarm.load_config(conf)
    bodies = enroll_requests(conf, csrs)
    ctx = ssl.create_default_context(cafile=config.state.ca_cert)
    before = floor_now(config, csrs)
    creation = file_creation_cpu(os.path.join(config.state.root, "fs-probe"))
    run = one_round([sys.executable, DYNFARM, "-c", conf, "server"], port, ctx, bodies, site)
    reference = one_round([sys.executable, os.path.abspath(__file__), "--reference", conf], port, ctx, bodies, site)
    after = floor_now(config, csrs)
    run["hs"], run["caller"], run["openssl"] = ((b + a) / 2 for b, a in zip(before, after))
    run["floor"] = os.cpu_count() / (run["hs"] + run["caller"] + run["openssl"])
    # The same floor with openssl's CPU as the round's own signatures spent it:
    # measured at the same moment as the throughput, not a minute apart.
    for r in (run, reference):
        r["floor_in_round"] = os.cpu_count() / (run["hs"] + run["caller"] + r["children"] / max(r["ok"], 1))
    run["reference"] = reference
    run["creation"] = creation
    return run


def report(i, r, n):
    per = 1000 / max(r["ok"], 1)
    ref = r["reference"]
    print(f"\nround {i}: {n} at once, {r['ok']} ok, {n - r['ok']} failed, {r['addresses']} distinct addresses")
    if r["ok"] < n:
        kinds = {}
        for res in r["results"]:
            if res[0] != 200:
                kinds[str(res[0])] = kinds.get(str(res[0]), 0) + 1
        print(f"  failures:        {kinds}")
    latencies = sorted(res[2] for res in r["results"])
    print(f"  throughput:      {r['rate']:.0f} enrollments/s over {r['elapsed']:.2f} s, latency p50 "
          f"{statistics.median(latencies) * 1000:.0f} ms, p99 {latencies[int(0.99 * (len(latencies) - 1))] * 1000:.0f} ms")
    print(f"  server CPU:      {(r['own'] + r['children']) * per:.1f} ms per enrollment: {r['own'] * per:.1f} ms in "
          f"the server process, {r['children'] * per:.1f} ms in openssl")
    print(f"  load generator:  {r['load'] * per:.1f} ms CPU per enrollment (this process, on the same cores); "
          f"cores idle {r['idle'] / (os.cpu_count() * r['elapsed']):.0%} of the time")
    print(f"  floor:           {r['floor']:.0f} enrollments/s = {os.cpu_count()} cores / ({r['hs'] * 1000:.2f} ms "
          f"TLS handshake + {(r['caller'] + r['openssl']) * 1000:.2f} ms signing: {r['caller'] * 1000:.2f} caller, "
          f"{r['openssl'] * 1000:.2f} openssl), mean of before and after the round")
    print(f"  in-round floor:  {r['floor_in_round']:.0f} enrollments/s, the same with openssl's CPU as this round's "
          f"signatures spent it ({r['children'] * per:.2f} ms)")
    print(f"  filesystem:      {r['creation'] * 1e6:.0f} us of CPU to create a file in the state directory "
          f"(dynfarm writes one per new host, the reference none)")
    print(f"  reference:       {ref['rate']:.0f} enrollments/s ({ref['ok']} ok) for the path built by hand, "
          f"server CPU {(ref['own'] + ref['children']) * 1000 / max(ref['ok'], 1):.1f} ms per enrollment, "
          f"cores idle {ref['idle'] / (os.cpu_count() * ref['elapsed']):.0%}")
    print(f"  ratio:           {r['rate'] / r['floor']:.0%} of the floor, {r['rate'] / r['floor_in_round']:.0%} of the "
          f"in-round floor; reference {ref['rate'] / r['floor']:.0%}, {ref['rate'] / ref['floor_in_round']:.0%}")


def main():
    args = sys.argv[1:]
    if args[:1] == ["--reference"]:
        return reference_server(args[1])
    n = int(args[0]) if args else 500
    rounds = int(args[1]) if len(args) > 1 else 3
    with tempfile.TemporaryDirectory(prefix="dynfarm-bench-") as tmp:
        print(f"making {n} machine keys and CSRs ...", flush=True)
        csrs = make_machines(tmp, n)
        runs = []
        for i in range(1, rounds + 1):
            runs.append(dynfarm_round(tmp, csrs, i))
            report(i, runs[-1], n)
    def median(of):
        return f"{statistics.median(of(r) for r in runs):.0%}"
    failures = sum(n - r["ok"] for r in runs) + sum(n - r["reference"]["ok"] for r in runs)
    print(f"\nmedian of {rounds} rounds (target: at least 70%):")
    print(f"  dynfarm:         {median(lambda r: r['rate'] / r['floor'])} of the floor, "
          f"{median(lambda r: r['rate'] / r['floor_in_round'])} of the in-round floor")
    print(f"  built by hand:   {median(lambda r: r['reference']['rate'] / r['floor'])} of the floor, "
          f"{median(lambda r: r['reference']['rate'] / r['reference']['floor_in_round'])} of the in-round floor")
    return 0 if failures == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
