"""Crash safety of enrollment: the server killed with SIGKILL in the middle of
a burst, then restarted. Nothing half done survives it: no host without a
certificate it could use, no address given twice, no client-config entry
without its host (or host without its entry), no temp file; and every
client finishes by itself, retrying as the real client does.

Also the reconciliation the server does at start, on a state directory
damaged by hand as a crash could leave it.
"""

import concurrent.futures
import os
import signal
import ssl
import time

import dynfarm
from helpers import SITE_TEMPLATE, Machine, call, enroll_body, free_port, start_server, write_site


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

def test_a_burst_survives_a_sigkill_of_the_server(tmp_path):
    port = free_port()
    conf = write_site(str(tmp_path), SITE_TEMPLATE.format(
        listen=f"127.0.0.1:{port}", public_address="127.0.0.1", request_timeout=5, networks=""))
    assert dynfarm.main(["-c", conf, "init"]) == 0
    config = dynfarm.load_config(conf)
    store = dynfarm.open_store(config)
    token, _ = dynfarm.new_token(store, "aruba", 200, 3600)
    machines = Machine.many(str(tmp_path), token, 200)
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
