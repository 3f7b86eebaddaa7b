"""retire: the planned removal of hosts, with the batch system's hooks as shell commands.

The [batch] commands here write what they were asked into a log and answer
from files the test controls, so the order (drain, idle until no job,
remove, then revoke and release), the waiting, the timeout and every
refusal are checked without a batch system; tests/test_slurm.py runs the
same hooks against a real Slurm.
"""

import json
import os

import pytest

import dynfarm
from helpers import SITE_CONF, call, cert_serial, crl_serials, enroll_body, fresh_csr, write_site

# idle: exit 0 once the file idle-HOST exists, 1 until then.
BATCH = """
[batch]
drain = echo "drain $DYNFARM_HOST $DYNFARM_ADDRESS $DYNFARM_PROVIDER $DYNFARM_HOSTNAME" >> {d}/log
idle = echo "idle $DYNFARM_HOST" >> {d}/log; test -e {d}/idle-$DYNFARM_HOST
remove = echo "remove $DYNFARM_HOST" >> {d}/log
"""


@pytest.fixture
def batch_site(tmp_path):
    """(app, hook directory): a site whose [batch] hooks log to the hook directory."""
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    path = write_site(str(tmp_path), SITE_CONF + BATCH.format(d=hooks))
    assert dynfarm.main(["-c", path, "init"]) == 0
    return dynfarm.App(dynfarm.load_config(path)), hooks


@pytest.fixture(autouse=True)
def quick_polls(monkeypatch):
    monkeypatch.setattr(dynfarm, "RETIRE_POLL", 0.05)


def enroll(app, make_csr, count=1):
    """Enroll count new machines; [(key path, answer)]."""
    token, _ = dynfarm.new_token(app.store, "aruba", count, 60)
    enrolled = []
    for _ in range(count):
        key, csr = make_csr()
        status, answer, _ = call(app, "/v1/enroll", enroll_body(token, csr))
        assert status == 200, answer
        enrolled.append((key, answer))
    return enrolled


def retire(app, capsys, *args):
    capsys.readouterr()                 # what came before: the enrollments' log lines
    code = dynfarm.main(["-c", app.config.path, "retire", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_retire_drains_waits_removes_then_revokes_and_frees_the_name_and_address(batch_site, make_csr, capsys):
    app, hooks = batch_site
    (key, first), _ = enroll(app, make_csr, 2)
    pubkey = app.store.host("aruba-0001")["pubkey_sha256"]
    again = call(app, "/v1/enroll", enroll_body("", fresh_csr(app, key)))[1]    # a reboot: a second certificate
    (hooks / "idle-aruba-0001").touch()
    code, out, err = retire(app, capsys, "aruba-0001")
    assert code == 0, err
    assert (hooks / "log").read_text().splitlines() == [
        "drain aruba-0001 10.8.0.2 aruba vm1", "idle aruba-0001", "remove aruba-0001"]
    assert "retired aruba-0001" in out and "10.8.0.2 are free again" in out
    assert app.store.host("aruba-0001") is None
    assert {cert_serial(first["certificate"]), cert_serial(again["certificate"])} <= crl_serials(app.config)
    assert not os.path.exists(app.config.state.ccd_entry("aruba", "aruba-0001"))
    # The next new machine takes the name and the address ...
    (_, newcomer), = enroll(app, make_csr)
    assert (newcomer["name"], newcomer["address"]) == ("aruba-0001", "10.8.0.2")
    assert cert_serial(newcomer["certificate"]) not in crl_serials(app.config)
    # ... and the retired machine cannot come back, even with a valid token.
    token, _ = dynfarm.new_token(app.store, "aruba", 1, 60)
    status, answer, _ = call(app, "/v1/enroll", enroll_body(token, fresh_csr(app, key)))
    assert status == 403 and "retired" in answer["error"]
    # nor with its old certificate (a later boot), whose name now belongs to another
    status, answer, _ = call(app, "/v1/enroll", enroll_body("", fresh_csr(app, key)),
                             peer=("aruba-0001", pubkey))
    assert status == 403 and answer["error"] == "this machine was retired (as aruba-0001); it cannot enroll again"


def test_retire_waits_until_the_node_runs_no_job(batch_site, make_csr, capsys, monkeypatch):
    app, hooks = batch_site
    enroll(app, make_csr)
    sleeps, real_sleep = [], dynfarm.time.sleep

    def sleep(seconds):                 # the job ends after the third look
        if seconds != dynfarm.RETIRE_POLL:
            return real_sleep(seconds)  # subprocess's own waits for a hook to exit
        sleeps.append(seconds)
        if len(sleeps) == 3:
            (hooks / "idle-aruba-0001").touch()
    monkeypatch.setattr(dynfarm.time, "sleep", sleep)
    code, out, _ = retire(app, capsys, "aruba-0001")
    assert code == 0 and "aruba-0001: draining" in out
    assert (hooks / "log").read_text().count("idle aruba-0001") == 4
    assert (hooks / "log").read_text().splitlines()[-1] == "remove aruba-0001"


def test_a_node_still_busy_at_the_timeout_is_left_drained_and_enrolled(batch_site, make_csr, capsys):
    app, hooks = batch_site
    enroll(app, make_csr)
    code, _, err = retire(app, capsys, "aruba-0001", "--timeout", "1s")
    assert code == 1
    assert err.strip() == ("dynfarm: aruba-0001: still running jobs after 1s; left drained and enrolled "
                           "(retire it again later)")
    host = app.store.host("aruba-0001")
    assert host is not None and host["revoked_at"] is None
    assert "remove" not in (hooks / "log").read_text()


@pytest.mark.parametrize("hook, command, message", [
    ("drain", "echo no such node >&2; exit 1", "drain failed (no such node); nothing done"),
    ("idle", "echo controller down >&2; exit 2", "idle check failed (controller down); left drained and enrolled"),
    ("remove", "exit 3", "remove failed (exit 3); left drained and enrolled"),
])
def test_a_failing_hook_leaves_the_host_enrolled(tmp_path, make_csr, capsys, hook, command, message):
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "idle-aruba-0001").touch()
    conf = SITE_CONF + BATCH.format(d=hooks)
    conf = "\n".join(f"{hook} = {command}" if line.startswith(hook + " = ") else line for line in conf.splitlines())
    path = write_site(str(tmp_path), conf + "\n")
    assert dynfarm.main(["-c", path, "init"]) == 0
    app = dynfarm.App(dynfarm.load_config(path))
    enroll(app, make_csr)
    code, _, err = retire(app, capsys, "aruba-0001")
    assert code == 1 and err.strip() == f"dynfarm: aruba-0001: {message}"
    assert app.store.host("aruba-0001")["revoked_at"] is None
    assert crl_serials(app.config) == set()


def test_without_a_batch_section_retire_revokes_and_releases(app, make_csr, capsys):
    enroll(app, make_csr, 2)
    code, out, _ = retire(app, capsys, "aruba-0002", "aruba-0001")
    assert code == 0
    assert out.count("retired aruba-000") == 2
    assert app.store.hosts() == []


def test_retire_refuses_before_doing_anything(batch_site, make_csr, capsys):
    app, hooks = batch_site
    enroll(app, make_csr)
    (hooks / "idle-aruba-0001").touch()
    for args, message in ((["aruba-0001", "aruba-0099"], "no host named aruba-0099"),
                          ([], "name the hosts, or give --stale"),
                          (["aruba-0001", "--stale", "7d"], "name the hosts, or give --stale"),
                          (["aruba-0001", "--timeout", "soon"], "bad duration 'soon'")):
        code, _, err = retire(app, capsys, *args)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (hooks / "log").exists()
    assert retire(app, capsys, "aruba-0001")[0] == 0
    code, _, err = retire(app, capsys, "aruba-0001")
    assert code == 2 and "aruba-0001 was retired" in err


def test_a_dry_run_says_what_it_would_do_and_does_nothing(batch_site, make_csr, capsys):
    app, hooks = batch_site
    enroll(app, make_csr)
    code, out, _ = retire(app, capsys, "aruba-0001", "--dry-run", "--timeout", "30m")
    assert code == 0
    assert out.startswith("would retire aruba-0001 (10.8.0.2, last seen ")
    assert "drain, wait until idle (at most 30m), remove from the batch system, revoke" in out
    assert not (hooks / "log").exists() and app.store.host("aruba-0001")["revoked_at"] is None


def test_stale_hosts_are_the_disconnected_ones_not_seen_for_that_long(app, make_csr, capsys, monkeypatch):
    enroll(app, make_csr, 3)
    app.store.db.execute("UPDATE hosts SET last_seen = last_seen - 8 * 86400 WHERE name != 'aruba-0002'")
    monkeypatch.setattr(dynfarm, "connected_clients",
                        lambda config, provider: {"aruba-0003": "192.0.2.9:1194"} if provider == "aruba" else {})
    code, out, _ = retire(app, capsys, "--stale", "7d", "--dry-run")
    assert code == 0 and [line.split()[2] for line in out.splitlines()] == ["aruba-0001"]
    monkeypatch.setattr(dynfarm, "connected_clients", lambda config, provider: None)      # no VPN server runs
    code, out, err = retire(app, capsys, "--stale", "7d")
    assert code == 0 and out.strip() == "no host is stale for 7d"
    assert "the hosts of aruba are left alone: its VPN server does not run" in err


def test_list_shows_the_retired_only_when_asked_and_json_keeps_them(app, make_csr, capsys):
    enroll(app, make_csr, 2)
    assert retire(app, capsys, "aruba-0001")[0] == 0
    assert dynfarm.main(["-c", app.config.path, "remote_control", "list"]) == 0
    assert [line.split()[0] for line in capsys.readouterr().out.splitlines()[1:]] == ["aruba-0002"]
    assert dynfarm.main(["-c", app.config.path, "remote_control", "--all", "list"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[1:]]
    assert [(r[0], r[3]) for r in rows] == [("aruba-0002", "vpn-down"), ("aruba-0001", "retired")]
    assert dynfarm.main(["-c", app.config.path, "remote_control", "list", "--json"]) == 0
    retired = [r for r in json.loads(capsys.readouterr().out) if r["state"] == "retired"]
    assert [(r["name"], r["address"]) for r in retired] == [("aruba-0001", "10.8.0.2")] and retired[0]["retired_at"]


def test_a_new_host_takes_the_lowest_free_number(app, make_csr, capsys):
    enroll(app, make_csr, 3)
    for name in ("aruba-0002", "aruba-0001"):
        assert retire(app, capsys, name)[0] == 0
    names = [answer["name"] for _, answer in enroll(app, make_csr, 3)]
    assert names == ["aruba-0001", "aruba-0002", "aruba-0004"]
