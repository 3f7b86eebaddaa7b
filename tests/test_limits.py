"""Limits per source address, against the real server on loopback (whose
127.0.0.0/8 gives as many sources as a test needs): a guesser of tokens is
slowed to a try every few seconds and told when to come back, one source
cannot hold every connection, and a NAT's VMs booting at once with good
tokens all enroll without being taken for an attacker."""

import concurrent.futures
import json
import re
import socket
import threading

import pytest

import dynfarm
from helpers import call, enroll_body, tls_server


@pytest.fixture
def server(site):
    with tls_server(site[0]) as (httpd, ctx):
        yield httpd.app, httpd, ctx


def post(httpd, ctx, body, source="127.0.0.1"):
    """POST /v1/enroll from a source address: (status, headers text, answer), or None if dropped."""
    raw = json.dumps(body).encode()
    data = (f"POST /v1/enroll HTTP/1.1\r\nContent-Length: {len(raw)}\r\n\r\n").encode() + raw
    try:
        with socket.create_connection(("127.0.0.1", httpd.server_address[1]), timeout=30,
                                      source_address=(source, 0)) as sock:
            with ctx.wrap_socket(sock, server_hostname="127.0.0.1") as tls:
                tls.sendall(data)
                answer = tls.makefile("rb").read().decode()
    except (ConnectionError, OSError):
        return None
    if not answer:
        return None
    head, _, body = answer.partition("\r\n\r\n")
    return int(head.split()[1]), head, json.loads(body)


def test_a_token_guesser_is_held_off_and_told_when_to_come_back(server, make_csr, monkeypatch):
    app, httpd, ctx = server
    good, _ = dynfarm.new_token(app.store, "aruba", 2, 600)
    csr = make_csr()[1]
    statuses = [post(httpd, ctx, enroll_body(f"{good.split('.')[0]}.guess{i}", csr))[0]
                for i in range(dynfarm.Guesses.BURST + 3)]
    assert statuses[:dynfarm.Guesses.BURST] == [401] * dynfarm.Guesses.BURST
    assert statuses[dynfarm.Guesses.BURST:] == [429] * 3
    status, head, answer = post(httpd, ctx, enroll_body(good, csr))      # even a good token waits ...
    assert status == 429 and "too many failed token attempts from 127.0.0.1" in answer["error"]
    assert 1 <= int(re.search(r"Retry-After: (\d+)", head).group(1)) <= dynfarm.Guesses.REFILL
    assert post(httpd, ctx, enroll_body(good, csr), source="127.0.0.2")[0] == 200   # ... others do not
    later = dynfarm.time.monotonic() + dynfarm.Guesses.REFILL
    monkeypatch.setattr(dynfarm.time, "monotonic", lambda: later)
    assert post(httpd, ctx, enroll_body(good, make_csr()[1]))[0] == 200    # one try back after REFILL


def test_the_guess_table_stays_bounded(monkeypatch):
    monkeypatch.setattr(dynfarm.Guesses, "MAX_SOURCES", 100)
    guesses = dynfarm.Guesses()
    for i in range(1000):
        guesses.failed(f"10.0.{i // 256}.{i % 256}")
    assert len(guesses.buckets) == 100


def test_sources_are_addresses_and_ipv6_slash_64s():
    assert dynfarm.source_key("203.0.113.7") == "203.0.113.7"
    assert dynfarm.source_key("::ffff:203.0.113.7") == "203.0.113.7"
    assert dynfarm.source_key("2001:db8:1:2:aaaa::1") == dynfarm.source_key("2001:db8:1:2:bbbb::9") \
        == "2001:db8:1:2::/64"


def test_one_source_cannot_hold_every_connection(server, monkeypatch):
    app, httpd, ctx = server
    monkeypatch.setattr(httpd, "max_per_source", 5)
    held = [socket.create_connection(("127.0.0.1", httpd.server_address[1]), source_address=("127.0.0.1", 0))
            for _ in range(5)]
    try:
        extra = socket.create_connection(("127.0.0.1", httpd.server_address[1]), source_address=("127.0.0.1", 0))
        extra.settimeout(5)
        assert extra.recv(1) == b""                                   # closed at once
        extra.close()
        # another source is served meanwhile
        assert health_from(httpd, ctx, "127.0.0.3") == 200
    finally:
        for sock in held:
            sock.close()


def health_from(httpd, ctx, source):
    with socket.create_connection(("127.0.0.1", httpd.server_address[1]), timeout=10,
                                  source_address=(source, 0)) as sock:
        with ctx.wrap_socket(sock, server_hostname="127.0.0.1") as tls:
            tls.sendall(b"GET /v1/health HTTP/1.0\r\n\r\n")
            return int(tls.makefile("rb").readline().split()[1])


def test_a_nat_of_vms_booting_at_once_all_enroll(server, make_csr, monkeypatch):
    """150 VMs behind one address, good tokens, all at once, against a
    per-source cap of 40: those turned away retry as the client does, none
    is taken for a guesser."""
    app, httpd, ctx = server
    monkeypatch.setattr(httpd, "max_per_source", 40)
    token, _ = dynfarm.new_token(app.store, "aruba", 150, 600)
    machines = [make_csr() for _ in range(150)]
    dropped = []

    def boot(machine):
        """As the client: retry a dropped connection; if an answer was lost
        (the host enrolled), prove the key with the nonce the server sends."""
        key, csr = machine
        body = enroll_body(token, csr)
        for attempt in range(50):
            answer = post(httpd, ctx, body)
            if answer is None:
                dropped.append(1)
                threading.Event().wait(0.05 * (attempt + 1))
            elif answer[0] == 401 and "nonce" in answer[2]:
                body = enroll_body(token, dynfarm.make_csr(key, dynfarm.NONCE_PREFIX + answer[2]["nonce"]))
            else:
                return answer[0] if answer[0] == 200 else (answer[0], answer[2])
        return None
    with concurrent.futures.ThreadPoolExecutor(150) as pool:
        statuses = list(pool.map(boot, machines))
    assert statuses == [200] * 150
    assert len({h["address"] for h in app.store.hosts()}) == 150
    assert dropped            # the cap did turn some away: the retries were needed
    assert call(app, "/v1/health", b"", method="GET")[0] == 200


def test_idle_connections_of_a_few_sources_cannot_hold_the_door(server, monkeypatch):
    """The global cap filled by three sources of idle TCP connections (no TLS,
    nothing sent), each under its own cap: a newcomer still gets served, at
    the expense of the largest holder's oldest idle connection."""
    app, httpd, ctx = server
    monkeypatch.setattr(httpd, "max_connections", 20)
    monkeypatch.setattr(httpd, "max_per_source", 8)
    idle = [socket.create_connection(("127.0.0.1", httpd.server_address[1]), source_address=(f"127.0.0.{10 + i % 3}", 0))
            for i in range(20)]
    try:
        for _ in range(3):
            assert health_from(httpd, ctx, "127.0.0.2") == 200
        closed = 0
        for sock in idle:
            sock.settimeout(0.2)
            try:
                closed += sock.recv(1) == b""
            except socket.timeout:
                pass
        assert closed >= 1             # made room for the newcomers
    finally:
        for sock in idle:
            sock.close()
