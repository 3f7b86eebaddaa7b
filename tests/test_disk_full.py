"""A state directory on a full disk (a small tmpfs): enrollment answers 503
with one line, nothing is half written or spent, and the server serves
again as soon as there is room, without a restart."""

import os
import subprocess

import pytest

import dynfarm
from helpers import call, db_snapshot, enroll_body, write_site

pytestmark = pytest.mark.system


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m,mode=0700", "dfdisk", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(directory):
    """Take every free block: write until ENOSPC."""
    path = os.path.join(directory, "filler")
    with open(path, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    return path


def test_a_full_disk_answers_503_spends_nothing_and_recovers(small_disk, make_csr, capfd):
    path = write_site(str(small_disk))
    assert dynfarm.main(["-c", path, "init"]) == 0
    app = dynfarm.App(dynfarm.load_config(path))
    token, _ = dynfarm.new_token(app.store, "aruba", 2, 600)
    assert call(app, "/v1/enroll", enroll_body(token, make_csr()[1]))[0] == 200
    before, entries = db_snapshot(app.store), sorted(os.listdir(app.config.state.ccd_dir("aruba")))
    filler = fill(str(small_disk))
    capfd.readouterr()
    statuses = [call(app, "/v1/enroll", enroll_body(token, make_csr()[1])) for _ in range(3)]
    assert {s for s, _, _ in statuses} == {503}
    assert statuses[0][2] == {"Retry-After": "60"} and "disk is full or read-only" in statuses[0][1]["error"]
    assert "the state directory cannot be written" in capfd.readouterr().err
    assert db_snapshot(app.store) == before                            # no host, no token use
    assert sorted(os.listdir(app.config.state.ccd_dir("aruba"))) == entries
    assert not [n for _, _, names in os.walk(app.config.state.root) for n in names if n.startswith(".dynfarm-")]
    os.unlink(filler)                                                  # room again
    status, answer, _ = call(app, "/v1/enroll", enroll_body(token, make_csr()[1]))
    assert status == 200 and answer["name"] == "aruba-0002"
