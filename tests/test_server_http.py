"""The real enrollment server (TLS, its loop and workers, sqlite) on 127.0.0.1, fed bad input.

Each bad request must get a 4xx or a closed connection, the server must keep
serving, and the database must not change.
"""

import dataclasses
import hashlib
import itertools
import json
import os
import resource
import selectors
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest

import dynfarm
from helpers import db_snapshot, enroll_body, tls_server


@pytest.fixture
def server(site):
    config, store, pki = site
    with tls_server(config) as (httpd, ctx):
        yield httpd, ctx, store


def url(httpd, path):
    return f"https://127.0.0.1:{httpd.server_address[1]}{path}"


def post(httpd, ctx, path, raw, headers=None):
    request = urllib.request.Request(url(httpd, path), data=raw, method="POST", headers=headers or {})
    try:
        with urllib.request.urlopen(request, context=ctx, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def healthy(httpd, ctx):
    with urllib.request.urlopen(url(httpd, "/v1/health"), context=ctx, timeout=5) as r:
        return json.loads(r.read())["ok"]


def raw_tls(httpd, ctx, data):
    """Send raw bytes over TLS; return the status line (or '' if closed)."""
    with socket.create_connection(("127.0.0.1", httpd.server_address[1]), timeout=10) as sock:
        with ctx.wrap_socket(sock, server_hostname="127.0.0.1") as tls:
            tls.sendall(data)
            return tls.makefile("rb").readline().decode()


def test_health_and_version(server):
    httpd, ctx, _ = server
    assert healthy(httpd, ctx)


def test_enroll_over_tls(server, make_csr):
    httpd, ctx, store = server
    token, _ = dynfarm.new_token(store, "aruba", 1, 60)
    status, answer = post(httpd, ctx, "/v1/enroll", json.dumps(enroll_body(token, make_csr()[1])).encode())
    assert status == 200 and answer["name"] == "aruba-0001"


@pytest.mark.parametrize("raw, status", [
    (b"{not json", 400),
    (b'{"version": 5}', 400),
    (json.dumps({"version": "0" * 64}).encode(), 401),
    (b"x" * (dynfarm.MAX_BODY + 1), 413),
])
def test_bad_bodies(server, raw, status):
    httpd, ctx, store = server
    before = db_snapshot(store)
    assert post(httpd, ctx, "/v1/enroll", raw)[0] == status
    assert db_snapshot(store) == before
    assert healthy(httpd, ctx)


def test_huge_content_length_is_refused_unread(server):
    httpd, ctx, store = server
    line = raw_tls(httpd, ctx, b"POST /v1/enroll HTTP/1.0\r\nContent-Length: 99999999999\r\n\r\n")
    assert line.split()[1] == "413"
    assert healthy(httpd, ctx)


def test_missing_content_length(server):
    httpd, ctx, _ = server
    assert raw_tls(httpd, ctx, b"POST /v1/enroll HTTP/1.0\r\n\r\n").split()[1] == "411"


def test_slow_client_is_cut_off_and_others_are_served(server):
    """A client that never finishes its request is closed after request_timeout (2 s here)."""
    httpd, ctx, store = server
    before = db_snapshot(store)
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", httpd.server_address[1]), timeout=30) as sock:
        with ctx.wrap_socket(sock, server_hostname="127.0.0.1") as tls:
            tls.sendall(b"POST /v1/enroll HTTP/1.0\r\nContent-Length: 500\r\n\r\n{")
            assert healthy(httpd, ctx)          # served while the slow one hangs
            assert tls.recv(1024) in (b"",)     # the server closes on us
    assert time.monotonic() - started < 20
    assert db_snapshot(store) == before


def test_no_tls_handshake_does_not_block_the_server(server):
    httpd, ctx, _ = server
    with socket.create_connection(("127.0.0.1", httpd.server_address[1]), timeout=30) as idle:
        assert healthy(httpd, ctx)
        idle.settimeout(30)
        assert idle.recv(1024) == b""           # closed after request_timeout


def test_a_client_trickling_its_tls_handshake_is_cut_off_at_the_deadline(server):
    """The deadline covers the handshake too, not only the request after it."""
    httpd, ctx, _ = server
    hello_out = ssl.MemoryBIO()
    client = ctx.wrap_bio(ssl.MemoryBIO(), hello_out, server_hostname="127.0.0.1")
    with pytest.raises(ssl.SSLWantReadError):
        client.do_handshake()
    hello = hello_out.read()
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", httpd.server_address[1]), timeout=30) as sock:
        with pytest.raises(OSError):
            for byte in hello:        # each byte well within any per-read timeout
                sock.sendall(bytes([byte]))
                time.sleep(0.25)
                if time.monotonic() - started > 8:
                    break
            if sock.recv(1) == b"":   # closed by the server while we trickled
                raise ConnectionResetError
    assert time.monotonic() - started < 8          # request_timeout is 2 s here
    assert healthy(httpd, ctx)


def test_no_session_tickets_are_issued(server):
    """Nobody resumes: tickets would be made and parsed on every connection for nothing."""
    httpd, ctx, _ = server
    with socket.create_connection(("127.0.0.1", httpd.server_address[1]), timeout=10) as sock:
        with ctx.wrap_socket(sock, server_hostname="127.0.0.1") as tls:
            assert tls.version() == "TLSv1.3"
            tls.sendall(b"GET /v1/health HTTP/1.0\r\n\r\n")
            answer = b""
            while chunk := tls.recv(65536):     # tickets, if any, arrive before the answer
                answer += chunk
            assert answer.startswith(b"HTTP/1.0 200")
            assert tls.session is None or not tls.session.has_ticket


def test_untrusted_client_certificate_is_refused(server, tmp_path):
    httpd, ctx, _ = server
    assert healthy(httpd, ctx)          # so what follows is this server's verdict, not a closed port
    key, crt = str(tmp_path / "k.pem"), str(tmp_path / "c.pem")
    dynfarm.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                 "-keyout", key, "-out", crt, "-subj", "/CN=aruba-0001", "-days", "1"])
    ctx.load_cert_chain(crt, key)
    with socket.create_connection(("127.0.0.1", httpd.server_address[1]), timeout=10) as sock:
        # In TLS 1.3 the client's handshake is over before the server has judged
        # its certificate: the server's alert is the first thing there is to read.
        # Nothing is sent, so the server has nothing unread to answer with a reset.
        with pytest.raises(ssl.SSLError) as refused:
            with ctx.wrap_socket(sock, server_hostname="127.0.0.1") as tls:
                tls.recv(1)
    assert refused.value.reason == "TLSV1_ALERT_UNKNOWN_CA"


@pytest.mark.parametrize("length", ["\u00b2", "9" * 5000, "-1", "1e3"])
def test_odd_content_lengths_get_411(server, length):
    httpd, ctx, _ = server
    line = raw_tls(httpd, ctx, f"POST /v1/enroll HTTP/1.0\r\nContent-Length: {length}\r\n\r\n".encode())
    assert line.split()[1] == "411"
    assert healthy(httpd, ctx)


def test_a_client_trickling_bytes_is_cut_off_at_the_deadline(server):
    """Each byte arrives within the read timeout; the whole request may not take longer."""
    httpd, ctx, _ = server
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", httpd.server_address[1]), timeout=30) as sock:
        with ctx.wrap_socket(sock, server_hostname="127.0.0.1") as tls:
            try:
                for byte in b"POST /v1/enroll HTTP/1.0\r\nX-Slow: " + b"a" * 100:
                    tls.sendall(bytes([byte]))
                    time.sleep(0.5)
            except OSError:
                pass
    assert time.monotonic() - started < 8          # request_timeout is 2 s here
    assert healthy(httpd, ctx)


@pytest.mark.parametrize("head, status", [
    (b"GARBAGE\r\n\r\n", 400),
    (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 400),
    (b"GET /v1/health HTTP/1.0\r\nX-Big: " + b"a" * (dynfarm.MAX_HEAD + 1) + b"\r\n\r\n", 400),
    (b"POST /v1/enroll HTTP/1.0\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\n{}", 411),
    (b"POST /v1/enroll HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n", 411),
    (b"GET /v1/health HTTP/1.2\r\n\r\n", 400),
    (b"GET /v1/health HTTP/1.\r\n\r\n", 400),
    (b"get /v1/health HTTP/1.0\r\n\r\n", 400),
    (b"G\x1bT /v1/health HTTP/1.0\r\n\r\n", 400),
    (b"GET v1/health HTTP/1.0\r\n\r\n", 400),
    (b"GET /v1/\x1b[2Jhealth HTTP/1.0\r\n\r\n", 400),
    (b"GET /v1/\xe9 HTTP/1.0\r\n\r\n", 400),
])
def test_bad_request_heads(server, head, status):
    httpd, ctx, store = server
    before = db_snapshot(store)
    assert raw_tls(httpd, ctx, head).split()[1] == str(status)
    assert db_snapshot(store) == before
    assert healthy(httpd, ctx)


@pytest.mark.parametrize("head", [b"GET /v1/health HTTP/1.0\n\n", b"\r\nGET /v1/health HTTP/1.0\r\n\r\n"])
def test_bare_line_feeds_and_a_leading_empty_line_are_understood(server, head):
    httpd, ctx, _ = server
    assert raw_tls(httpd, ctx, head).split()[1] == "200"


def test_an_answer_that_cannot_be_sent_gets_500_and_keeps_every_worker(server, monkeypatch):
    httpd, ctx, _ = server
    monkeypatch.setattr(httpd, "app", lambda request: (200, {"raw": b"not JSON"}, {}))
    for _ in range(len(httpd.workers) + 1):
        with pytest.raises(urllib.error.HTTPError) as refused:
            healthy(httpd, ctx)
        assert refused.value.code == 500
    monkeypatch.undo()
    assert healthy(httpd, ctx)


class Trickle:
    """A TLS socket whose peer sends one-byte records without end; OpenSSL
    holds plaintext for the first `held` reads."""

    def __init__(self, data, held=0):
        self.data, self.reads, self.held = data, 0, held

    def recv(self, size):
        self.reads += 1
        return self.data

    def pending(self):
        return int(self.reads < self.held)


def test_a_trickling_peer_gets_a_bounded_share_of_the_loop():
    for head in (b"a", b"POST /v1/enroll HTTP/1.0\r\nContent-Length: 1000000\r\n\r\n"):
        conn = dynfarm.Connection(Trickle(head), ("192.0.2.1", 1), None)
        assert conn.read() == selectors.EVENT_READ         # more to read: the loop's next turn
        assert conn.sock.reads == dynfarm.READS_PER_TURN
    # What OpenSSL holds, the selector cannot see: it is read before the turn ends.
    conn = dynfarm.Connection(Trickle(b"a", held=dynfarm.READS_PER_TURN + 5), ("192.0.2.1", 1), None)
    assert conn.read() == selectors.EVENT_READ
    assert conn.sock.reads == dynfarm.READS_PER_TURN + 5


def test_a_bug_in_a_request_gets_500_and_the_server_keeps_serving(server, monkeypatch):
    httpd, ctx, _ = server
    app = httpd.app

    def broken_once(request):
        monkeypatch.setattr(httpd, "app", app)
        raise RuntimeError("a bug")
    monkeypatch.setattr(httpd, "app", broken_once)
    with pytest.raises(urllib.error.HTTPError) as refused:
        healthy(httpd, ctx)
    assert refused.value.code == 500
    assert healthy(httpd, ctx)


class SmallSendBuffers:
    """The server's TLS context, but each connection gets a 4 KiB send buffer."""

    def __init__(self, ctx):
        self.ctx = ctx

    def wrap_socket(self, sock, **kwargs):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        return self.ctx.wrap_socket(sock, **kwargs)


def test_a_large_answer_reaches_a_slow_reader_whole(server, monkeypatch):
    """The client source (about 150 KB) through small socket buffers: the
    server's writes stop and resume many times, and nothing is lost."""
    httpd, ctx, _ = server
    monkeypatch.setattr(httpd, "tls", SmallSendBuffers(httpd.tls))
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.settimeout(10)
        sock.connect(("127.0.0.1", httpd.server_address[1]))
        with ctx.wrap_socket(sock, server_hostname="127.0.0.1") as tls:
            tls.sendall(b"GET /v1/client HTTP/1.0\r\n\r\n")
            time.sleep(0.3)                     # let the server fill the buffers and wait
            answer = b""
            while chunk := tls.recv(4096):
                answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200")
    assert body == dynfarm.read_own_source()
    assert hashlib.sha256(body).hexdigest().encode() in head


def test_at_the_cap_the_oldest_idle_connection_makes_room(server):
    httpd, ctx, _ = server
    httpd.max_connections = 3
    httpd.request_timeout = 60                   # so that only the cap can close them here
    idle = []
    for _ in range(3):
        idle.append(socket.create_connection(("127.0.0.1", httpd.server_address[1]), timeout=10))
        time.sleep(0.05)                         # accepted in this order, waiting for their handshakes
    try:
        time.sleep(0.2)
        assert healthy(httpd, ctx)               # served: the oldest idle one was closed for it
        assert idle[0].recv(1) == b""            # closed, where a timeout would raise
        idle[1].settimeout(0.3)
        with pytest.raises(socket.timeout):      # the younger ones are left be
            idle[1].recv(1)
    finally:
        for sock in idle:
            sock.close()


def test_past_the_cap_a_connection_is_closed_at_once_when_none_is_idle(server, monkeypatch):
    httpd, ctx, _ = server
    httpd.max_connections = 0                    # nobody to make room: the cap alone decides
    with socket.create_connection(("127.0.0.1", httpd.server_address[1]), timeout=10) as extra:
        assert extra.recv(1) == b""              # closed, where a timeout would raise


def test_a_busy_port_is_one_clear_error(site):
    config = site[0]
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        with pytest.raises(dynfarm.Fatal, match=f"cannot listen on 127.0.0.1:{port}: Address already in use"):
            dynfarm.serve(dataclasses.replace(config, listen_host="127.0.0.1", listen_port=port))


def test_a_request_waiting_for_a_worker_is_not_cut_off(server, monkeypatch):
    """request_timeout (2 s here) bounds the client's slowness, not the
    server's queue: requests held past it by busy workers are still answered."""
    httpd, ctx, _ = server
    release, app = threading.Event(), httpd.app

    def held(request):
        release.wait(10)
        return app(request)
    monkeypatch.setattr(httpd, "app", held)
    results = []
    clients = [threading.Thread(target=lambda: results.append(healthy(httpd, ctx)))
               for _ in range(len(httpd.workers) + 2)]
    for client in clients:
        client.start()
    time.sleep(3)
    release.set()
    for client in clients:
        client.join(10)
    assert results == [True] * len(clients)


def test_out_of_file_descriptors_pauses_accepting_without_spinning(server, monkeypatch):
    httpd, ctx, _ = server
    calls, accept = [], httpd.accept
    monkeypatch.setattr(httpd, "accept", lambda: (calls.append(1), accept()))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # Another process connects and holds on while this one has no descriptor
    # left to accept with.
    holder = subprocess.Popen([sys.executable, "-c", "import socket, sys, time\n"
                               f"s = socket.create_connection(('127.0.0.1', {httpd.server_address[1]}))\n"
                               "sys.stdout.write('in\\n'); sys.stdout.flush(); time.sleep(1.5)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        # A descriptor must be below the limit: the lowest free one is not.
        lowest_free = next(fd for fd in itertools.count(3) if not os.path.exists(f"/proc/self/fd/{fd}"))
        resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free, hard))
        try:
            assert holder.stdout.readline() == "in\n"
            holder.wait(10)
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    finally:
        holder.kill()
        holder.wait()
    assert 0 < len(calls) < 50      # a spinning loop calls accept() thousands of times in 1.5 s
    assert healthy(httpd, ctx)


def test_the_open_files_limit_is_raised_as_far_as_allowed():
    """In a child process: a hard limit lowered there cannot be raised again."""
    script = ("import resource, dynfarm\n"
              "resource.setrlimit(resource.RLIMIT_NOFILE, (256, 4096))\n"
              "dynfarm.raise_open_files_limit(2048)\n"
              "print(resource.getrlimit(resource.RLIMIT_NOFILE))\n"
              "dynfarm.raise_open_files_limit(8192)\n"
              "print(resource.getrlimit(resource.RLIMIT_NOFILE))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                          cwd=os.path.dirname(os.path.abspath(dynfarm.__file__)))
    assert done.stdout.split("\n")[:2] == ["(2048, 4096)", "(4096, 4096)"]


def test_control_characters_from_a_client_are_escaped_in_the_log(capsys):
    dynfarm.log("203.0.113.9: POST /v1/\x1b[2J\rfake line -> 404")
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "\x1b" not in err and "\\x1b[2J\\x0dfake line" in err


def test_the_server_refuses_renegotiation(site):
    ctx = dynfarm.server_tls_context(site[0])
    assert ctx.options & ssl.OP_NO_RENEGOTIATION
