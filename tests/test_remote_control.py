"""remote_control for real: run, put, get on three VMs over the VPN.

Real ssh and scp to the VMs' own sshd, through the tunnels, with the host
keys the VMs sent at enrollment; then the failures an admin meets: an sshd
that is down, a host key that changed, a command that hangs.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import pytest

from farm import DYNFARM, VMS, running_farm, wait_for

pytestmark = pytest.mark.system


@pytest.fixture(scope="module")
def farm(tmp_path_factory):
    with running_farm(str(tmp_path_factory.mktemp("rc"))) as farm:
        script = farm.dynfarm("bootstrap", "aruba", "--uses", "3").stdout
        for vm in VMS:
            farm.world.run(vm, ["sh", "-s"], input=script, timeout=90)
        yield farm


def rc_argv(farm, *args):
    """remote_control through its symlink name."""
    link = os.path.join(farm.dir, "remote_control")
    if not os.path.exists(link):
        os.symlink(DYNFARM, link)
    return [sys.executable, link, "-c", farm.conf, *args]


def rc(farm, *args, check=False, timeout=60):
    return farm.world.run("site", rc_argv(farm, *args), check=check, timeout=timeout)


def test_run_prefixes_each_line_with_its_host(farm):
    done = rc(farm, "-p", "aruba", "run", "--", "hostname")
    assert done.returncode == 0, done.stderr
    assert sorted(done.stdout.splitlines()) == ["aruba-0001: vm1", "aruba-0002: vm2", "aruba-0003: vm3"]
    assert done.stderr.strip().splitlines()[-1] == "3 ok, 0 failed, 0 unreachable, 0 timed out"


def test_gathered_output_under_a_folded_host_set(farm):
    done = rc(farm, "run", "-b", "--", "cat", "/etc/dynfarm-test/greeting")
    assert done.returncode == 0
    assert done.stdout == ("---------------\naruba-[0001-0003] (3)\n---------------\n"
                           "hello from the site\n")


def test_json_gives_exit_codes_and_streams(farm):
    done = rc(farm, "-w", "aruba-000[1-2]", "run", "--json", "--", "echo out; echo err >&2; exit $(hostname | tr -dc 0-9)")
    results = {r["host"]: r for r in json.loads(done.stdout)}
    assert sorted(results) == ["aruba-0001", "aruba-0002"]
    assert results["aruba-0001"]["exit_code"] == 1 and results["aruba-0001"]["status"] == "failed"
    assert results["aruba-0002"]["stdout"] == "out\n" and results["aruba-0002"]["stderr"] == "err\n"
    assert done.returncode == 1


def test_exclude(farm):
    done = rc(farm, "-x", "aruba-0002", "run", "--", "true")
    assert done.returncode == 0 and "2 ok" in done.stderr


def test_put_copies_trees_with_modes(farm, tmp_path):
    src = tmp_path / "payload"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "tool.sh").write_text("#!/bin/sh\necho tool\n")
    os.chmod(src / "sub" / "tool.sh", 0o750)
    done = rc(farm, "put", str(src), "/tmp/")
    assert done.returncode == 0, done.stderr
    for vm in VMS:
        out = farm.world.run(vm, ["stat", "-c", "%a", "/tmp/payload/sub/tool.sh"]).stdout.strip()
        assert out == "750"
        assert farm.world.run(vm, ["/tmp/payload/sub/tool.sh"]).stdout == "tool\n"


def test_get_fetches_into_a_directory_per_host(farm, tmp_path):
    done = rc(farm, "get", "/etc/hostname", str(tmp_path / "got"))
    assert done.returncode == 0, done.stderr
    for n, vm in enumerate(VMS, 1):
        assert (tmp_path / "got" / f"aruba-000{n}" / "hostname").read_text().strip() == vm


def test_stopped_sshd_is_unreachable_within_the_connect_timeout(farm):
    farm.world.stop_sshd("vm2")
    try:
        started = time.monotonic()
        done = rc(farm, "-t", "3", "run", "--", "hostname")
        assert time.monotonic() - started < 15
        assert done.returncode == 1
        assert sorted(done.stdout.splitlines()) == ["aruba-0001: vm1", "aruba-0003: vm3"]
        assert "aruba-0002: unreachable" in done.stderr
        assert "2 ok, 0 failed, 1 unreachable, 0 timed out" in done.stderr
    finally:
        farm.world.start_sshd("vm2")


def test_a_command_past_its_timeout_is_killed(farm):
    started = time.monotonic()
    done = rc(farm, "-w", "aruba-0001", "-u", "1", "run", "--", "sleep 30; echo never")
    assert time.monotonic() - started < 10
    assert done.returncode == 1 and "never" not in done.stdout
    assert "aruba-0001: timed out (killed)" in done.stderr
    assert "0 ok, 0 failed, 0 unreachable, 1 timed out" in done.stderr


def test_changed_host_key_is_refused_and_reported(farm):
    """vm3 gets a new host key: nothing is run there, and the admin is told."""
    marker = "/tmp/ran-despite-new-key"
    farm.world.stop_sshd("vm3")
    farm.world.run("vm3", ["sh", "-c", "rm -f /etc/ssh/ssh_host_*key* && ssh-keygen -q -A"])
    farm.world.start_sshd("vm3")
    done = rc(farm, "run", "--", f"touch {marker}")
    assert done.returncode == 1
    assert "aruba-0003: host key refused" in done.stderr and "1 host key refused" in done.stderr
    assert farm.world.run("vm3", ["test", "-e", marker], check=False).returncode == 1
    assert farm.world.run("vm1", ["test", "-e", marker], check=False).returncode == 0


def test_disconnected_hosts_are_left_out_unless_all(farm):
    farm.kill_vpn_client("vm1")
    # the client's exit tells the server (explicit-exit-notify)
    deadline = time.monotonic() + 20
    while farm.hosts()["aruba-0001"]["state"] == "connected" and time.monotonic() < deadline:
        time.sleep(0.5)
    assert farm.hosts()["aruba-0001"]["state"] == "disconnected"
    done = rc(farm, "-w", "aruba-000[1-2]", "run", "--", "true")
    assert done.returncode == 0 and "1 ok" in done.stderr
    started = time.monotonic()
    done = rc(farm, "-w", "aruba-000[1-2]", "-t", "2", "--all", "run", "--", "true")
    assert done.returncode == 1 and "1 unreachable" in done.stderr
    assert time.monotonic() - started < 15


def test_interrupt_ends_children_and_prints_a_partial_summary(farm):
    proc = subprocess.Popen(farm.world.argv("site", rc_argv(farm, "-w", "aruba-0002", "run", "--", "sleep 60")),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # Interrupted once its ssh runs: a fixed sleep could land in the start of
    # 'ip netns exec' on a loaded machine, before remote_control runs at all.
    ours = f"ssh .*{farm.dir}.*10.8.0.3 sleep 60"        # this run's, by its known_hosts file
    wait_for(lambda: subprocess.run(["pgrep", "-f", ours]).returncode == 0, "ssh started")
    proc.send_signal(2)
    out, err = proc.communicate(timeout=10)
    assert proc.returncode == 130, err
    assert "interrupted: 0 ok, 0 failed, 0 unreachable, 0 timed out, 1 interrupted" in err
    # our ssh to vm2 is gone (the command itself, without a terminal, may run on
    # on the VM to its end, as with plain ssh)
    assert subprocess.run(["pgrep", "-f", ours]).returncode == 1


def test_reuse_keeps_one_connection_per_host(farm):
    # control sockets under a short TMPDIR of the test's own, not the machine's /tmp
    tmp = tempfile.mkdtemp(prefix="dfcm")
    try:
        runs = [farm.world.run("site", rc_argv(farm, "-w", "aruba-0002", "--reuse", "run", "--", "echo $PPID"),
                               check=False, env={"TMPDIR": tmp}) for _ in range(2)]
        assert [r.returncode for r in runs] == [0, 0], runs[0].stderr
        assert os.listdir(os.path.join(tmp, f"dynfarm-ssh-{os.getuid()}"))
        # the same sshd session process served both: the connection was reused
        assert runs[0].stdout == runs[1].stdout
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def test_progress_line_on_a_terminal_only(farm):
    """Runs over a second show 'N/M done' on a terminal's stderr, never in a pipe."""
    import pty
    master, slave = pty.openpty()
    proc = subprocess.Popen(farm.world.argv("site", rc_argv(farm, "-w", "aruba-0002", "run", "--", "sleep 1.6")),
                            stdout=subprocess.PIPE, stderr=slave)
    os.close(slave)
    proc.wait(timeout=30)
    seen = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:
            break
        if not chunk:
            break
        seen += chunk
    os.close(master)
    assert b"0/1 done, 0 failed" in seen
    piped = rc(farm, "-w", "aruba-0002", "run", "--", "sleep 1.6")
    assert "done," not in piped.stderr and piped.returncode == 0
