"""The audit log: what was enrolled (new, again, ssh host keys changed),
refused, revoked, retired, and which tokens were made or revoked; shown by
`dynfarm.py events`, never with a secret, and host key changes by list."""

import json

import dynfarm
from helpers import call, enroll_body, fresh_csr


def events(app, *args, capsys):
    app.events.flush()
    assert dynfarm.main(["-c", app.config.path, "events", *args]) == 0
    return capsys.readouterr().out


def test_enrollments_and_a_host_key_change_are_recorded_and_shown(app, make_csr, capsys):
    token, _ = dynfarm.new_token(app.store, "aruba", 1, 60)
    key, csr = make_csr()
    call(app, "/v1/enroll", enroll_body(token, csr))
    call(app, "/v1/enroll", enroll_body(token, fresh_csr(app, key)))                      # same keys
    new_keys = ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIAnother"]
    call(app, "/v1/enroll", enroll_body(token, fresh_csr(app, key), host_keys=new_keys))  # a new disk?
    kinds = [(e["kind"], e["host"], e["source"]) for e in app.events.events()]
    assert kinds == [("enrolled", "aruba-0001", "127.0.0.1"), ("re-enrolled", "aruba-0001", "127.0.0.1"),
                     ("re-enrolled", "aruba-0001", "127.0.0.1"), ("host-keys-changed", "aruba-0001", "127.0.0.1")]
    change = app.events.events()[-1]["detail"]
    assert change.startswith("ssh-ed25519 SHA256:") and " -> ssh-ed25519 SHA256:" in change
    table = events(app, "--host", "aruba-0001", capsys=capsys)
    assert "host-keys-changed" in table and "with a signed nonce" in table
    assert dynfarm.main(["-c", app.config.path, "remote_control", "list"]) == 0
    assert "ssh host keys changed at a re-enrollment: aruba-0001" in capsys.readouterr().out
    assert dynfarm.main(["-c", app.config.path, "remote_control", "list", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["host_keys_changed_at"]


def test_refusals_are_counted_by_source_and_reason_and_escaped_on_show(app, capsys):
    for _ in range(3):
        call(app, "/v1/enroll", b"not json", peer_ip="203.0.113.9")
    call(app, "/v1/\x1b[2Jx", b"", peer_ip="203.0.113.9", method="GET")
    app.events.flush()
    refused = [e for e in app.events.events() if e["kind"] == "refused"]
    assert [(e["source"], e["count"]) for e in refused] == [("203.0.113.9", 3), ("203.0.113.9", 1)]
    assert refused[0]["detail"] == "POST /v1/enroll: 400 body is not valid JSON"
    table = events(app, capsys=capsys)
    assert "3x POST /v1/enroll: 400" in table and "\x1b" not in table and "\\x1b[2J" in table


def test_refusals_reach_the_log_within_a_second_without_more_traffic(app):
    call(app, "/v1/nothing", b"", method="GET")
    app.events.timer.join(5)
    assert [e["kind"] for e in app.events.events()] == ["refused"]


def test_the_log_keeps_its_last_entries(app, monkeypatch):
    monkeypatch.setattr(dynfarm.EventLog, "MAX_EVENTS", 5)
    for i in range(8):
        call(app, f"/v1/nothing{i}", b"", method="GET")
        app.events.flush()
    assert len(app.events.events()) == 5


def test_revokes_retirements_and_tokens_are_recorded_without_secrets(app, make_csr, capsys):
    config = app.config
    assert dynfarm.main(["-c", config.path, "token", "aruba", "--uses", "2"]) == 0
    token = capsys.readouterr().out.strip()
    call(app, "/v1/enroll", enroll_body(token, make_csr()[1]))
    call(app, "/v1/enroll", enroll_body(token, make_csr()[1]))
    assert dynfarm.main(["-c", config.path, "revoke", "aruba-0001"]) == 0
    assert dynfarm.main(["-c", config.path, "retire", "aruba-0002"]) == 0
    assert dynfarm.main(["-c", config.path, "token", "revoke", token.split(".")[0]]) == 0
    capsys.readouterr()
    rows = json.loads(events(app, "--json", capsys=capsys))
    assert [(r["kind"], r["host"]) for r in rows] == [
        ("token-made", None), ("enrolled", "aruba-0001"), ("enrolled", "aruba-0002"), ("revoked", "aruba-0001"),
        ("retired", "aruba-0002"), ("token-revoked", None)]
    assert rows[0]["detail"].startswith(f"token {token.split('.')[0]}, 2 use(s)")
    assert token.split(".")[1] not in json.dumps(rows)
    assert events(app, "--since", "1h", "--host", "aruba-0002", capsys=capsys).count("\n") == 3   # head + 2


def test_no_events_says_so(app, capsys):
    assert dynfarm.main(["-c", app.config.path, "events", "--host", "nobody"]) == 0
    assert "no events of nobody" in capsys.readouterr().err


def test_a_flood_of_refusals_never_pushes_out_the_other_events(app, make_csr, monkeypatch):
    token, _ = dynfarm.new_token(app.store, "aruba", 1, 60)
    call(app, "/v1/enroll", enroll_body(token, make_csr()[1]))
    monkeypatch.setattr(dynfarm.EventLog, "MAX_EVENTS", 5)
    for i in range(12):
        call(app, f"/wipe-{i}", b"", method="GET")
        app.events.flush()
    kinds = [e["kind"] for e in app.events.events()]
    assert kinds == ["enrolled"] + ["refused"] * 5
