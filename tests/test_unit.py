"""Unit tests: pure logic and the enrollment app in-process (no root, no network)."""

import base64
import hashlib
import io
import itertools
import json
import os
import subprocess
import threading
import time

import pytest

import dynfarm
from helpers import SITE_CONF, VERSION, call, db_snapshot, enroll_body, tamper, write_site


# --- config -----------------------------------------------------------------

def config_error(tmp_path, conf, capsys):
    """Run a command on conf; return (exit code, stderr lines)."""
    path = write_site(str(tmp_path), conf)
    code = dynfarm.main(["-c", path, "init"])
    return code, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize("change, message", [
    (("vpn_port = 1194", "vpn_prot = 1194"), "unknown key 'vpn_prot'"),
    (("[site]", "[sight]"), "missing [site] section"),
    (("10.9.0.0/29", "10.8.0.0/25"), "overlaps"),
    (("files = custom/aruba/files", "files = ../../etc"), "escapes the configuration directory"),
    (("commands = custom/aruba/setup.sh", "commands = custom/../../x.sh"), "escapes the configuration directory"),
    (("vpn_port = 1195", "vpn_port = 1194"), "both use udp port 1194"),
    (("encap = vxlan", "encap = ipip"), "expected one of gre, vxlan"),
    (("[provider:other]", "[provider:Other-1]"), "bad name"),
    (("[link:master]", "[linky:master]"), "unknown section"),
    (("listen = 127.0.0.1:0", "listen = nowhere"), "expected ADDRESS:PORT"),
    (("vpn_subnet = 10.8.0.0/24", "vpn_subnet = 10.8.0.1/24"), "host bits set"),
    (("public_address = 127.0.0.1\n", ""), "missing required key 'public_address'"),
])
def test_config_errors_are_one_line_exit_2(tmp_path, capsys, change, message):
    code, lines = config_error(tmp_path, SITE_CONF.replace(*change), capsys)
    assert code == 2
    assert len(lines) == 1 and message in lines[0], lines


def test_missing_config_file_names_it(tmp_path, capsys):
    assert dynfarm.main(["-c", str(tmp_path / "nope.conf"), "init"]) == 2
    assert "nope.conf: no such configuration file" in capsys.readouterr().err


def test_valid_config_parses(tmp_path):
    config = dynfarm.load_config(write_site(str(tmp_path)))
    aruba = config.providers["aruba"]
    assert str(aruba.server_address) == "10.8.0.1"
    assert aruba.interface == "df-aruba"
    assert config.links["master"].encap == "vxlan"
    assert aruba.commands == [os.path.realpath(str(tmp_path / "custom/aruba/setup.sh"))]


@pytest.mark.parametrize("text, seconds", [("90", 90), ("30m", 1800), ("24h", 86400), ("7d", 604800)])
def test_durations(text, seconds):
    assert dynfarm.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "0", "1w", "-3h", "h"])
def test_bad_durations(text):
    with pytest.raises(dynfarm.Fatal):
        dynfarm.parse_duration(text)


# --- init ---------------------------------------------------------------------

def test_init_is_idempotent(tmp_path, capsys):
    path = write_site(str(tmp_path))
    assert dynfarm.main(["-c", path, "init"]) == 0
    first = capsys.readouterr().out
    assert "added: site CA" in first and "added: site database" in first
    state = tmp_path / "state"
    before = {p: p.stat().st_mtime_ns for p in state.rglob("*") if p.is_file() and p.suffix != ".db-shm"}
    assert dynfarm.main(["-c", path, "init"]) == 0
    assert capsys.readouterr().out.startswith("nothing to add")
    after = {p: p.stat().st_mtime_ns for p in state.rglob("*") if p.is_file() and p.suffix != ".db-shm"}
    assert before == after


def test_init_secrets_are_private(site):
    config, _, _ = site
    for name in ("pki/ca.key", "pki/server.key", "openvpn/aruba.tlscrypt", "dynfarm.db"):
        assert os.stat(config.state(name)).st_mode & 0o077 == 0, name


def test_openvpn_server_config_is_split_static_and_checked(site):
    config, _, _ = site
    text = dynfarm.openvpn_server_config(config, config.providers["aruba"])
    for line in ("topology subnet", "ccd-exclusive", "dev df-aruba", "ifconfig 10.8.0.1 255.255.255.0",
                 'push "route 10.10.0.5 255.255.255.255"', "remote-cert-tls client", "status-version 2",
                 "keepalive 10 60", "dh none", "tls-version-min 1.2"):
        assert line in text.splitlines(), line
    assert "redirect-gateway" not in text
    assert "\nserver " not in text            # no dynamic pool
    for directive in ("crl-verify", "tls-crypt", "management", "client-config-dir", "status"):
        assert any(line.startswith(directive + " ") for line in text.splitlines()), directive


def test_openvpn_server_config_parses_with_real_openvpn(site, tmp_path):
    """openvpn itself must accept what we generate (a typo would only show at boot)."""
    config, _, _ = site
    path = config.state("openvpn", "aruba.conf")
    done = subprocess.run(["openvpn", "--config", path, "--dev", "null", "--ifconfig-noexec",
                           "--route-noexec", "--verb", "0", "--show-ciphers"],
                          capture_output=True, text=True, timeout=20)
    assert done.returncode == 0, done.stderr


# --- tokens -----------------------------------------------------------------

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
    store.use_token(used.split(".")[0])
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


# --- addresses ------------------------------------------------------------------

def test_allocate_lowest_free_skipping_server(site):
    config, _, _ = site
    provider = config.providers["other"]                    # 10.9.0.0/29
    seg = dynfarm.segment(config, provider)
    assert (seg.netmask, seg.server) == ("255.255.255.248", "10.9.0.1")
    assert dynfarm.allocate_address(provider, seg, set().__contains__) == "10.9.0.2"
    assert dynfarm.allocate_address(provider, seg, {"10.9.0.2", "10.9.0.4"}.__contains__) == "10.9.0.3"
    with pytest.raises(dynfarm.RequestError, match="no free address left in 10.9.0.2-10.9.0.6") as e:
        dynfarm.allocate_address(provider, seg, {f"10.9.0.{i}" for i in range(2, 7)}.__contains__)
    assert e.value.status == 503


def test_allocation_starts_at_the_hint_and_wraps_around(site):
    config, _, _ = site
    provider = config.providers["other"]                    # 10.9.0.2 - 10.9.0.6
    seg = dynfarm.segment(config, provider)
    number = int(dynfarm.ipaddress.IPv4Address("10.9.0.4"))
    asked = []

    def taken(address):
        asked.append(address)
        return address in {"10.9.0.3", "10.9.0.4"}
    assert dynfarm.allocate_address(provider, seg, taken, number) == "10.9.0.5"
    assert asked == ["10.9.0.4", "10.9.0.5"]       # one lookup per taken address, no scan
    # Past the end it goes round: an address freed below the hint is found.
    taken = {"10.9.0.3", "10.9.0.4", "10.9.0.5", "10.9.0.6"}.__contains__
    assert dynfarm.allocate_address(provider, seg, taken, number) == "10.9.0.2"


def test_bridged_segment_comes_from_the_pool_and_the_bridge(site, monkeypatch):
    config, _, _ = site
    config.mode, config.bridge = "bridged", "br-lan"
    config.providers["aruba"].bridge_pool = dynfarm.parse_pool("10.10.0.100-10.10.0.101", "x")
    monkeypatch.setattr(dynfarm, "bridge_interface", lambda name: dynfarm.ipaddress.IPv4Interface("10.10.0.1/24"))
    seg = dynfarm.segment(config, config.providers["aruba"])
    assert (seg.netmask, seg.server, seg.describe()) == ("255.255.255.0", "10.10.0.1", "10.10.0.100-10.10.0.101")
    assert dynfarm.allocate_address(config.providers["aruba"], seg, {"10.10.0.100"}.__contains__) == "10.10.0.101"
    text = dynfarm.openvpn_server_config(config, config.providers["aruba"])
    assert "dev-type tap" in text and 'push "route-gateway 10.10.0.1"' in text
    assert "ifconfig " not in text and "topology" not in text
    do = [" ".join(a["do"]) for a in dynfarm.links_plan(config, {})]
    assert do[:3] == ["ip tuntap add dev df-aruba mode tap", "ip link set df-aruba master br-lan",
                      "ip link set df-aruba up"]


@pytest.mark.parametrize("change, message", [
    ("mode = gre\nbridge = \n", "needs [site] bridge"),
    ("mode = gre\nbridge = br0\n", "needs bridge_pool in [provider:aruba]"),
])
def test_bridged_config_errors(tmp_path, capsys, change, message):
    conf = SITE_CONF.replace("request_timeout = 2\n", "request_timeout = 2\n" + change.replace("gre", "bridged"))
    code, lines = config_error(tmp_path, conf, capsys)
    assert code == 2 and message in lines[0], lines


# --- the enrollment app, in-process -------------------------------------------------

@pytest.fixture
def app(site):
    config, store, pki = site
    return dynfarm.App(config, store, pki)


def test_enroll_gives_name_address_and_config(app, make_csr):
    token, _ = dynfarm.new_token(app.store, "aruba", 5, 60)
    key, csr = make_csr()
    status, answer, _ = call(app, "/v1/enroll", enroll_body(token, csr))
    assert status == 200, answer
    assert (answer["name"], answer["address"], answer["vpn_server"]) == ("aruba-0001", "10.8.0.2", "10.8.0.1")
    ovpn = answer["openvpn_config"]
    assert "<ca>" in ovpn and "<cert>" in ovpn and "<tls-crypt>" in ovpn
    assert "PRIVATE KEY" not in json.dumps(answer)
    subject = subprocess.run(["openssl", "x509", "-noout", "-subject"], input=answer["certificate"],
                             capture_output=True, text=True).stdout
    assert "CN = aruba-0001" in subject
    with open(app.config.state("ccd", "aruba", "aruba-0001")) as f:
        assert f.read() == "ifconfig-push 10.8.0.2 255.255.255.0\n"
    custom = answer["customization"]
    files = {f["path"]: f for f in custom["files"]}
    assert base64.b64decode(files["/etc/dynfarm-test/greeting"]["data"]) == b"hello from the site\n"
    assert files["/etc/dynfarm-test/greeting"]["mode"] == 0o640
    assert custom["commands"][0]["name"] == "setup.sh"
    assert custom["ssh_keys"][0].startswith("ssh-ed25519 ")


def served_files(app):
    return {f["path"]: f for f in dynfarm.customization(app.config, app.config.providers["aruba"])["files"]}


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
    again = call(app, "/v1/enroll", enroll_body(token, dynfarm.make_csr(key, "x")))
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
    csr = make_csr()[1]
    assert call(app, "/v1/enroll", enroll_body(aruba, csr))[0] == 200
    before = db_snapshot(app.store)
    status, answer, _ = call(app, "/v1/enroll", enroll_body(other, csr, provider="other"))
    assert status == 403 and "machine is enrolled with provider aruba, not other" in answer["error"]
    assert db_snapshot(app.store) == before


def test_source_networks_are_enforced(site, make_csr):
    config, store, pki = site
    config.providers["aruba"].networks = [dynfarm.ipaddress.IPv4Network("192.0.2.0/24")]
    app = dynfarm.App(config, store, pki)
    token, _ = dynfarm.new_token(store, "aruba", 1, 60)
    status, answer, _ = call(app, "/v1/enroll", enroll_body(token, make_csr()[1]), peer_ip="198.51.100.7")
    assert status == 403 and "not in provider aruba's networks" in answer["error"]
    assert call(app, "/v1/enroll", enroll_body(token, make_csr()[1]), peer_ip="192.0.2.9")[0] == 200


def test_old_client_is_told_to_update_without_using_the_token(app, make_csr):
    token, _ = dynfarm.new_token(app.store, "aruba", 1, 60)
    status, answer, _ = call(app, "/v1/enroll", {"version": "0" * 64, "token": token, "legacy": 1})
    assert status == 200 and answer == {"status": "update", "sha256": VERSION, "url": "/v1/client"}
    assert app.store.token(token.split(".")[0])["uses_left"] == 1
    status, source, headers = call(app, "/v1/client", b"", method="GET")
    assert hashlib.sha256(source).hexdigest() == headers["X-Dynfarm-Sha256"] == VERSION
    status, answer, _ = call(app, "/v1/enroll", {"version": "0" * 64, "token": "bad.token"})
    assert status == 401


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
    assert os.listdir(app.config.state("ccd", "aruba")) == []


def test_unknown_paths_and_methods(app):
    assert call(app, "/v1/nope", b"")[0] == 404
    assert call(app, "/v1/enroll", b"", method="GET")[0] == 405
    assert call(app, "/v1/health", b"", method="GET")[1]["version"] == VERSION


def test_report_needs_a_certificate(app):
    assert call(app, "/v1/report", {"ok": True, "steps": [], "ready_seconds": 1})[0] == 401


def test_revoked_host_cannot_re_enroll_and_is_in_the_crl(app, make_csr, capsys):
    token, _ = dynfarm.new_token(app.store, "aruba", 1, 60)
    key, csr = make_csr()
    answer = call(app, "/v1/enroll", enroll_body(token, csr))[1]
    assert dynfarm.main(["-c", app.config.path, "revoke", answer["name"]]) == 0
    assert not os.path.exists(app.config.state("ccd", "aruba", answer["name"]))
    status, err, _ = call(app, "/v1/enroll", enroll_body(token, dynfarm.make_csr(key, "x")))
    assert status == 403 and "revoked" in err["error"]
    crl = subprocess.run(["openssl", "crl", "-in", app.config.state("pki", "crl.pem"), "-noout", "-text"],
                         capture_output=True, text=True).stdout
    serial = subprocess.run(["openssl", "x509", "-noout", "-serial"], input=answer["certificate"],
                            capture_output=True, text=True).stdout.split("=")[1].strip()
    assert serial in crl.replace(":", "").upper()


# --- PKI through the seam ----------------------------------------------------------

def test_signing_command_checks_the_request_and_forces_the_name(site, make_csr, monkeypatch):
    _, _, pki = site
    _, csr = make_csr()
    seen = []
    real_run = dynfarm.run

    def spy(argv, **kw):
        seen.append((argv, kw.get("input")))
        return real_run(argv, **kw)
    monkeypatch.setattr(dynfarm, "run", spy)
    serial = dynfarm.new_serial()
    pki.sign_client(csr, "aruba-0042", serial)
    argv, given = seen[0]
    assert argv[:8] == ["openssl", "req", "-config", pki.path("req.cnf"), "-in", "/dev/stdin", "-verify", "-x509"]
    assert argv[argv.index("-subj") + 1] == "/CN=aruba-0042"
    assert argv[argv.index("-set_serial") + 1] == "0x" + serial
    assert argv[argv.index("-CAkey") + 1] == pki.path("ca.key")
    assert "extendedKeyUsage=clientAuth" in argv and given == csr.encode()


def test_a_certificate_for_another_key_is_refused(site, make_csr, monkeypatch):
    """Were openssl to sign a key of its own, the certificate must not go out."""
    _, _, pki = site
    _, csr = make_csr()
    _, other_csr = make_csr()
    real_run = dynfarm.run
    monkeypatch.setattr(dynfarm, "run", lambda argv, **kw: real_run(argv, **dict(kw, input=other_csr.encode())))
    with pytest.raises(dynfarm.Fatal, match="signed a key other than the request's"):
        pki.sign_client(csr, "aruba-0042", dynfarm.new_serial())


# --- DER ----------------------------------------------------------------------

def test_csr_and_certificate_carry_the_same_key(app, make_csr):
    token, _ = dynfarm.new_token(app.store, "aruba", 1, 60)
    _, csr = make_csr()
    cert = call(app, "/v1/enroll", enroll_body(token, csr))[1]["certificate"]
    assert dynfarm.cert_public_key(dynfarm.pem_to_der(cert, "CERTIFICATE")) == dynfarm.csr_public_key(csr)


@pytest.mark.parametrize("junk", [b"", b"\x30", b"\x30\x85\x01\x02\x03\x04\x05", b"\x30\x03\x02\x01"])
def test_der_parser_rejects_junk(junk):
    with pytest.raises(ValueError):
        dynfarm.public_key_of(junk, 2)


# --- client-side customization -----------------------------------------------------

@pytest.fixture
def client(tmp_path):
    return dynfarm.Client("https://127.0.0.1:1", "ca.pem", "", "", str(tmp_path / "state"),
                          str(tmp_path / "root"), 5)


def test_a_409_from_the_server_is_an_overtaken_enrollment(client, monkeypatch):
    def conflict(request, timeout, context):
        raise dynfarm.urllib.error.HTTPError(request.full_url, 409, "Conflict", {},
                                             io.BytesIO(b'{"error": "host aruba-0001 was released"}'))
    monkeypatch.setattr(dynfarm.urllib.request, "urlopen", conflict)
    monkeypatch.setattr(client, "tls_context", lambda: None)
    with pytest.raises(dynfarm.Overtaken, match="409 host aruba-0001 was released"):
        client.call("POST", "/v1/enroll", {})


def test_retry_pauses_back_off_with_jitter():
    for _ in range(50):
        pauses = list(itertools.islice(dynfarm.retry_pauses(), 20))
        assert 1 <= pauses[0] <= 3 and 2 <= pauses[1] <= 6
        assert all(15 <= p <= 45 for p in pauses[4:])
    runs = {tuple(itertools.islice(dynfarm.retry_pauses(), 5)) for _ in range(5)}
    assert len(runs) == 5                                   # VMs turned away together do not move in step


ENROLLED = {"status": "enrolled", "name": "aruba-0001", "provider": "aruba", "address": "10.8.0.2",
            "certificate": "CERT"}


def unreachable_then(client, monkeypatch, failures, attempt_seconds=0.0):
    """client.enroll fails `failures` times as if nobody answered (each try
    taking attempt_seconds), then answers; time runs on a fake clock.
    Returns (pauses slept, the clock)."""
    clock, slept = [1000.0], []

    def enroll():
        clock[0] += attempt_seconds
        if failures > len(slept):
            raise dynfarm.ServerUnreachable("Connection refused")
        return ENROLLED

    def sleep(seconds):
        slept.append(seconds)
        clock[0] += seconds
    monkeypatch.setattr(client, "enroll", enroll)
    monkeypatch.setattr(dynfarm.time, "sleep", sleep)
    monkeypatch.setattr(dynfarm.time, "monotonic", lambda: clock[0])
    return slept, clock


def test_a_first_enrollment_waits_for_the_server(client, monkeypatch, capsys):
    client.wait = 300
    os.makedirs(client.dir)
    slept, _ = unreachable_then(client, monkeypatch, 3)
    assert client.enroll_or_stored()["name"] == "aruba-0001"
    assert len(slept) == 3
    assert capsys.readouterr().out.count("unreachable (Connection refused); trying again in") == 3


@pytest.mark.parametrize("attempt_seconds", [0.0, 20.0])
def test_a_first_enrollment_gives_up_after_its_wait(client, monkeypatch, attempt_seconds):
    """The wait counts the tries too, not only the pauses between them."""
    client.wait = 60
    slept, clock = unreachable_then(client, monkeypatch, 1000, attempt_seconds)
    with pytest.raises(dynfarm.Fatal, match=r"nothing stored from an earlier boot \(kept trying for 60s\)"):
        client.enroll_or_stored()
    assert 60 <= clock[0] - 1000 <= 60 + attempt_seconds
    assert slept


def test_a_later_boot_uses_what_it_stored_at_once(client, monkeypatch):
    client.wait = 300
    os.makedirs(client.dir)
    dynfarm.write_file(client.path("enrollment.json"), json.dumps(ENROLLED), 0o600)
    slept, _ = unreachable_then(client, monkeypatch, 1000)
    assert client.enroll_or_stored() == ENROLLED
    assert slept == []


def test_an_overtaken_enrollment_is_tried_once_more(client, monkeypatch):
    monkeypatch.setattr(dynfarm, "make_csr", lambda key, cn: "CSR")
    answers = [dynfarm.Overtaken("refused /v1/enroll: 409 host aruba-0001 was released; enroll again"),
               {"status": "enrolled", "name": "aruba-0002"},
               dynfarm.Overtaken("refused /v1/enroll: 409"), dynfarm.Overtaken("refused /v1/enroll: 409")]

    def call(method, path, body=None):
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer
    monkeypatch.setattr(client, "call", call)
    assert client.enroll()["name"] == "aruba-0002"
    with pytest.raises(dynfarm.Overtaken):          # twice in a row: say so, do not loop
        client.enroll()


def test_ssh_keys_installed_once_after_ten_boots(client, tmp_path):
    for _ in range(10):
        client.install_ssh_keys(["ssh-ed25519 AAAAkey1 admin", "ssh-ed25519 AAAAkey2 other"])
    path = tmp_path / "root" / ".ssh" / "authorized_keys"
    assert path.read_text().splitlines() == ["ssh-ed25519 AAAAkey1 admin", "ssh-ed25519 AAAAkey2 other"]
    assert path.stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "root" / ".ssh").stat().st_mode & 0o777 == 0o700


def test_files_written_with_modes_and_paths_checked(client, tmp_path):
    target = tmp_path / "out" / "conf"
    client.apply_file({"path": str(target), "type": "file", "mode": 0o600,
                       "data": base64.b64encode(b"x=1\n").decode()})
    assert target.read_bytes() == b"x=1\n" and target.stat().st_mode & 0o777 == 0o600
    with pytest.raises(dynfarm.Fatal):
        client.apply_file({"path": "etc/relative", "type": "file", "mode": 0o644, "data": ""})


def test_commands_run_in_order_and_failures_counted(client, tmp_path, capsys):
    os.makedirs(client.dir)
    out = tmp_path / "order"
    failed = client.apply_customization({"ssh_keys": [], "files": [], "commands": [
        {"name": "a.sh", "script": f"echo a >> {out}\n"},
        {"name": "b.sh", "script": f"echo b >> {out}; exit 3\n"},
        {"name": "c.sh", "script": f"echo c >> {out}\n"},
    ]})
    assert failed == 1
    assert out.read_text() == "a\nb\nc\n"
    said = capsys.readouterr().out
    assert "command a.sh: exit 0" in said and "command b.sh: exit 3" in said


# --- remote_control list and known_hosts --------------------------------------------------

def test_list_and_known_hosts(app, make_csr, capsys):
    token, _ = dynfarm.new_token(app.store, "aruba", 2, 60)
    for _ in range(2):
        call(app, "/v1/enroll", enroll_body(token, make_csr()[1]))
    assert dynfarm.main(["-c", app.config.path, "remote_control", "-p", "aruba", "list"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["NAME", "PROVIDER", "ADDRESS", "STATE", "LAST", "SEEN", "VERSION", "CORES", "MEMORY"]
    assert table[1].split()[:7] == ["aruba-0001", "aruba", "10.8.0.2", "vpn-down", "0s", "ago", VERSION[:12]]
    assert table[1].split()[7] == "2"
    assert dynfarm.main(["-c", app.config.path, "remote_control", "list", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == ["aruba-0001", "aruba-0002"]
    assert dynfarm.known_hosts(app.store).splitlines()[0] == "10.8.0.2 ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGl1"


def test_remote_control_symlink_dispatch(site, tmp_path):
    config, _, _ = site
    link = tmp_path / "remote_control"
    link.symlink_to(os.path.join(os.path.dirname(dynfarm.__file__), "dynfarm.py"))
    done = subprocess.run([str(link), "-c", config.path, "list"], capture_output=True, text=True)
    assert done.returncode == 0 and "no hosts enrolled" in done.stderr


# --- bootstrap ------------------------------------------------------------------

def test_bootstrap_is_valid_posix_sh_with_a_fresh_token(site, capsys):
    config, store, _ = site
    assert dynfarm.main(["-c", config.path, "bootstrap", "aruba", "--uses", "5"]) == 0
    script = capsys.readouterr().out
    for shell in (["dash", "-n"], ["busybox", "sh", "-n"]):
        done = subprocess.run(shell, input=script, capture_output=True, text=True)
        assert done.returncode == 0, (shell, done.stderr)
    token = next(line.split("=", 1)[1] for line in script.splitlines() if line.startswith("DYNFARM_TOKEN="))
    assert dynfarm.check_token(store, token)["uses_left"] == 5
    assert "BEGIN CERTIFICATE" in script and script.rstrip().endswith('main "$@"')
    assert "DYNFARM_SERVER=https://127.0.0.1:0" in script


def test_bootstrap_cloud_init_carries_the_same_script(site, capsys):
    config, _, _ = site
    assert dynfarm.main(["-c", config.path, "bootstrap", "aruba", "--cloud-init"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("#cloud-config\n")
    encoded = next(line.split(":", 1)[1].strip() for line in text.splitlines() if "content:" in line)
    assert base64.b64decode(encoded).decode().startswith("#!/bin/sh")


# --- links: the plan as data ------------------------------------------------------

def gre_config(site):
    config, _, _ = site
    config.links["master"].encap = "gre"
    return config


def test_gre_link_plan_commands(site):
    config = gre_config(site)
    plan = dynfarm.links_plan(config, {"master": ("10.10.0.1", "br-site")})
    do = [" ".join(action["do"]) for action in plan]
    assert do[:8] == [
        "sysctl -qw net/ipv4/conf/default/forwarding=1",
        "sysctl -qw -e net/ipv4/conf/df-aruba/forwarding=1",
        "sysctl -qw -e net/ipv4/conf/df-other/forwarding=1",
        "ip link add dl-master type gre local 10.10.0.1 remote 10.10.0.5 ttl 64",
        "ip addr add 169.254.64.1/30 dev dl-master",
        "sysctl -qw net.ipv4.conf.dl-master.rp_filter=2",
        "ip link set dl-master up",
        "ip route add 10.10.0.5/32 via 169.254.64.2 dev dl-master table 4200",
    ]
    assert "ip route add unreachable default table 4200" in do
    assert "ip rule add iif df-aruba to 10.8.0.0/24 lookup main pref 4199" in do
    assert "ip rule add iif df-aruba lookup 4200 pref 4200" in do
    assert "ip rule add iif df-other lookup 4200 pref 4200" in do
    assert "iptables -w -t filter -A DYNFARM-FWD -i df-+ -o dl-master -d 10.10.0.5 -j ACCEPT" in do
    assert "iptables -w -t filter -A DYNFARM-FWD -i df-+ -j DROP" in do
    assert do.index("iptables -w -t filter -I FORWARD 1 -j DYNFARM-FWD") > do.index(
        "iptables -w -t filter -A DYNFARM-FWD -i df-+ -j DROP")     # the wall is whole before it is used
    assert any("TCPMSS --clamp-mss-to-pmtu" in line for line in do)


def test_vxlan_link_uses_its_own_id_and_port(site):
    config, _, _ = site
    plan = [a for a in dynfarm.links_plan(config, {"master": ("10.10.0.1", "br-site")}) if a["do"][0] == "ip"]
    assert plan[0]["do"] == ["ip", "link", "add", "dl-master", "type", "vxlan", "id", "4200", "local",
                             "10.10.0.1", "remote", "10.10.0.5", "dstport", "4789"]


def test_every_step_that_adds_has_its_undo(site):
    config = gre_config(site)
    for action in dynfarm.links_plan(config, {"master": ("10.10.0.1", "br-site")}):
        verb = action["do"][2] if action["do"][0] == "ip" else action["do"][-1]
        if action["do"][:3] in (["ip", "addr", "add"], ["ip", "link", "set"]) or "rp_filter" in verb:
            continue                          # gone with the link device
        assert action["undo"], action["do"]


def test_vm_to_vm_no_drops_the_same_provider_rule(site):
    config, _, _ = site
    config.providers["aruba"].vm_to_vm = False
    do = [" ".join(a["do"]) for a in dynfarm.links_plan(config, {"master": ("10.10.0.1", "br-site")})]
    assert not any("iif df-aruba to 10.8.0.0/24" in line for line in do)
    assert not any("-i df-aruba -o df-aruba" in line for line in do)
    assert any("-i df-other -o df-other" in line for line in do)


def test_apply_plan_rolls_back_on_failure(tmp_path, monkeypatch):
    ran = []

    def fake_run(argv, check=True, **kw):
        ran.append(argv)
        if argv == ["boom"]:
            raise dynfarm.Fatal("boom failed")
        return subprocess.CompletedProcess(argv, 0, b"", b"")
    monkeypatch.setattr(dynfarm, "run", fake_run)
    plan = [dynfarm.step(["a"], ["undo-a"]), dynfarm.step(["b"], ["undo-b"]), dynfarm.step(["boom"], ["x"])]
    record = str(tmp_path / "links.json")
    with pytest.raises(dynfarm.Fatal):
        dynfarm.apply_plan(plan, record)
    assert ran == [["a"], ["b"], ["boom"], ["undo-b"], ["undo-a"]]
    assert not os.path.exists(record)


def test_sysctl_undo_restores_the_previous_value(tmp_path, monkeypatch):
    monkeypatch.setattr(dynfarm, "run", lambda argv, check=True, **kw: subprocess.CompletedProcess(argv, 0))
    proc = tmp_path / "forwarding"
    proc.write_text("0\n")
    action = dynfarm.sysctl_step("net/ipv4/conf/eth0.100/forwarding", 1)
    assert action["previous"] == "/proc/sys/net/ipv4/conf/eth0.100/forwarding"   # a dot in a name stays
    action["previous"] = str(proc)
    done = dynfarm.apply_plan([action], str(tmp_path / "rec.json"))
    assert done[0]["undo"] == ["sysctl", "-qw", "net/ipv4/conf/eth0.100/forwarding=0"]


def test_a_tun_device_gets_back_its_own_forwarding_switch(site, tmp_path, monkeypatch):
    """On a host that forwarded already, links down must leave its tun devices forwarding."""
    config, _, _ = site
    monkeypatch.setattr(dynfarm, "run", lambda argv, check=True, **kw: subprocess.CompletedProcess(argv, 0))
    (tmp_path / "on").write_text("1\n")
    steps = [a for a in dynfarm.forwarding_steps(config, {}) if "-e" in a["do"]]
    steps[0]["previous"] = str(tmp_path / "on")                       # df-aruba: there, forwarding
    steps[1]["previous"] = str(tmp_path / "absent")                   # df-other: not made yet
    done = dynfarm.apply_plan(steps, str(tmp_path / "rec.json"))
    assert [d["undo"][-1] for d in done] == ["net/ipv4/conf/df-aruba/forwarding=1",
                                             "net/ipv4/conf/df-other/forwarding=0"]


def test_peer_script_is_posix_and_idempotent_in_form(site):
    config = gre_config(site)
    script = dynfarm.peer_script(config, config.links["master"], "10.10.0.1")
    for shell in (["dash", "-n"], ["busybox", "sh", "-n"]):
        assert subprocess.run(shell, input=script, text=True).returncode == 0
    assert "ip link show dl-dynfarm >/dev/null 2>&1 || ip link add dl-dynfarm type gre local 10.10.0.5 " \
           "remote 10.10.0.1 ttl 64" in script
    assert "ip route replace 10.8.0.0/24 via 169.254.64.1 dev dl-dynfarm src 10.10.0.5" in script
    assert "ip route replace 10.9.0.0/29 via 169.254.64.1 dev dl-dynfarm src 10.10.0.5" in script
    assert script.rstrip().endswith('main "$@"')
    down = dynfarm.peer_script(config, config.links["master"], "10.10.0.1", down=True)
    assert "ip link del dl-dynfarm" in down and "ip link add" not in down


def test_routed_mode_forwards_only_to_and_from_the_linked_hosts(site, capsys):
    config, _, _ = site
    config.mode = "routed"
    do = [" ".join(a["do"]) for a in dynfarm.links_plan(config, {"master": ("10.10.0.1", "br-site")})]
    assert not any(line.startswith(("ip link", "ip rule", "ip route")) for line in do)
    assert [line for line in do if line.startswith("sysctl")] == [
        "sysctl -qw net/ipv4/conf/default/forwarding=1", "sysctl -qw -e net/ipv4/conf/df-aruba/forwarding=1",
        "sysctl -qw -e net/ipv4/conf/df-other/forwarding=1", "sysctl -qw net/ipv4/conf/br-site/forwarding=1"]
    rules = [line.split("-A DYNFARM-FWD ")[1] for line in do if "-A DYNFARM-FWD" in line]
    assert rules == ["-i df-+ -o br-site -d 10.10.0.5 -j ACCEPT", "-i br-site -s 10.10.0.5 -o df-+ -j ACCEPT",
                     "-i br-site -o df-+ -p icmp -m conntrack --ctstate RELATED -j ACCEPT",
                     "-i df-aruba -o df-aruba -j ACCEPT", "-i df-other -o df-other -j ACCEPT",
                     "-i df-+ -j DROP", "-o df-+ -j DROP"]


def test_site_conf_example_is_valid(tmp_path):
    """The documented example must load once its customization tree exists."""
    repo = os.path.dirname(os.path.abspath(dynfarm.__file__))
    with open(os.path.join(repo, "site.conf.example")) as f:
        text = f.read()
    (tmp_path / "custom" / "aruba" / "files").mkdir(parents=True)
    (tmp_path / "custom" / "aruba" / "setup.sh").write_text("true\n")
    (tmp_path / "site.conf").write_text(text)
    config = dynfarm.load_config(str(tmp_path / "site.conf"))
    assert config.links["batch-master"].device == "dl-batch-master"
    assert config.providers["aruba"].vm_to_vm is True


# --- defects found in review, each pinned by a test ---------------------------------

def test_init_renews_a_server_certificate_close_to_expiry(tmp_path, capsys, monkeypatch):
    path = write_site(str(tmp_path))
    monkeypatch.setattr(dynfarm, "CERT_DAYS", 10)
    assert dynfarm.main(["-c", path, "init"]) == 0
    state = tmp_path / "state" / "pki"
    old = (state / "server.crt").read_text()
    monkeypatch.setattr(dynfarm, "CERT_DAYS", 825)
    capsys.readouterr()
    assert dynfarm.main(["-c", path, "init"]) == 0
    assert "renewed server certificate" in capsys.readouterr().out
    assert dynfarm.cert_expires((state / "server.crt").read_text()) > dynfarm.cert_expires(old) + 800 * 86400
    assert dynfarm.main(["-c", path, "init"]) == 0
    assert capsys.readouterr().out.startswith("nothing to add")


def revoke_while_signing(app, monkeypatch, then_fail=False):
    """Make the next signing run the real 'revoke' command on its host (and
    then fail, if asked); the list it returns gets the serial signed."""
    sign, signed = app.pki.sign_client, []

    def sign_then_revoke(csr_pem, host, serial):
        certificate = sign(csr_pem, host, serial)
        signed.append(serial)
        assert dynfarm.main(["-c", app.config.path, "revoke", host]) == 0
        if then_fail:
            raise dynfarm.Fatal("openssl could not sign: test")
        return certificate
    monkeypatch.setattr(app.pki, "sign_client", sign_then_revoke)
    return signed


def cert_serial(certificate):
    return subprocess.run(["openssl", "x509", "-noout", "-serial"], input=certificate,
                          capture_output=True, text=True, check=True).stdout.split("=")[1].strip().lower()


def crl_serials(config):
    text = subprocess.run(["openssl", "crl", "-in", config.state("pki", "crl.pem"), "-noout", "-text"],
                          capture_output=True, text=True, check=True).stdout
    return {line.split(":", 1)[1].strip().lower() for line in text.splitlines() if "Serial Number:" in line}


def test_a_revoke_landing_while_a_host_re_enrolls_wins_and_lists_its_live_certificate(app, make_csr, monkeypatch):
    token, _ = dynfarm.new_token(app.store, "aruba", 1, 60)
    key, csr = make_csr()
    first = call(app, "/v1/enroll", enroll_body(token, csr))[1]
    revoke_while_signing(app, monkeypatch)
    status, answer, _ = call(app, "/v1/enroll", enroll_body(token, dynfarm.make_csr(key, "x")))
    assert status == 403 and "revoked" in answer["error"]
    assert not os.path.exists(app.config.state("ccd", "aruba", first["name"]))
    # The certificate the machine holds is the one to refuse, not the one never handed out.
    assert crl_serials(app.config) == {cert_serial(first["certificate"])}


def test_a_revoke_of_a_new_host_while_signing_keeps_its_row_and_token_use(app, make_csr, monkeypatch):
    token, _ = dynfarm.new_token(app.store, "aruba", 2, 60)
    signed = revoke_while_signing(app, monkeypatch)
    status, answer, _ = call(app, "/v1/enroll", enroll_body(token, make_csr()[1]))
    assert status == 403 and "revoked" in answer["error"]
    (host,) = app.store.hosts()
    assert host["revoked_at"] is not None      # not released: the revoke stands
    assert dynfarm.check_token(app.store, token)["uses_left"] == 1
    assert not os.path.exists(app.config.state("ccd", "aruba", host["name"]))
    assert crl_serials(app.config) == set(signed)


def test_a_revoke_of_a_new_host_stands_when_its_signing_then_fails(app, make_csr, monkeypatch):
    token, _ = dynfarm.new_token(app.store, "aruba", 2, 60)
    key, csr = make_csr()
    revoke_while_signing(app, monkeypatch, then_fail=True)
    with pytest.raises(dynfarm.Fatal):
        call(app, "/v1/enroll", enroll_body(token, csr))
    (host,) = app.store.hosts()
    assert host["revoked_at"] is not None
    assert dynfarm.check_token(app.store, token)["uses_left"] == 1
    assert not os.path.exists(app.config.state("ccd", "aruba", host["name"]))
    monkeypatch.undo()
    status, answer, _ = call(app, "/v1/enroll", enroll_body(token, dynfarm.make_csr(key, "x")))
    assert status == 403 and "revoked" in answer["error"]


def retry_while_signing(app, monkeypatch, token, key, then_fail):
    """Make the next signing let the same machine enroll again first (a retry
    finds the reserved row and takes it over), then fail or go on; the list
    it returns gets the retry's answer."""
    sign, answers = app.pki.sign_client, []

    def sign_after_a_retry(csr_pem, host, serial):
        monkeypatch.setattr(app.pki, "sign_client", sign)
        answers.append(call(app, "/v1/enroll", enroll_body(token, dynfarm.make_csr(key, "x"))))
        if then_fail:
            raise dynfarm.Fatal("openssl: no answer after 120s")
        return sign(csr_pem, host, serial)
    monkeypatch.setattr(app.pki, "sign_client", sign_after_a_retry)
    return answers


def test_a_failed_enrollment_leaves_the_row_a_retry_took_over(app, make_csr, monkeypatch):
    token, _ = dynfarm.new_token(app.store, "aruba", 2, 60)
    key, csr = make_csr()
    answers = retry_while_signing(app, monkeypatch, token, key, then_fail=True)
    with pytest.raises(dynfarm.Fatal):
        call(app, "/v1/enroll", enroll_body(token, csr))
    status, retry, _ = answers[0]
    assert status == 200 and retry["name"] == "aruba-0001"
    assert app.store.host("aruba-0001")["serial"] == cert_serial(retry["certificate"])
    assert os.path.exists(app.config.state("ccd", "aruba", "aruba-0001"))
    assert call(app, "/v1/enroll", enroll_body(token, make_csr()[1]))[1]["name"] == "aruba-0002"


def test_an_enrollment_overtaken_by_a_retry_does_not_hand_out_its_certificate(app, make_csr, monkeypatch):
    token, _ = dynfarm.new_token(app.store, "aruba", 2, 60)
    key, csr = make_csr()
    answers = retry_while_signing(app, monkeypatch, token, key, then_fail=False)
    status, answer, _ = call(app, "/v1/enroll", enroll_body(token, csr))
    assert status == 409 and "enrolled again" in answer["error"]
    retry = answers[0][1]
    assert app.store.host("aruba-0001")["serial"] == cert_serial(retry["certificate"])
    assert os.path.exists(app.config.state("ccd", "aruba", "aruba-0001"))


def test_a_retry_does_not_take_over_the_machine_its_name_went_to(app, make_csr, monkeypatch):
    """M1's first request fails and releases its name while M1's retry signs;
    M3 gets the name. The retry must not record itself over M3's row."""
    token, _ = dynfarm.new_token(app.store, "aruba", 3, 60)
    key1, csr1 = make_csr()
    csr3 = make_csr()[1]
    real, calls, lock = app.pki.sign_client, [], threading.Lock()
    first_signing, may_fail, released, answers = (threading.Event(), threading.Event(), threading.Event(), {})

    def sign(csr_pem, name, serial):
        with lock:
            calls.append(name)
            turn = len(calls)
        if turn == 1:                       # M1's first request: wait, then fail
            first_signing.set()
            may_fail.wait(10)
            raise dynfarm.Fatal("openssl: no answer after 120s")
        if turn == 2:                       # M1's retry: let the first fail, M3 enroll, then go on
            may_fail.set()
            released.wait(10)
            answers["m3"] = call(app, "/v1/enroll", enroll_body(token, csr3))
        return real(csr_pem, name, serial)
    monkeypatch.setattr(app.pki, "sign_client", sign)

    def first():
        with pytest.raises(dynfarm.Fatal):
            call(app, "/v1/enroll", enroll_body(token, csr1))
        released.set()
    worker = threading.Thread(target=first)
    worker.start()
    assert first_signing.wait(10)
    status, answer, _ = call(app, "/v1/enroll", enroll_body(token, dynfarm.make_csr(key1, "x")))
    worker.join(10)
    assert answers["m3"][0] == 200 and answers["m3"][1]["name"] == "aruba-0001"
    assert status == 409 and "released" in answer["error"]
    assert app.store.host("aruba-0001")["serial"] == cert_serial(answers["m3"][1]["certificate"])
    assert app.store.host("aruba-0001")["pubkey_sha256"] == dynfarm.csr_key_id(csr3)


def test_revoking_a_host_released_since_it_was_read_is_an_error(app, make_csr, monkeypatch, capsys):
    token, _ = dynfarm.new_token(app.store, "aruba", 1, 60)
    name = call(app, "/v1/enroll", enroll_body(token, make_csr()[1]))[1]["name"]
    row = app.store.host(name)
    with app.store.transaction():
        app.store.db.execute("DELETE FROM hosts WHERE name = ?", (name,))
    monkeypatch.setattr(dynfarm.Store, "host", lambda self, wanted: row)   # read before the release
    assert dynfarm.main(["-c", app.config.path, "revoke", name]) == 2
    assert "no host named" in capsys.readouterr().err
    monkeypatch.undo()
    token, _ = dynfarm.new_token(app.store, "aruba", 1, 60)
    assert call(app, "/v1/enroll", enroll_body(token, make_csr()[1]))[1]["name"] == name   # the name, reused
    monkeypatch.setattr(dynfarm.Store, "host", lambda self, wanted: row)
    assert dynfarm.main(["-c", app.config.path, "revoke", name]) == 2
    monkeypatch.undo()
    assert app.store.host(name)["revoked_at"] is None          # the machine that has the name now is not hit


def test_a_bad_request_carrying_an_enrolled_key_changes_nothing(app, make_csr):
    token, _ = dynfarm.new_token(app.store, "aruba", 1, 60)
    key, csr = make_csr()
    assert call(app, "/v1/enroll", enroll_body(token, csr))[0] == 200
    before = db_snapshot(app.store)
    status, answer, _ = call(app, "/v1/enroll", enroll_body(token, tamper(dynfarm.make_csr(key, "x")),
                                                            hostname="other", facts={"cores": 64}))
    assert status == 400 and "signature does not verify" in answer["error"]
    assert db_snapshot(app.store) == before


def test_ccd_entry_is_written_once_and_replaced_when_it_changes(site):
    config, _, _ = site
    provider = config.providers["aruba"]
    path = config.state("ccd", "aruba", "aruba-0001")
    dynfarm.write_ccd(config, provider, "aruba-0001", "10.8.0.2")
    first = os.stat(path)
    assert open(path).read() == "ifconfig-push 10.8.0.2 255.255.255.0\n"
    assert dynfarm.stat.S_IMODE(first.st_mode) == 0o644
    dynfarm.write_ccd(config, provider, "aruba-0001", "10.8.0.2")   # a reboot: left be
    assert os.stat(path).st_ino == first.st_ino
    dynfarm.write_ccd(config, provider, "aruba-0001", "10.8.0.3")
    assert open(path).read() == "ifconfig-push 10.8.0.3 255.255.255.0\n"
    assert os.stat(path).st_ino != first.st_ino                      # replaced, not rewritten in place


def test_openssl_failure_is_not_blamed_on_the_request(site, make_csr, monkeypatch):
    _, _, pki = site
    monkeypatch.setattr(dynfarm, "run", lambda argv, **kw: subprocess.CompletedProcess(
        argv, 1, b"", b"req: Unknown option: -CA\n"))
    with pytest.raises(dynfarm.Fatal, match="needs OpenSSL 3.0 or newer.*Unknown option: -CA"):
        pki.sign_client(make_csr()[1], "aruba-0001", dynfarm.new_serial())


def test_ipv4_clients_of_an_ipv6_listener_keep_their_networks(site, make_csr):
    config, store, pki = site
    config.providers["aruba"].networks = [dynfarm.ipaddress.IPv4Network("127.0.0.0/8")]
    app = dynfarm.App(config, store, pki)
    token, _ = dynfarm.new_token(store, "aruba", 1, 60)
    assert call(app, "/v1/enroll", enroll_body(token, make_csr()[1]), peer_ip="::ffff:127.0.0.1")[0] == 200


@pytest.mark.parametrize("facts, message", [
    ({"memory_mb": "4096"}, "fact 'memory_mb' must be an integer"),
    ({"cores": True}, "fact 'cores' must be an integer"),
    ({"load": float("nan")}, "short values"),
])
def test_fact_types_are_checked(app, make_csr, facts, message):
    token, _ = dynfarm.new_token(app.store, "aruba", 1, 60)
    body = enroll_body(token, make_csr()[1], facts=facts)
    status, answer, _ = call(app, "/v1/enroll", json.dumps(body).encode())
    assert status == 400 and message in answer["error"]


def test_an_existing_directory_keeps_its_mode(client, tmp_path):
    existing = tmp_path / "etc"
    existing.mkdir(mode=0o755)
    client.apply_file({"path": str(existing), "type": "dir", "mode": 0o700})
    assert existing.stat().st_mode & 0o777 == 0o755
    client.apply_file({"path": str(tmp_path / "etc" / "new"), "type": "dir", "mode": 0o750})
    assert (tmp_path / "etc" / "new").stat().st_mode & 0o777 == 0o750


def test_site_keys_dropped_from_the_config_leave_the_vm(client, tmp_path):
    os.makedirs(client.dir)
    ssh = tmp_path / "root" / ".ssh"
    ssh.mkdir(parents=True)
    (ssh / "authorized_keys").write_text("ssh-ed25519 AAAAvm-own key\n")
    client.install_ssh_keys(["ssh-ed25519 AAAAold site", "ssh-ed25519 AAAAnew site"])
    client.install_ssh_keys(["ssh-ed25519 AAAAnew site"])
    assert (ssh / "authorized_keys").read_text().splitlines() == ["ssh-ed25519 AAAAvm-own key",
                                                                 "ssh-ed25519 AAAAnew site"]


def test_an_expired_client_certificate_is_not_presented(app, make_csr, client, monkeypatch):
    token, _ = dynfarm.new_token(app.store, "aruba", 1, 60)
    key, csr = make_csr()
    os.makedirs(client.dir, exist_ok=True)
    with open(client.path("client.crt"), "w") as f:
        f.write(call(app, "/v1/enroll", enroll_body(token, csr))[1]["certificate"])
    assert client.certificate_usable()
    monkeypatch.setattr(dynfarm.time, "time", lambda: 4102444800.0)      # 2100
    assert not client.certificate_usable()


def test_a_links_record_from_another_boot_is_stale(tmp_path, monkeypatch):
    record = tmp_path / "links.json"
    record.write_text(json.dumps({"boot": "an-earlier-boot", "steps": [{"do": ["x"], "undo": ["y"]}]}))
    assert dynfarm.read_record(str(record)) is None and not record.exists()
    record.write_text(json.dumps({"boot": dynfarm.boot_id(), "steps": [{"do": ["x"], "undo": ["y"]}]}))
    assert dynfarm.read_record(str(record)) == [{"do": ["x"], "undo": ["y"]}]


@pytest.mark.parametrize("argv, message", [
    (["remote_control", "-f", "0", "list"], "at least 1"),
    (["token", "aruba", "--uses", "0"], "at least 1"),
    (["token", "aruba", "--ttl", "999999999999d"], "bad duration"),
    (["client", "--server", "https://192.0.2.1:8443", "--ca", "ca.pem", "--wait", "-1"], "0 or more"),
    (["client", "--server", "https://192.0.2.1:8443", "--ca", "ca.pem", "--wait", "nan"], "0 or more"),
])
def test_bad_numbers_are_usage_errors(site, capsys, argv, message):
    config, _, _ = site
    try:
        code = dynfarm.main(["-c", config.path] + argv)
    except SystemExit as e:        # argparse's own refusals
        code = e.code
    assert code == 2 and message in capsys.readouterr().err


def test_get_into_a_file_is_a_usage_error(site, capsys, tmp_path):
    config, _, _ = site
    target = tmp_path / "afile"
    target.write_text("")
    assert dynfarm.main(["-c", config.path, "remote_control", "--all", "get", "/etc/hostname", str(target)]) == 2
    assert "is not a directory" in capsys.readouterr().err
