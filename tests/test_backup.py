"""Backup and restore: a backup taken from a running site in the middle of a
burst of enrollments, restored into the fresh state directory of a second
site process, gives a site that knows every host the backup saw, as it was,
and hands the next new VM a new address. A restore that would not give the
VMs their site back (another address or port, a damaged archive, a state
directory in use) is refused and changes nothing.
"""

import concurrent.futures
import io
import json
import os
import ssl
import stat
import tarfile
import time

import pytest

import dynfarm
from helpers import (SITE_TEMPLATE, Machine, call, crl_serials, db_snapshot, enroll_body, free_port, fresh_csr, post, start_server,
                     write_site)

BURST = 80


def site_pair(tmp, port):
    """site.conf and a second one alike but for its state directory (the new machine)."""
    text = SITE_TEMPLATE.format(listen=f"127.0.0.1:{port}", public_address="127.0.0.1", request_timeout=5,
                                networks="")
    conf = write_site(tmp, text)
    second = os.path.join(tmp, "second.conf")
    with open(second, "w") as f:
        f.write(text.replace("state_dir = state\n", "state_dir = second-state\n"))
    return conf, second


def rows(store):
    return {h["name"]: dict(h) for h in store.hosts()}


def client_context(config, machine, tmp):
    """What a booting VM presents: its certificate, with the site CA pinned."""
    cert = os.path.join(tmp, os.path.basename(machine.key) + ".crt")
    with open(cert, "w") as f:
        f.write(machine.answer["certificate"])
    ctx = ssl.create_default_context(cafile=config.state.ca_cert)
    ctx.load_cert_chain(cert, machine.key)
    return ctx


def test_a_backup_taken_during_a_burst_restores_the_site_it_saw(tmp_path):
    tmp = str(tmp_path)
    port = free_port()
    conf, second = site_pair(tmp, port)
    assert dynfarm.main(["-c", conf, "init"]) == 0
    config = dynfarm.load_config(conf)
    token, _ = dynfarm.new_token(dynfarm.open_store(config), "aruba", BURST + 10, 3600)
    machines = Machine.many(tmp, token, BURST)
    ctx = ssl.create_default_context(cafile=config.state.ca_cert)
    archive = os.path.join(tmp, "site-backup.tar.gz")
    log = open(tmp_path / "server.log", "ab")
    server = start_server(conf, log)
    try:
        deadline = time.monotonic() + 120
        with concurrent.futures.ThreadPoolExecutor(32) as pool:
            results = [pool.submit(m.enroll, port, ctx, deadline) for m in machines]
            while sum(1 for m in machines if m.answer) < BURST // 4:
                assert time.monotonic() < deadline, "the burst stalled"
                time.sleep(0.005)
            before = {m.answer["name"] for m in machines if m.answer}
            assert dynfarm.main(["-c", conf, "backup", archive]) == 0
            after = sum(1 for m in machines if m.answer)
            assert [r.result() for r in results] == [200] * BURST
        late = Machine(tmp, "late", token)           # enrolled after the backup, surely
        assert late.enroll(port, ctx, deadline) == 200
    finally:
        server.terminate()
        server.wait(10)
    original = rows(dynfarm.open_store(config))
    assert len(original) == BURST + 1

    assert stat.S_IMODE(os.stat(archive).st_mode) == 0o600            # it holds the CA's key
    with tarfile.open(archive) as tar:
        manifest = json.loads(tar.extractfile("dynfarm-backup.json").read())
    print(f"backup taken with {len(before)}..{after} of {BURST} answered: it holds {manifest['hosts']} hosts")

    assert dynfarm.main(["-c", second, "restore", archive]) == 0
    restored_config = dynfarm.load_config(second)
    restored = rows(dynfarm.open_store(restored_config))
    # every host the backup saw, exactly as the first site has it; none it did not
    assert len(restored) == manifest["hosts"] and before <= set(restored)
    assert all(restored[name] == original[name] for name in restored)
    ccd = restored_config.state.ccd_dir("aruba")
    assert sorted(os.listdir(ccd)) == sorted(restored)
    for name, host in restored.items():
        assert open(os.path.join(ccd, name)).read() == f"ifconfig-push {host['address']} 255.255.255.0\n"
    for path in ("ca.crt", "ca.key", "server.crt", "server.key"):
        assert open(os.path.join(config.state.pki, path)).read() == \
            open(os.path.join(restored_config.state.pki, path)).read()
    assert open(config.state.tls_crypt_key("aruba")).read() == \
        open(restored_config.state.tls_crypt_key("aruba")).read()
    assert "site CA" not in "".join(dynfarm.init_site(restored_config))          # nothing missing
    for path in (restored_config.state.root, restored_config.state.ca_key, restored_config.state.database):
        assert stat.S_IMODE(os.stat(path).st_mode) in (0o700, 0o600)

    server = start_server(second, log)           # the second site process, on the new state
    try:
        deadline = time.monotonic() + 30
        # the next new VM (retrying while the server starts) gets an address no restored host has
        fresh = Machine(tmp, "new", dynfarm.new_token(dynfarm.open_store(restored_config), "aruba", 1, 60)[0])
        assert fresh.enroll(port, ctx, deadline) == 200
        assert fresh.answer["address"] not in {h["address"] for h in restored.values()}
        assert fresh.answer["name"] not in restored
        # a VM the backup saw boots: its certificate is its site's, its name and address unchanged
        known = next(m for m in machines if m.answer["name"] == sorted(restored)[0])
        status, answer = post(port, client_context(config, known, tmp),
                              {k: v for k, v in known.body.items() if k != "token"})
        assert status == 200 and (answer["name"], answer["address"]) == (known.answer["name"],
                                                                         known.answer["address"])
        # a VM enrolled after the backup is unknown to this site: refused, not given another's place
        status, answer = post(port, client_context(config, late, tmp),
                              {k: v for k, v in late.body.items() if k != "token"})
        assert status == 403 and "does not belong to an enrolled host" in answer["error"]
    finally:
        server.terminate()
        server.wait(10)
        log.close()
    kinds = [e["kind"] for e in dynfarm.open_events(config).events()]
    assert "backup" in kinds
    assert "restored" in [e["kind"] for e in dynfarm.open_events(restored_config).events()]


def enrolled_site(tmp_path, hosts):
    """An initialised site with hosts enrolled in-process: (conf, second conf,
    config, token, the machines' key paths)."""
    conf, second = site_pair(str(tmp_path), 8443)
    assert dynfarm.main(["-c", conf, "init"]) == 0
    config = dynfarm.load_config(conf)
    app = dynfarm.App(config)
    token, _ = dynfarm.new_token(app.store, "aruba", hosts, 60)
    keys = [str(tmp_path / f"k{i}.key") for i in range(hosts)]
    for key in keys:
        dynfarm.make_key(key)
        assert call(app, "/v1/enroll", enroll_body(token, dynfarm.make_csr(key, "c")))[0] == 200
    return conf, second, config, token, keys


@pytest.fixture
def backed_up(tmp_path):
    """A site with three hosts, its backup, and the second site.conf to restore it with."""
    conf, second, _, _, _ = enrolled_site(tmp_path, 3)
    archive = str(tmp_path / "backup.tar.gz")
    assert dynfarm.main(["-c", conf, "backup", archive]) == 0
    return conf, second, archive


def members(archive):
    with tarfile.open(archive) as tar:
        return {info.name: tar.extractfile(info).read() for info in tar}


def write_tar(path, files, kinds=None):
    """A .tar.gz of {name: bytes}; kinds may make a member a symlink."""
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            if (kinds or {}).get(name) == "symlink":
                info.type, info.linkname, info.size = tarfile.SYMTYPE, "/etc/shadow", 0
            tar.addfile(info, io.BytesIO(data))


def refused(second, archive, capsys, wanted):
    state = dynfarm.load_config(second).state.root
    existed = os.path.exists(state)
    assert dynfarm.main(["-c", second, "restore", archive]) == 2
    err = capsys.readouterr().err
    assert wanted in err, err
    assert len(err.strip().splitlines()) == 1
    assert os.path.exists(state) == existed             # nothing made
    return err


def test_restore_refuses_a_site_the_vms_would_not_find(backed_up, capsys):
    _, second, archive = backed_up
    text = open(second).read()
    with open(second, "w") as f:
        f.write(text.replace("public_address = 127.0.0.1", "public_address = 192.0.2.9")
                    .replace("vpn_port = 1195", "vpn_port = 1196"))
    err = refused(second, archive, capsys, "public_address 127.0.0.1 in the backup, 192.0.2.9 here")
    assert "provider other's vpn_port 1195 in the backup, 1196 here" in err
    assert "tar -xzOf" in err
    with open(second, "w") as f:
        f.write(text.split("[provider:other]")[0] + "[link:master]" + text.split("[link:master]")[1])
    refused(second, archive, capsys, "provider other is not configured here")


def test_restore_refuses_a_state_directory_that_holds_a_site(backed_up, capsys):
    conf, _, archive = backed_up
    store = dynfarm.open_store(dynfarm.load_config(conf))
    before = db_snapshot(store)
    refused(conf, archive, capsys, "already holds a site")
    assert db_snapshot(store) == before


def test_restore_refuses_a_damaged_or_foreign_archive(backed_up, capsys, tmp_path):
    _, second, archive = backed_up
    files = members(archive)
    bad = str(tmp_path / "bad.tar.gz")
    write_tar(bad, dict(files, **{"dynfarm.db": files["dynfarm.db"][:-1] + b"\x01"}))
    refused(second, bad, capsys, "damaged: dynfarm.db missing or not as it was taken")
    write_tar(bad, {k: v for k, v in files.items() if k != "pki/ca.key"})
    refused(second, bad, capsys, "damaged: pki/ca.key missing")
    for evil in ("../escape", "/etc/cron.d/x", "pki/../../escape", "run/links.json"):
        write_tar(bad, dict(files, **{evil: b"x"}))
        refused(second, bad, capsys, f"unexpected member {evil!r}")
    write_tar(bad, files, kinds={"pki/ca.crt": "symlink"})
    refused(second, bad, capsys, "unexpected member 'pki/ca.crt'")
    manifest = json.loads(files["dynfarm-backup.json"])
    write_tar(bad, dict(files, **{"dynfarm-backup.json": json.dumps(dict(manifest, format=9)).encode()}))
    refused(second, bad, capsys, "a backup of format 9; this dynfarm.py reads format 1")
    write_tar(bad, dict(files, **{"dynfarm-backup.json": b"[]"}))
    refused(second, bad, capsys, "is not a dynfarm backup's")
    with open(bad, "wb") as f:
        f.write(open(archive, "rb").read()[:200])                          # cut short
    refused(second, bad, capsys, "not a readable dynfarm backup")
    refused(second, str(tmp_path / "nowhere.tar.gz"), capsys, "not a readable dynfarm backup")


def test_backup_says_what_it_cannot_read_or_write(backed_up, capsys, tmp_path):
    conf, _, _ = backed_up
    assert dynfarm.main(["-c", conf, "backup", os.path.join(conf, "b.tar.gz")]) == 2     # under a file
    assert "backup: cannot write " in capsys.readouterr().err
    os.unlink(dynfarm.load_config(conf).state.tls_crypt_key("other"))
    assert dynfarm.main(["-c", conf, "backup", str(tmp_path / "b.tar.gz")]) == 2
    err = capsys.readouterr().err
    assert "openvpn/other.tlscrypt: No such file or directory; run 'dynfarm.py init' first" in err


def test_restore_refuses_a_manifest_of_another_shape(backed_up, capsys, tmp_path):
    _, second, archive = backed_up
    files = members(archive)
    manifest = json.loads(files["dynfarm-backup.json"])
    bad = str(tmp_path / "bad.tar.gz")
    for site in ({}, {"public_address": "x"}, dict(manifest["site"], providers={"aruba": 5})):
        write_tar(bad, dict(files, **{"dynfarm-backup.json": json.dumps(dict(manifest, site=site)).encode()}))
        refused(second, bad, capsys, "is not a dynfarm backup's")
    write_tar(bad, dict(files, **{"dynfarm-backup.json": json.dumps(dict(manifest, taken_at=1e300)).encode()}))
    refused(second, bad, capsys, "is not a dynfarm backup's")


def test_backup_refuses_a_server_certificate_read_with_another_key(tmp_path, capsys):
    conf, _ = site_pair(str(tmp_path), 8443)
    assert dynfarm.main(["-c", conf, "init"]) == 0
    config = dynfarm.load_config(conf)
    dynfarm.make_key(config.state.server_key)          # as if init were renewing it right now
    archive = str(tmp_path / "backup.tar.gz")
    assert dynfarm.main(["-c", conf, "backup", archive]) == 1
    assert "pki/server.crt and its key do not match (being renewed?); run the backup again" in capsys.readouterr().err
    assert not os.path.exists(archive)


def test_a_restored_site_still_refuses_the_revoked(tmp_path):
    conf, second, config, token, keys = enrolled_site(tmp_path, 2)
    assert dynfarm.main(["-c", conf, "revoke", "aruba-0001"]) == 0
    archive = str(tmp_path / "backup.tar.gz")
    assert dynfarm.main(["-c", conf, "backup", archive]) == 0
    assert dynfarm.main(["-c", second, "restore", archive]) == 0
    restored = dynfarm.load_config(second)
    assert crl_serials(restored) == crl_serials(config) and len(crl_serials(restored)) == 1
    assert os.listdir(restored.state.ccd_dir("aruba")) == ["aruba-0002"]
    app = dynfarm.App(restored)
    status, answer, _ = call(app, "/v1/enroll", enroll_body(token, fresh_csr(app, keys[0])))
    assert (status, answer["error"]) == (403, "host aruba-0001 is revoked")
