"""Crash safety of enrollment: the server killed with SIGKILL in the middle of
a burst, then restarted. Nothing half done survives it: no host without a
certificate it could use, no address given twice, no client-config entry
without its host (or host without its entry), no temp file; and every
client finishes by itself, retrying as the real client does.

Also the reconciliation the server does at start, on a state directory
damaged by hand as a crash could leave it.
"""

import concurrent.futures
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time

import dynfarm
from helpers import SITE_TEMPLATE, call, enroll_body, write_site

DYNFARM = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "dynfarm.py")


def test_the_server_mends_at_start_what_a_crash_left(app, make_csr, capfd):
    config = app.config
    token, _ = dynfarm.new_token(app.store, "aruba", 3, 60)
    for _ in range(3):
        call(app, "/v1/enroll", enroll_body(token, make_csr()[1]))
    ccd = config.state.ccd_dir("aruba")
    entry = open(os.path.join(ccd, "aruba-0001")).read()
    open(os.path.join(ccd, "aruba-0001"), "w").close()                 # written in place, cut short
    os.unlink(os.path.join(ccd, "aruba-0002"))                          # lost
    with open(os.path.join(ccd, "aruba-0009"), "w") as f:               # a host whose row never came
        f.write("ifconfig-push 10.8.0.10 255.255.255.0\n")
    for temp in (os.path.join(ccd, ".dynfarm-x1"), os.path.join(config.state.pki, ".dynfarm-x2")):
        open(temp, "w").close()
    capfd.readouterr()
    dynfarm.App(config)
    log = capfd.readouterr().err
    assert "removed the client-config entries of hosts not enrolled: aruba-0009" in log
    assert "wrote missing or partial client-config entries: aruba-0001, aruba-0002" in log
    assert "removed temp files of interrupted writes: ccd/aruba/.dynfarm-x1, pki/.dynfarm-x2" in log
    assert sorted(os.listdir(ccd)) == ["aruba-0001", "aruba-0002", "aruba-0003"]
    assert open(os.path.join(ccd, "aruba-0001")).read() == entry
    capfd.readouterr()
    dynfarm.App(config)                                                 # nothing left to mend
    assert "reconciled" not in capfd.readouterr().err


# --- a burst, a SIGKILL, a restart ------------------------------------------------

class Machine:
    """A VM's enrollment as the client does it: retry while nobody answers,
    answer a nonce challenge, give up only on a final refusal."""

    def __init__(self, tmp, index, token):
        self.key = os.path.join(tmp, f"m{index}.key")
        dynfarm.make_key(self.key)
        self.body = enroll_body(token, dynfarm.make_csr(self.key, "dynfarm-client"), machine_id=f"m{index}")
        self.answer = None
        self.tries = 0

    def enroll(self, port, ctx, deadline):
        while time.monotonic() < deadline:
            self.tries += 1
            status, answer = post(port, ctx, self.body)
            if status == 200:
                self.answer = answer
                return 200
            if status == 401 and "nonce" in answer:      # enrolled by a request whose answer was lost
                self.body = dict(self.body, csr=dynfarm.make_csr(self.key, dynfarm.NONCE_PREFIX + answer["nonce"]))
                continue
            if status is not None and status not in (409, 429, 503):
                return status
            time.sleep(0.05 * min(self.tries, 20))
        return None


def post(port, ctx, body):
    raw = json.dumps(body).encode()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with ctx.wrap_socket(sock, server_hostname="127.0.0.1") as tls:
                tls.sendall(f"POST /v1/enroll HTTP/1.1\r\nContent-Length: {len(raw)}\r\n\r\n".encode() + raw)
                reply = tls.makefile("rb").read()
    except OSError:
        return None, {}
    head, _, body = reply.partition(b"\r\n\r\n")
    if not head:
        return None, {}
    return int(head.split()[1]), json.loads(body or b"{}")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(conf, log):
    return subprocess.Popen([sys.executable, DYNFARM, "-c", conf, "server"], stdout=log, stderr=log)


def test_a_burst_survives_a_sigkill_of_the_server(tmp_path):
    port = free_port()
    conf = write_site(str(tmp_path), SITE_TEMPLATE.format(
        listen=f"127.0.0.1:{port}", public_address="127.0.0.1", request_timeout=5, networks=""))
    assert dynfarm.main(["-c", conf, "init"]) == 0
    config = dynfarm.load_config(conf)
    store = dynfarm.open_store(config)
    token, _ = dynfarm.new_token(store, "aruba", 200, 3600)
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        machines = list(pool.map(lambda i: Machine(str(tmp_path), i, token), range(200)))
    ctx = ssl.create_default_context(cafile=config.state.ca_cert)
    log = open(tmp_path / "server.log", "ab")
    server = start_server(conf, log)
    try:
        deadline = time.monotonic() + 120
        with concurrent.futures.ThreadPoolExecutor(200) as pool:
            results = [pool.submit(m.enroll, port, ctx, deadline) for m in machines]
            killed_at = []
            for mark in (40, 90, 140):                                # three times in the burst
                while sum(1 for m in machines if m.answer) < mark:
                    assert time.monotonic() < deadline, f"the burst stalled before {mark}"
                    time.sleep(0.005)
                server.send_signal(signal.SIGKILL)
                server.wait()
                killed_at.append(sum(1 for m in machines if m.answer))
                time.sleep(0.2)
                server = start_server(conf, log)
            statuses = [r.result() for r in results]
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(10)
        log.close()
    assert killed_at[-1] < 200
    assert statuses == [200] * 200
    hosts = store.hosts()
    assert len(hosts) == 200
    assert len({h["address"] for h in hosts}) == 200 and len({h["name"] for h in hosts}) == 200
    # every client holds the host the database has for its key, with the address of its entry
    by_name = {h["name"]: h for h in hosts}
    for m in machines:
        host = by_name[m.answer["name"]]
        assert host["address"] == m.answer["address"]
        assert host["pubkey_sha256"] == dynfarm.check_csr(m.body["csr"])
    ccd = config.state.ccd_dir("aruba")
    assert sorted(os.listdir(ccd)) == sorted(by_name)
    for name, host in by_name.items():
        assert open(os.path.join(ccd, name)).read() == f"ifconfig-push {host['address']} 255.255.255.0\n"
    assert not [n for _, _, names in os.walk(config.state.root) for n in names if n.startswith(".dynfarm-")]
    assert store.token(token.split(".")[0])["uses_left"] == 0        # one use per host, none lost or doubled
