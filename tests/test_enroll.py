"""The enrollment app, called in-process: tokens, addresses, enrollment itself.

Tokens (stored hashed, expiry and use counts), address allocation and the
OpenVPN ccd entries that pin it, what an enrollment answers and what it may
not do (another provider, another source network, an old client), requests
that are refused without changing the database, and revocations or retries
that land while an enrollment is being signed.
"""

import base64
import hashlib
import json
import os
import subprocess
import threading
import time

import pytest

import dynfarm
from helpers import VERSION, call, cert_serial, crl_serials, db_snapshot, enroll_body, fresh_csr, tamper


# --- tokens -----------------------------------------------------------------------

def test_token_is_stored_hashed(site):
    _, store, _ = site
    token, _ = dynfarm.new_token(store, "aruba", 1, 60)
    row = store.token(token.split(".")[0])
    assert token.split(".")[1] not in json.dumps(dict(row))
    assert row["secret_sha256"] == hashlib.sha256(token.split(".")[1].encode()).hexdigest()


def test_token_checks(site):
    _, store, _ = site
    good, _ = dynfarm.new_token(store, "aruba", 1, 60)
    assert dynfarm.check_token(store, good)["provider"] == "aruba"
    expired, _ = dynfarm.new_token(store, "aruba", 1, 1)
    with pytest.raises(dynfarm.RequestError, match="expired"):
        dynfarm.check_token(store, expired, now=time.time() + 5)
    used, _ = dynfarm.new_token(store, "aruba", 1, 60)
    store.spend_token(used.split(".")[0], time.time())
    with pytest.raises(dynfarm.RequestError, match="used up"):
        dynfarm.check_token(store, used)
    for bad in ("", "nodot", good + "x", "." + good.split(".")[1], good.split(".")[0] + ".wrong"):
        with pytest.raises(dynfarm.RequestError, match="invalid"):
            dynfarm.check_token(store, bad)


def test_token_command_prints_only_the_token(site, capsys):
    config, store, _ = site
    assert dynfarm.main(["-c", config.path, "token", "aruba", "--uses", "3", "--ttl", "2h"]) == 0
    out = capsys.readouterr()
    token = out.out.strip()
    assert "\n" not in token and "3 enrollment(s)" in out.err
    row = dynfarm.check_token(store, token)
    assert row["uses_left"] == 3 and 7100 < row["expires_at"] - time.time() <= 7200


def test_token_for_unknown_provider_is_a_usage_error(site, capsys):
    config, _, _ = site
    assert dynfarm.main(["-c", config.path, "token", "nosuch"]) == 2
    assert "no provider 'nosuch'" in capsys.readouterr().err


# --- addresses --------------------------------------------------------------------

def test_allocate_lowest_free_skipping_server(site):
    config, _, _ = site
    provider = config.providers["other"].vpns[0]            # 10.9.0.0/29
    seg = dynfarm.segment(config, provider)
    assert (seg.netmask, seg.server) == ("255.255.255.248", "10.9.0.1")
    assert dynfarm.allocate_address(seg, set().__contains__) == "10.9.0.2"
    assert dynfarm.allocate_address(seg, {"10.9.0.2", "10.9.0.4"}.__contains__) == "10.9.0.3"
    assert dynfarm.allocate_address(seg, {f"10.9.0.{i}" for i in range(2, 7)}.__contains__) is None


def test_allocation_starts_at_the_hint_and_wraps_around(site):
    config, _, _ = site
    provider = config.providers["other"].vpns[0]            # 10.9.0.2 - 10.9.0.6
    seg = dynfarm.segment(config, provider)
    number = int(dynfarm.ipaddress.IPv4Address("10.9.0.4"))
    asked = []

    def taken(address):
        asked.append(address)
        return address in {"10.9.0.3", "10.9.0.4"}
    assert dynfarm.allocate_address(seg, taken, number) == "10.9.0.5"
    assert asked == ["10.9.0.4", "10.9.0.5"]       # one lookup per taken address, no scan
    # Past the end it goes round: an address freed below the hint is found.
    taken = {"10.9.0.3", "10.9.0.4", "10.9.0.5", "10.9.0.6"}.__contains__
    assert dynfarm.allocate_address(seg, taken, number) == "10.9.0.2"


def test_bridged_segment_comes_from_the_pool_and_the_bridge(site, monkeypatch):
    config, _, _ = site
    config.mode, config.bridge = "bridged", "br-lan"
    config.providers["aruba"].bridge_pool = dynfarm.parse_pool("10.10.0.100-10.10.0.101", "x")
    monkeypatch.setattr(dynfarm, "bridge_interface", lambda name: dynfarm.ipaddress.IPv4Interface("10.10.0.1/24"))
    seg = dynfarm.segment(config, config.vpn("aruba"))
    assert (seg.netmask, seg.server, seg.describe()) == ("255.255.255.0", "10.10.0.1", "10.10.0.100-10.10.0.101")
    assert dynfarm.allocate_address(seg, {"10.10.0.100"}.__contains__) == "10.10.0.101"
    text = dynfarm.openvpn_server_config(config, config.vpn("aruba"))
    assert "dev-type tap" in text and 'push "route-gateway 10.10.0.1"' in text
    assert "ifconfig " not in text and "topology" not in text
    do = [" ".join(a["do"]) for a in dynfarm.links_plan(config, {})]
    assert do[:3] == ["ip tuntap add dev df-aruba mode tap", "ip link set df-aruba master br-lan",
                      "ip link set df-aruba up"]


def test_ccd_entry_is_written_once_and_replaced_when_it_changes(site):
    config, _, _ = site
    provider = config.providers["aruba"]
    path = config.state.ccd_entry("aruba", "aruba-0001")
    dynfarm.write_ccd(config, provider, "aruba-0001", "10.8.0.2")
    first = os.stat(path)
    assert open(path).read() == "ifconfig-push 10.8.0.2 255.255.255.0\n"
    assert dynfarm.stat.S_IMODE(first.st_mode) == 0o644
    dynfarm.write_ccd(config, provider, "aruba-0001", "10.8.0.2")   # a reboot: left be
    assert os.stat(path).st_ino == first.st_ino
    dynfarm.write_ccd(config, provider, "aruba-0001", "10.8.0.3")
    assert open(path).read() == "ifconfig-push 10.8.0.3 255.255.255.0\n"
    assert os.stat(path).st_ino != first.st_ino                      # replaced, not rewritten in place


# --- enrollment -------------------------------------------------------------------

def test_enroll_gives_name_address_and_config(app, make_csr):
    token, _ = dynfarm.new_token(app.store, "aruba", 5, 60)
    key, csr = make_csr()
    status, answer, _ = call(app, "/v1/enroll", enroll_body(token, csr))
    assert status == 200, answer
    assert (answer["name"], answer["address"], answer["vpn_server"]) == ("aruba-0001", "10.8.0.2", "10.8.0.1")
    assert answer["links"] == {"master": "10.10.0.5"}
    ovpn = answer["openvpn_config"]
    assert "<ca>" in ovpn and "<cert>" in ovpn and "<tls-crypt>" in ovpn
    assert "PRIVATE KEY" not in json.dumps(answer)
    subject = subprocess.run(["openssl", "x509", "-noout", "-subject"], input=answer["certificate"],
                             capture_output=True, text=True).stdout
    assert "CN = aruba-0001" in subject
    with open(app.config.state.ccd_entry("aruba", "aruba-0001")) as f:
        assert f.read() == "ifconfig-push 10.8.0.2 255.255.255.0\n"
    custom = answer["customization"]
    files = {f["path"]: f for f in custom["files"]}
    assert base64.b64decode(files["/etc/dynfarm-test/greeting"]["data"]) == b"hello from the site\n"
    assert files["/etc/dynfarm-test/greeting"]["mode"] == 0o640
    assert custom["commands"][0]["name"] == "setup.sh"
    assert custom["ssh_keys"][0].startswith("ssh-ed25519 ")


def served_files(app):
    return {f["path"]: f for f in app.customization(app.config.providers["aruba"])["files"]}


def test_customization_edits_reach_the_next_enrollment(app):
    tree = app.config.providers["aruba"].files
    greeting = os.path.join(tree, "etc", "dynfarm-test", "greeting")
    assert base64.b64decode(served_files(app)["/etc/dynfarm-test/greeting"]["data"]) == b"hello from the site\n"
    with open(greeting, "w") as f:
        f.write("hello from the edit\n")                        # same size, in place: a new mtime tells
    os.utime(greeting, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert base64.b64decode(served_files(app)["/etc/dynfarm-test/greeting"]["data"]) == b"hello from the edit\n"
    os.chmod(greeting, 0o600)
    assert served_files(app)["/etc/dynfarm-test/greeting"]["mode"] == 0o600
    os.makedirs(os.path.join(tree, "etc", "slurm"))
    with open(os.path.join(tree, "etc", "slurm", "slurm.conf"), "w") as f:
        f.write("ClusterName=site\n")
    files = served_files(app)
    assert files["/etc/slurm"]["type"] == "dir"
    assert base64.b64decode(files["/etc/slurm/slurm.conf"]["data"]) == b"ClusterName=site\n"
    before = os.stat(greeting)
    deadline = time.monotonic() + 2
    while os.stat(greeting).st_ctime_ns == before.st_ctime_ns and time.monotonic() < deadline:
        time.sleep(0.005)                       # a kernel with coarse timestamps: into the next tick
        with open(greeting, "r+") as f:
            f.write("HELLO FROM THE EDIT\n")                    # same size, mtime set back (cp -p)
    os.utime(greeting, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert base64.b64decode(served_files(app)["/etc/dynfarm-test/greeting"]["data"]) == b"HELLO FROM THE EDIT\n"
    os.unlink(greeting)
    assert "/etc/dynfarm-test/greeting" not in served_files(app)


def test_customization_links_must_stay_inside_the_tree(app):
    tree = app.config.providers["aruba"].files
    os.symlink("dynfarm-test/greeting", os.path.join(tree, "etc", "inside"))
    assert base64.b64decode(served_files(app)["/etc/inside"]["data"]) == b"hello from the site\n"
    os.symlink("/etc/passwd", os.path.join(tree, "etc", "outside"))
    with pytest.raises(dynfarm.RequestError, match="links outside its tree"):
        served_files(app)


def test_same_machine_gets_same_name_and_address(app, make_csr):
    token, _ = dynfarm.new_token(app.store, "aruba", 1, 60)
    key, csr = make_csr()
    first = call(app, "/v1/enroll", enroll_body(token, csr))[1]
    # the token is used up now: the same key still comes back to its record
    again = call(app, "/v1/enroll", enroll_body(token, fresh_csr(app, key)))
    assert again[0] == 200 and (again[1]["name"], again[1]["address"]) == (first["name"], first["address"])
    _, other_csr = make_csr()
    refused = call(app, "/v1/enroll", enroll_body(token, other_csr))
    assert refused[0] == 401 and "used up" in refused[1]["error"]


def test_certificate_identifies_a_host_without_token(app, make_csr):
    token, _ = dynfarm.new_token(app.store, "aruba", 1, 60)
    key, csr = make_csr()
    answer = call(app, "/v1/enroll", enroll_body(token, csr))[1]
    host = app.store.host(answer["name"])
    body = enroll_body("", csr)
    del body["token"]
    status, again, _ = call(app, "/v1/enroll", body, peer=(answer["name"], host["pubkey_sha256"]))
    assert status == 200 and again["address"] == answer["address"]
    status, err, _ = call(app, "/v1/enroll", body, peer=(answer["name"], "0" * 64))
    assert status == 403


def test_a_new_host_costs_one_address_lookup(app, make_csr, monkeypatch):
    token, _ = dynfarm.new_token(app.store, "aruba", 4, 60)
    for _ in range(3):
        assert call(app, "/v1/enroll", enroll_body(token, make_csr()[1]))[0] == 200
    lookups = []
    taken = app.store.address_taken
    monkeypatch.setattr(app.store, "address_taken", lambda address: lookups.append(address) or taken(address))
    answer = call(app, "/v1/enroll", enroll_body(token, make_csr()[1]))[1]
    assert lookups == [answer["address"]] == ["10.8.0.5"]


def test_concurrent_enrollments_get_distinct_addresses(app, make_csr):
    token, _ = dynfarm.new_token(app.store, "aruba", 40, 60)
    csrs = [make_csr()[1] for _ in range(24)]
    results = []

    def one(csr):
        results.append(call(app, "/v1/enroll", enroll_body(token, csr)))
    threads = [threading.Thread(target=one, args=(c,)) for c in csrs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r[0] for r in results] == [200] * 24
    assert len({r[1]["address"] for r in results}) == 24
    assert len({r[1]["name"] for r in results}) == 24
    assert app.store.token(token.split(".")[0])["uses_left"] == 16


def test_a_failed_enrollment_gives_its_name_and_address_back(app, make_csr):
    """The signing refuses after the reservation: the next machine gets what it held."""
    token, _ = dynfarm.new_token(app.store, "aruba", 2, 60)
    assert call(app, "/v1/enroll", enroll_body(token, tamper(make_csr()[1])))[0] == 400
    answer = call(app, "/v1/enroll", enroll_body(token, make_csr()[1]))[1]
    assert (answer["name"], answer["address"]) == ("aruba-0001", "10.8.0.2")


def test_exhaustion_is_clear_and_changes_nothing(app, make_csr):
    token, _ = dynfarm.new_token(app.store, "other", 10, 60)
    for _ in range(5):                                  # a /29: .2 to .6
        assert call(app, "/v1/enroll", enroll_body(token, make_csr()[1]))[0] == 200
    before = db_snapshot(app.store)
    status, answer, _ = call(app, "/v1/enroll", enroll_body(token, make_csr()[1]))
    assert status == 503 and "no free address left in 10.9.0.2-10.9.0.6" in answer["error"]
    assert db_snapshot(app.store) == before


def test_token_of_one_provider_cannot_join_another(app, make_csr):
    token, _ = dynfarm.new_token(app.store, "aruba", 1, 60)
    before = db_snapshot(app.store)
    status, answer, _ = call(app, "/v1/enroll", enroll_body(token, make_csr()[1], provider="other"))
    assert status == 403 and "belongs to provider aruba" in answer["error"]
    assert db_snapshot(app.store) == before


def test_enrolled_machine_cannot_move_to_another_provider(app, make_csr):
    aruba, _ = dynfarm.new_token(app.store, "aruba", 1, 60)
    other, _ = dynfarm.new_token(app.store, "other", 1, 60)
    key, csr = make_csr()
    assert call(app, "/v1/enroll", enroll_body(aruba, csr))[0] == 200
    before = db_snapshot(app.store)
    status, answer, _ = call(app, "/v1/enroll", enroll_body(other, fresh_csr(app, key), provider="other"))
    assert status == 403 and "machine is enrolled with provider aruba, not other" in answer["error"]
    assert db_snapshot(app.store) == before


def test_source_networks_are_enforced(site, make_csr):
    config, store, pki = site
    config.providers["aruba"].networks = [dynfarm.ipaddress.IPv4Network("192.0.2.0/24")]
    app = dynfarm.App(config)
    token, _ = dynfarm.new_token(store, "aruba", 1, 60)
    status, answer, _ = call(app, "/v1/enroll", enroll_body(token, make_csr()[1]), peer_ip="198.51.100.7")
    assert status == 403 and "not in provider aruba's networks" in answer["error"]
    assert call(app, "/v1/enroll", enroll_body(token, make_csr()[1]), peer_ip="192.0.2.9")[0] == 200


def test_ipv4_clients_of_an_ipv6_listener_keep_their_networks(site, make_csr):
    config, store, pki = site
    config.providers["aruba"].networks = [dynfarm.ipaddress.IPv4Network("127.0.0.0/8")]
    app = dynfarm.App(config)
    token, _ = dynfarm.new_token(store, "aruba", 1, 60)
    assert call(app, "/v1/enroll", enroll_body(token, make_csr()[1]), peer_ip="::ffff:127.0.0.1")[0] == 200


def test_old_client_is_told_to_update_without_using_the_token(app, make_csr):
    token, _ = dynfarm.new_token(app.store, "aruba", 1, 60)
    status, answer, _ = call(app, "/v1/enroll", {"version": "0" * 64, "token": token, "legacy": 1})
    assert status == 200 and answer == {"status": "update", "sha256": VERSION, "url": "/v1/client"}
    assert app.store.token(token.split(".")[0])["uses_left"] == 1
    status, source, headers = call(app, "/v1/client", b"", method="GET")
    assert hashlib.sha256(source).hexdigest() == headers["X-Dynfarm-Sha256"] == VERSION
    status, answer, _ = call(app, "/v1/enroll", {"version": "0" * 64, "token": "bad.token"})
    assert status == 401


def test_unknown_paths_and_methods(app):
    assert call(app, "/v1/nope", b"")[0] == 404
    assert call(app, "/v1/enroll", b"", method="GET")[0] == 405
    assert call(app, "/v1/health", b"", method="GET")[1]["version"] == VERSION


def test_report_needs_a_certificate(app):
    assert call(app, "/v1/report", {"ok": True, "steps": [], "ready_seconds": 1})[0] == 401


# --- bad requests -----------------------------------------------------------------

@pytest.mark.parametrize("mutate, status, message", [
    (lambda b: b"{not json", 400, "not valid JSON"),
    (lambda b: b"[1, 2]", 400, "JSON object"),
    (lambda b: dict(b, hostname=7), 400, "'hostname' must be a str"),
    (lambda b: dict(b, facts=[]), 400, "'facts' must be a dict"),
    (lambda b: dict(b, host_keys="ssh-ed25519 AAAA"), 400, "'host_keys' must be a list"),
    (lambda b: dict(b, host_keys=["rm -rf /"]), 400, "host_keys"),
    (lambda b: dict(b, machine_id="../../etc"), 400, "machine_id"),
    (lambda b: dict(b, extra=1), 400, "unknown field 'extra'"),
    (lambda b: {k: v for k, v in b.items() if k != "csr"}, 400, "missing field 'csr'"),
    (lambda b: dict(b, csr="-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"),
     400, "csr"),
    (lambda b: dict(b, csr=tamper(b["csr"])), 400, "signature does not verify"),
    (lambda b: dict(b, token="x" * 500), 400, "too long"),
    (lambda b: dict(b, version=True), 400, "version"),
])
def test_bad_requests_get_4xx_and_change_nothing(app, make_csr, mutate, status, message):
    token, _ = dynfarm.new_token(app.store, "aruba", 1, 60)
    body = mutate(enroll_body(token, make_csr()[1]))
    before = db_snapshot(app.store)
    got, answer, _ = call(app, "/v1/enroll", body)
    assert got == status and message in answer["error"], answer
    assert db_snapshot(app.store) == before
    assert os.listdir(app.config.state.ccd_dir("aruba")) == []


def test_a_bad_request_carrying_an_enrolled_key_changes_nothing(app, make_csr):
    token, _ = dynfarm.new_token(app.store, "aruba", 1, 60)
    key, csr = make_csr()
    assert call(app, "/v1/enroll", enroll_body(token, csr))[0] == 200
    before = db_snapshot(app.store)
    status, answer, _ = call(app, "/v1/enroll", enroll_body(token, tamper(fresh_csr(app, key)),
                                                            hostname="other", facts={"cores": 64}))
    assert status == 400 and "signature does not verify" in answer["error"]
    assert db_snapshot(app.store) == before


@pytest.mark.parametrize("facts, message", [
    ({"memory_mb": "4096"}, "fact 'memory_mb' must be an integer"),
    ({"cores": True}, "fact 'cores' must be an integer"),
    ({"cores": -1}, "fact 'cores' must be an integer from 1 to 65536"),
    ({"cores": 10**200}, "fact 'cores' must be an integer from 1"),
    ({"memory_mb": -1}, "fact 'memory_mb' must be an integer from 1"),
    ({"load": float("nan")}, "body is not valid JSON"),
    ({"load": float("inf")}, "body is not valid JSON"),
    ({"os": "Debian\x1b[2J"}, "short printable values"),
    ({"uptime": 10**60}, "short printable values"),
    ({"x\ud800": 1}, "lone surrogate"),
])
def test_fact_types_are_checked(app, make_csr, facts, message):
    token, _ = dynfarm.new_token(app.store, "aruba", 1, 60)
    body = enroll_body(token, make_csr()[1], facts=facts)
    status, answer, _ = call(app, "/v1/enroll", json.dumps(body).encode())
    assert status == 400 and message in answer["error"]


# --- revocation, also while an enrollment is signed -------------------------------

def test_revoked_host_cannot_re_enroll_and_is_in_the_crl(app, make_csr, capsys):
    token, _ = dynfarm.new_token(app.store, "aruba", 1, 60)
    key, csr = make_csr()
    answer = call(app, "/v1/enroll", enroll_body(token, csr))[1]
    assert dynfarm.main(["-c", app.config.path, "revoke", answer["name"]]) == 0
    assert not os.path.exists(app.config.state.ccd_entry("aruba", answer["name"]))
    status, err, _ = call(app, "/v1/enroll", enroll_body(token, fresh_csr(app, key)))
    assert status == 403 and "revoked" in err["error"]
    crl = subprocess.run(["openssl", "crl", "-in", app.config.state.crl, "-noout", "-text"],
                         capture_output=True, text=True).stdout
    serial = subprocess.run(["openssl", "x509", "-noout", "-serial"], input=answer["certificate"],
                            capture_output=True, text=True).stdout.split("=")[1].strip()
    assert serial in crl.replace(":", "").upper()


def revoke_while_signing(app, monkeypatch, expect=0):
    """Make the next signing run the real 'revoke' command on its host first
    (it must exit `expect`); the list it returns gets the serial signed."""
    sign, signed = app.pki.sign_client, []

    def sign_then_revoke(csr_pem, host, serial):
        certificate = sign(csr_pem, host, serial)
        signed.append(serial)
        assert dynfarm.main(["-c", app.config.path, "revoke", host]) == expect
        return certificate
    monkeypatch.setattr(app.pki, "sign_client", sign_then_revoke)
    return signed


def test_a_revoke_landing_while_a_host_re_enrolls_wins_and_lists_its_live_certificate(app, make_csr, monkeypatch):
    token, _ = dynfarm.new_token(app.store, "aruba", 1, 60)
    key, csr = make_csr()
    first = call(app, "/v1/enroll", enroll_body(token, csr))[1]
    revoke_while_signing(app, monkeypatch)
    status, answer, _ = call(app, "/v1/enroll", enroll_body(token, fresh_csr(app, key)))
    assert status == 403 and "revoked" in answer["error"]
    assert not os.path.exists(app.config.state.ccd_entry("aruba", first["name"]))
    # The certificate the machine holds is the one to refuse, not the one never handed out.
    assert crl_serials(app.config) == {cert_serial(first["certificate"])}


def test_a_new_host_is_not_in_the_database_until_signed(app, make_csr, monkeypatch, capsys):
    """Its name is only held while it is signed: a revoke of it finds no host,
    and the enrollment stands."""
    token, _ = dynfarm.new_token(app.store, "aruba", 2, 60)
    revoke_while_signing(app, monkeypatch, expect=2)
    status, answer, _ = call(app, "/v1/enroll", enroll_body(token, make_csr()[1]))
    assert status == 200 and answer["name"] == "aruba-0001"
    assert "no host named aruba-0001" in capsys.readouterr().err
    assert app.store.host("aruba-0001")["serial"] == cert_serial(answer["certificate"])
    assert dynfarm.check_token(app.store, token)["uses_left"] == 1


def failing_signing(app, monkeypatch, error=dynfarm.Fatal("openssl: no answer after 120s")):
    def sign(csr_pem, host, serial):
        raise error
    monkeypatch.setattr(app.pki, "sign_client", sign)


@pytest.mark.parametrize("error", [dynfarm.Fatal("openssl: no answer after 120s"),
                                   dynfarm.CSRRejected("certificate request rejected: its signature does not verify")])
def test_a_failed_signing_leaves_nothing_behind(app, make_csr, monkeypatch, error):
    token, _ = dynfarm.new_token(app.store, "aruba", 1, 60)
    before, files = db_snapshot(app.store), os.listdir(app.config.state.ccd_dir("aruba"))
    failing_signing(app, monkeypatch, error)
    if isinstance(error, dynfarm.CSRRejected):      # the request's fault
        assert call(app, "/v1/enroll", enroll_body(token, make_csr()[1]))[0] == 400
    else:                                           # the server's: the transport answers 500
        with pytest.raises(dynfarm.Fatal):
            call(app, "/v1/enroll", enroll_body(token, make_csr()[1]))
    assert db_snapshot(app.store) == before
    assert os.listdir(app.config.state.ccd_dir("aruba")) == files
    monkeypatch.undo()
    status, answer, _ = call(app, "/v1/enroll", enroll_body(token, make_csr()[1]))   # the name, address, use: free
    assert (status, answer["name"], answer["address"]) == (200, "aruba-0001", "10.8.0.2")


def test_a_token_cancelled_while_its_enrollment_is_signed_gets_no_certificate_out(app, make_csr, monkeypatch):
    token, _ = dynfarm.new_token(app.store, "aruba", 1, 60)
    sign = app.pki.sign_client

    def sign_while_the_token_expires(csr_pem, host, serial):
        with app.store.transaction():
            app.store.db.execute("UPDATE tokens SET expires_at = 0")
        return sign(csr_pem, host, serial)
    monkeypatch.setattr(app.pki, "sign_client", sign_while_the_token_expires)
    status, answer, _ = call(app, "/v1/enroll", enroll_body(token, make_csr()[1]))
    assert status == 401 and "expired" in answer["error"]
    assert app.store.hosts() == []
    assert not os.path.exists(app.config.state.ccd_entry("aruba", "aruba-0001"))


def test_the_last_token_use_is_not_held_twice(app, make_csr, monkeypatch):
    """Two machines sign at once on a token with one use left: one gets it."""
    token, _ = dynfarm.new_token(app.store, "aruba", 1, 60)
    sign, second = app.pki.sign_client, []

    def sign_while_another_asks(csr_pem, host, serial):
        second.append(call(app, "/v1/enroll", enroll_body(token, make_csr()[1])))
        return sign(csr_pem, host, serial)
    monkeypatch.setattr(app.pki, "sign_client", sign_while_another_asks)
    status, answer, _ = call(app, "/v1/enroll", enroll_body(token, make_csr()[1]))
    assert status == 200 and answer["name"] == "aruba-0001"
    assert second[0][0] == 401 and "used up" in second[0][1]["error"]
    assert len(app.store.hosts()) == 1


def signing_in_a_thread(app, token, csr, release):
    """Start an enrollment whose signing waits for `release`; (thread, answers, signing started)."""
    sign, started, answers = app.pki.sign_client, threading.Event(), []

    def slow_sign(csr_pem, host, serial):
        if threading.current_thread() is worker:
            started.set()
            assert release.wait(10)
        return sign(csr_pem, host, serial)
    app.pki.sign_client = slow_sign
    worker = threading.Thread(target=lambda: answers.append(call(app, "/v1/enroll", enroll_body(token, csr))))
    worker.start()
    assert started.wait(10)
    return worker, answers


@pytest.mark.parametrize("first_fails", [False, True])
def test_a_retry_of_the_same_machine_waits_for_its_first_request(app, make_csr, first_fails):
    """While a new machine's first request is signed, its retry waits: then it
    re-enrolls the host the first made, or enrolls afresh if the first failed."""
    token, _ = dynfarm.new_token(app.store, "aruba", 2, 60)
    key, csr = make_csr()
    release = threading.Event()
    worker, first = signing_in_a_thread(app, token, tamper(csr) if first_fails else csr, release)
    retry = []
    retrying = threading.Thread(target=lambda: retry.append(
        call(app, "/v1/enroll", enroll_body(token, fresh_csr(app, key)))))
    retrying.start()
    retrying.join(0.5)
    assert retrying.is_alive()                   # waiting, not racing
    release.set()
    worker.join(10)
    retrying.join(10)
    assert first[0][0] == (400 if first_fails else 200)
    status, answer, _ = retry[0]
    assert status == 200 and answer["name"] == "aruba-0001"
    assert app.store.host("aruba-0001")["serial"] == cert_serial(answer["certificate"])
    assert dynfarm.check_token(app.store, token)["uses_left"] == 1


def test_other_machines_do_not_wait_and_get_other_names(app, make_csr):
    token, _ = dynfarm.new_token(app.store, "aruba", 3, 60)
    release = threading.Event()
    worker, first = signing_in_a_thread(app, token, make_csr()[1], release)
    status, answer, _ = call(app, "/v1/enroll", enroll_body(token, make_csr()[1]))
    assert (status, answer["name"], answer["address"]) == (200, "aruba-0002", "10.8.0.3")
    release.set()
    worker.join(10)
    assert first[0][1]["name"] == "aruba-0001" and first[0][1]["address"] == "10.8.0.2"


# --- replays: a CSR is no proof of possession by itself ---------------------------

def test_a_replayed_first_enrollment_is_challenged_and_changes_nothing(app, make_csr):
    token, _ = dynfarm.new_token(app.store, "aruba", 5, 60)
    key, csr = make_csr()
    captured = enroll_body(token, csr)
    assert call(app, "/v1/enroll", captured)[0] == 200
    before = db_snapshot(app.store)
    for replay in (captured, dict(captured, host_keys=["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIEvil"])):
        status, answer, _ = call(app, "/v1/enroll", replay)
        assert status == 401 and "prove it holds its key" in answer["error"] and answer["nonce"]
    assert db_snapshot(app.store) == before


def test_a_replayed_proof_is_refused_and_the_host_s_own_next_boot_works(app, make_csr):
    token, _ = dynfarm.new_token(app.store, "aruba", 1, 60)
    key, csr = make_csr()
    first = call(app, "/v1/enroll", enroll_body(token, csr))[1]
    proof = enroll_body(token, fresh_csr(app, key))
    assert call(app, "/v1/enroll", proof)[0] == 200
    before = db_snapshot(app.store)
    status, answer, _ = call(app, "/v1/enroll", proof)          # the nonce is spent
    assert status == 401 and answer["nonce"]
    assert db_snapshot(app.store) == before
    # the next boot presents its certificate: a live proof, no nonce needed
    host = app.store.host(first["name"])
    status, again, _ = call(app, "/v1/enroll", enroll_body("", dynfarm.make_csr(key, "x")),
                            peer=(first["name"], host["pubkey_sha256"]))
    assert status == 200 and again["name"] == first["name"]


@pytest.mark.parametrize("nonce", ["", "1.2.3", "not a nonce", "99999999999999.00000000." + "0" * 24])
def test_a_nonce_the_server_did_not_give_is_refused(app, make_csr, nonce):
    token, _ = dynfarm.new_token(app.store, "aruba", 1, 60)
    key, csr = make_csr()
    call(app, "/v1/enroll", enroll_body(token, csr))
    status, _, _ = call(app, "/v1/enroll", enroll_body(token, dynfarm.make_csr(key, dynfarm.NONCE_PREFIX + nonce)))
    assert status == 401


def test_a_nonce_expires(app, make_csr, monkeypatch):
    token, _ = dynfarm.new_token(app.store, "aruba", 1, 600)
    key, csr = make_csr()
    call(app, "/v1/enroll", enroll_body(token, csr))
    late = fresh_csr(app, key)
    now = time.time()
    monkeypatch.setattr(dynfarm.time, "time", lambda: now + dynfarm.Nonces.TTL + 1)
    assert call(app, "/v1/enroll", enroll_body(token, late))[0] == 401


def test_a_token_revoked_while_its_enrollment_is_signed_gets_no_certificate_out(app, make_csr, monkeypatch):
    token, _ = dynfarm.new_token(app.store, "aruba", 3, 60)
    sign = app.pki.sign_client

    def sign_while_revoked(csr_pem, host, serial):
        assert dynfarm.main(["-c", app.config.path, "token", "revoke", token.split(".")[0]]) == 0
        return sign(csr_pem, host, serial)
    monkeypatch.setattr(app.pki, "sign_client", sign_while_revoked)
    status, answer, _ = call(app, "/v1/enroll", enroll_body(token, make_csr()[1]))
    assert status == 401 and "invalid enrollment token" in answer["error"]
    assert app.store.hosts() == []


# --- reports: a time is a number of seconds a boot can take ------------------------

@pytest.mark.parametrize("raw, message", [
    (b'{"ok": true, "steps": [], "ready_seconds": ' + b"1" + b"0" * 400 + b"}", "must be a float"),
    (b'{"ok": true, "steps": [], "ready_seconds": NaN}', "not valid JSON"),
    (b'{"ok": true, "steps": [], "ready_seconds": Infinity}', "not valid JSON"),
    (b'{"ok": true, "steps": [], "ready_seconds": 1e999}', "numbers must be finite"),
    (b'{"ok": true, "steps": [], "ready_seconds": true}', "must be a float"),
    (b'{"ok": true, "steps": [], "ready_seconds": -1}', "from 0 to 86400"),
    (b'{"ok": true, "steps": [], "ready_seconds": 1e6}', "from 0 to 86400"),
    (b'{"ok": 1, "steps": [], "ready_seconds": 1}', "must be a bool"),
    (b'{"ok": true, "steps": ["x"], "ready_seconds": 1}', "small objects"),
])
def test_bad_reports_get_400_and_change_nothing(app, make_csr, raw, message):
    token, _ = dynfarm.new_token(app.store, "aruba", 1, 60)
    answer = call(app, "/v1/enroll", enroll_body(token, make_csr()[1]))[1]
    host = app.store.host(answer["name"])
    before = db_snapshot(app.store)
    status, refused, _ = call(app, "/v1/report", raw, peer=(host["name"], host["pubkey_sha256"]))
    assert status == 400 and message in refused["error"]
    assert db_snapshot(app.store) == before
    good = b'{"ok": true, "steps": [], "ready_seconds": 0.2}'
    assert call(app, "/v1/report", good, peer=(host["name"], host["pubkey_sha256"]))[0] == 200


@pytest.mark.parametrize("nonce", ["1.a.\u00e9", "1.12345678." + "\u00e9" * 24, "1.12345678." + "0" * 23 + "\u0660",
                                   "\u0661.12345678." + "0" * 24, "1.12345678." + "0" * 24 + "\n"])
def test_a_nonce_of_any_characters_is_refused_not_a_500(nonce):
    assert dynfarm.Nonces().spend(nonce) is False


def test_spent_nonces_are_forgotten_in_order_of_expiry(monkeypatch):
    nonces, now = dynfarm.Nonces(), time.time()
    given = [nonces.new() for _ in range(3)]
    assert all(nonces.spend(n) for n in given)
    monkeypatch.setattr(dynfarm.time, "time", lambda: now + dynfarm.Nonces.TTL + 2)
    fresh = nonces.new()
    assert nonces.spend(fresh)                                # a spend prunes what expired
    assert list(nonces.spent) == [fresh] and len(nonces.expiries) == 1


def test_a_host_retired_while_its_re_enrollment_is_read_gets_409_not_500(app, make_csr, monkeypatch):
    token, _ = dynfarm.new_token(app.store, "aruba", 1, 60)
    key, csr = make_csr()
    call(app, "/v1/enroll", enroll_body(token, csr))
    monkeypatch.setattr(dynfarm.Store, "host", lambda self, name: None)       # retired after reserve found it
    monkeypatch.setattr(app, "reserve", lambda *a: dynfarm.Reservation(
        app.config.providers["aruba"], "aruba-0001", None, "10.8.0.2", "ab", None, False))
    status, answer, _ = call(app, "/v1/enroll", enroll_body(token, fresh_csr(app, key)))
    assert status == 409 and "was retired" in answer["error"]


def test_a_token_use_is_not_counted_twice_between_its_write_and_its_release(app, make_csr, monkeypatch):
    """Seen under load: a token with as many uses as machines refused the
    last ones as 'used up', because a use already written was still held."""
    token, _ = dynfarm.new_token(app.store, "aruba", 2, 60)
    let_go, answers, asked = app.holds.let_go, [], []

    def let_go_after_another_enrolls(held, pubkey, spent):
        if not asked:                   # the first machine's release only
            asked.append(1)
            answers.append(call(app, "/v1/enroll", enroll_body(token, make_csr()[1])))
        let_go(held, pubkey, spent)
    monkeypatch.setattr(app.holds, "let_go", let_go_after_another_enrolls)
    assert call(app, "/v1/enroll", enroll_body(token, make_csr()[1]))[0] == 200
    assert answers[0][0] == 200, answers[0]
