"""The admin's commands through main(): bootstrap, remote_control, usage errors.

The bootstrap script (valid POSIX sh, a fresh token, the same script inside
cloud-init), remote_control's list and known_hosts and its symlinked name,
and command lines that must be refused as usage errors (exit 2).
"""

import base64
import gzip
import json
import os
import shutil
import subprocess

import pytest

import dynfarm
from helpers import SITE_CONF, VERSION, call, enroll_body, known_hosts, write_site


# --- bootstrap --------------------------------------------------------------------

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


def test_bootstrap_cloud_init_carries_the_script_and_fits_every_provider(site, capsys, tmp_path):
    config, _, _ = site
    assert dynfarm.main(["-c", config.path, "bootstrap", "aruba", "--cloud-init"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("#cloud-config\n")
    assert len(text.encode()) < 14 * 1024            # EC2 takes 16 KB of user-data
    encoded = next(line.split(":", 1)[1].strip() for line in text.splitlines() if "content:" in line)
    assert "encoding: gz+b64" in text
    script = gzip.decompress(base64.b64decode(encoded)).decode()
    assert script.startswith("#!/bin/sh") and script.rstrip().endswith('main "$@"')
    (tmp_path / "user-data").write_text(text)
    # the Debian package's own check (make deps installs cloud-init)
    checked = subprocess.run(["cloud-init", "schema", "--config-file", str(tmp_path / "user-data")],
                             capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr


# --- remote_control ---------------------------------------------------------------

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
    assert known_hosts(app.store).splitlines()[0] == "10.8.0.2 ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGl1"


def test_remote_control_symlink_dispatch(site, tmp_path):
    config, _, _ = site
    link = tmp_path / "remote_control"
    link.symlink_to(os.path.join(os.path.dirname(dynfarm.__file__), "dynfarm.py"))
    done = subprocess.run([str(link), "-c", config.path, "list"], capture_output=True, text=True)
    assert done.returncode == 0 and "no hosts enrolled" in done.stderr


# --- usage errors -----------------------------------------------------------------

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


def test_verbose_echoes_every_external_command(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(dynfarm, "ECHO_COMMANDS", False)       # restored after: main() sets it
    path = write_site(str(tmp_path))
    assert dynfarm.main(["-c", path, "-v", "init"]) == 0
    err = capsys.readouterr().err
    assert "[#] openssl genpkey -algorithm EC" in err and "[#] openvpn --genkey secret" in err
    assert dynfarm.main(["-c", path, "init"]) == 0
    assert "[#]" not in capsys.readouterr().err


# --- tokens: listed without their secret, revoked at once ------------------------

def test_token_list_shows_every_token_but_never_its_secret(app, capsys):
    config = app.config
    assert dynfarm.main(["-c", config.path, "token", "aruba", "--uses", "3", "--ttl", "7d"]) == 0
    token = capsys.readouterr().out.strip()
    token_id, secret = token.split(".")
    assert dynfarm.main(["-c", config.path, "token", "list"]) == 0
    table = capsys.readouterr().out
    assert token_id in table and "aruba" in table and " 3 " in table and "valid" in table
    assert dynfarm.main(["-c", config.path, "token", "list", "--json"]) == 0
    text = capsys.readouterr().out
    (row,) = json.loads(text)
    assert (row["id"], row["provider"], row["uses_left"], row["state"]) == (token_id, "aruba", 3, "valid")
    assert secret not in table + text and dynfarm.hash_secret(secret) not in table + text


def test_a_revoked_token_enrolls_nothing_more(app, make_csr, capsys):
    token, _ = dynfarm.new_token(app.store, "aruba", 5, 3600)
    assert call(app, "/v1/enroll", enroll_body(token, make_csr()[1]))[0] == 200
    assert dynfarm.main(["-c", app.config.path, "token", "revoke", token.split(".")[0]]) == 0
    assert "revoked" in capsys.readouterr().out
    status, answer, _ = call(app, "/v1/enroll", enroll_body(token, make_csr()[1]))
    assert status == 401 and "invalid enrollment token" in answer["error"]
    assert len(app.store.hosts()) == 1                       # the host it enrolled stays


@pytest.mark.parametrize("argv, message", [
    (["token", "revoke"], "which token?"),
    (["token", "revoke", "000000000000"], "no token '000000000000'"),
    (["token", "aruba", "extra"], "goes with 'token list'"),
    (["token", "aruba", "--json"], "goes with 'token list'"),
])
def test_token_usage_errors(site, capsys, argv, message):
    assert dynfarm.main(["-c", site[0].path] + argv) == 2
    assert message in capsys.readouterr().err


def test_a_provider_cannot_be_named_like_a_token_action(tmp_path):
    path = write_site(str(tmp_path), SITE_CONF.replace("[provider:other]", "[provider:list]"))
    with pytest.raises(dynfarm.UsageError, match="'list' is reserved"):
        dynfarm.load_config(path)


# --- the site as systemd services -------------------------------------------------

def test_units_run_the_site_in_order_and_pass_systemd_analyze(site, tmp_path, capsys):
    config = site[0]
    assert dynfarm.main(["-c", config.path, "units", "--install", "--dir", str(tmp_path)]) == 0
    said = capsys.readouterr().out
    assert "systemctl enable --now dynfarm-links.service dynfarm-vpn@aruba.service dynfarm-vpn@other.service " \
           "dynfarm-server.service" in said
    links, vpn, server = (open(tmp_path / name).read() for name in
                          ("dynfarm-links.service", "dynfarm-vpn@.service", "dynfarm-server.service"))
    assert "Type=oneshot" in links and "links up" in links and "ExecStop=" in links and "links down" in links
    assert "After=network-online.target dynfarm-links.service" in vpn and " vpn %i" in vpn
    for unit in (vpn, server):
        assert "Restart=on-failure" in unit and f"ReadWritePaths={config.state.root}" in unit
    assert f"-c {os.path.abspath(config.path)} server" in server and "LimitNOFILE=" in server
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed here: the units were checked by content only")
    done = subprocess.run([analyze, "verify", "--man=no", *sorted(str(p) for p in tmp_path.glob("*.service"))],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
