"""The client on the VM, in-process with a temporary root.

How it waits for a server that does not answer and retries an overtaken
enrollment, how the site's customization is applied (ssh keys, files and
directories with their modes, commands in order), and which certificate it
presents.
"""

import base64
import io
import itertools
import json
import os
import urllib.parse

import pytest

import dynfarm
from helpers import call, cert_serial, enroll_body


# --- talking to the server --------------------------------------------------------

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
    dynfarm.write_file(client.enrollment_path, json.dumps(ENROLLED), 0o600)
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


# --- customization applied on the VM ----------------------------------------------

def test_ssh_keys_installed_once_after_ten_boots(client, tmp_path):
    for _ in range(10):
        client.install_ssh_keys(["ssh-ed25519 AAAAkey1 admin", "ssh-ed25519 AAAAkey2 other"])
    path = tmp_path / "root" / ".ssh" / "authorized_keys"
    assert path.read_text().splitlines() == ["ssh-ed25519 AAAAkey1 admin", "ssh-ed25519 AAAAkey2 other"]
    assert path.stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "root" / ".ssh").stat().st_mode & 0o777 == 0o700


def test_site_keys_dropped_from_the_config_leave_the_vm(client, tmp_path):
    os.makedirs(client.dir)
    ssh = tmp_path / "root" / ".ssh"
    ssh.mkdir(parents=True)
    (ssh / "authorized_keys").write_text("ssh-ed25519 AAAAvm-own key\n")
    client.install_ssh_keys(["ssh-ed25519 AAAAold site", "ssh-ed25519 AAAAnew site"])
    client.install_ssh_keys(["ssh-ed25519 AAAAnew site"])
    assert (ssh / "authorized_keys").read_text().splitlines() == ["ssh-ed25519 AAAAvm-own key",
                                                                 "ssh-ed25519 AAAAnew site"]


def test_files_written_with_modes_and_paths_checked(client, tmp_path):
    target = tmp_path / "out" / "conf"
    client.apply_file({"path": str(target), "type": "file", "mode": 0o600,
                       "data": base64.b64encode(b"x=1\n").decode()})
    assert target.read_bytes() == b"x=1\n" and target.stat().st_mode & 0o777 == 0o600
    with pytest.raises(dynfarm.Fatal):
        client.apply_file({"path": "etc/relative", "type": "file", "mode": 0o644, "data": ""})


def test_an_existing_directory_keeps_its_mode(client, tmp_path):
    existing = tmp_path / "etc"
    existing.mkdir(mode=0o755)
    client.apply_file({"path": str(existing), "type": "dir", "mode": 0o700})
    assert existing.stat().st_mode & 0o777 == 0o755
    client.apply_file({"path": str(tmp_path / "etc" / "new"), "type": "dir", "mode": 0o750})
    assert (tmp_path / "etc" / "new").stat().st_mode & 0o777 == 0o750


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


def test_commands_know_their_host_and_never_see_the_token(client, tmp_path, monkeypatch):
    os.makedirs(client.dir)
    monkeypatch.setenv("DYNFARM_TOKEN", "abc.secret")
    answer = {"name": "aruba-0002", "provider": "aruba", "address": "10.8.0.3", "netmask": "255.255.255.0",
              "vpn_server": "10.8.0.1", "links": {"master": "10.10.0.5", "ce": "10.10.0.7"}}
    seen = tmp_path / "env"
    assert client.apply_customization({"ssh_keys": [], "files": [], "commands": [
        {"name": "env.sh", "script": f"env > {seen}\n"}]}, dynfarm.command_environment(answer)) == 0
    env = dict(line.split("=", 1) for line in seen.read_text().splitlines() if "=" in line)
    assert {k: v for k, v in env.items() if k.startswith("DYNFARM_") and k not in ("DYNFARM_CORES",
                                                                                 "DYNFARM_MEMORY_MB")} == {
        "DYNFARM_NAME": "aruba-0002", "DYNFARM_PROVIDER": "aruba", "DYNFARM_ADDRESS": "10.8.0.3",
        "DYNFARM_NETMASK": "255.255.255.0", "DYNFARM_SERVER": "10.8.0.1",
        "DYNFARM_LINKS": "master=10.10.0.5 ce=10.10.0.7"}
    assert int(env["DYNFARM_CORES"]) == os.cpu_count() and int(env["DYNFARM_MEMORY_MB"]) > 0
    assert "PATH" in env                                      # the VM's own environment stays


# --- the certificate presented ----------------------------------------------------

def test_an_expired_client_certificate_is_not_presented(app, make_csr, client, monkeypatch):
    token, _ = dynfarm.new_token(app.store, "aruba", 1, 60)
    key, csr = make_csr()
    os.makedirs(client.dir, exist_ok=True)
    with open(client.cert_path, "w") as f:
        f.write(call(app, "/v1/enroll", enroll_body(token, csr))[1]["certificate"])
    assert client.certificate_usable()
    monkeypatch.setattr(dynfarm.time, "time", lambda: 4102444800.0)      # 2100
    assert not client.certificate_usable()


# --- proving an enrolled key --------------------------------------------------------

class Answer(io.BytesIO):
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def talking_to(app, client, monkeypatch):
    """Route the client's HTTPS calls to the app, in-process."""
    def urlopen(request, timeout, context):
        path = urllib.parse.urlparse(request.full_url).path
        status, answer, _ = call(app, path, request.data or b"", method=request.get_method())
        body = json.dumps(answer).encode()
        if status >= 400:
            raise dynfarm.urllib.error.HTTPError(request.full_url, status, "refused", {}, io.BytesIO(body))
        return Answer(body)
    monkeypatch.setattr(dynfarm.urllib.request, "urlopen", urlopen)
    monkeypatch.setattr(client, "tls_context", lambda: None)


def test_a_lost_first_answer_is_recovered_by_proving_the_key(app, client, monkeypatch):
    """The server enrolled the machine but its answer never arrived; the token
    is spent. The retry is challenged, signs the nonce, and gets its host back."""
    token, _ = dynfarm.new_token(app.store, "aruba", 1, 60)
    client.token = token
    os.makedirs(client.dir, exist_ok=True)
    client.ensure_key()
    lost = call(app, "/v1/enroll", enroll_body(token, dynfarm.make_csr(client.key_path, "dynfarm-client")))[1]
    talking_to(app, client, monkeypatch)
    answer = client.enroll()
    assert (answer["name"], answer["address"]) == (lost["name"], lost["address"])
    assert app.store.host(lost["name"])["serial"] == cert_serial(answer["certificate"])


@pytest.mark.parametrize("code", [429, 503])
def test_told_to_come_back_is_a_busy_server_not_a_refusal(client, monkeypatch, code):
    def busy(request, timeout, context):
        raise dynfarm.urllib.error.HTTPError(request.full_url, code, "busy", {},
                                             io.BytesIO(b'{"error": "try again later"}'))
    monkeypatch.setattr(dynfarm.urllib.request, "urlopen", busy)
    monkeypatch.setattr(client, "tls_context", lambda: None)
    with pytest.raises(dynfarm.ServerUnreachable, match=f"{code} try again later"):
        client.call("POST", "/v1/enroll", {})
