"""System tests of the simulated world (tests/world.py): real namespaces, NAT, sshd.

Root only. One world is shared by the checks that only look at it; the tests of
down() and sweep() build their own.
"""

import contextlib
import os
import subprocess
import sys
import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import world as worldlib  # noqa: E402
from world import (MASTER_IP, NAT_WAN_IP, SITE_LAN_IP, SITE_WAN_IP, STORAGE_IP,  # noqa: E402
                   VM_PYTHON, World, can_connect, list_netns, peer_address_seen, vm_ip)

pytestmark = pytest.mark.system


def namespaces_of(prefix):
    return [n for n in list_netns() if n.startswith(prefix + "-")]


def alive(pid):
    """Running, not a zombie (a zombie's parent, or pid 1, will reap it)."""
    return worldlib._alive(pid)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    w = World(str(tmp_path_factory.mktemp("world")), vms=3)
    w.up()
    yield w
    w.down()
    assert namespaces_of(w.prefix) == []


# --- the network ---------------------------------------------------------------

@pytest.mark.parametrize("node, addresses, default", [
    ("vm1", ["192.168.100.11/24"], "192.168.100.1"),
    ("vm3", ["192.168.100.13/24"], "192.168.100.1"),
    ("nat", ["192.168.100.1/24", "203.0.113.2/24"], "203.0.113.1"),
    ("site", ["10.10.0.1/24", "203.0.113.1/24"], None),
    ("master", ["10.10.0.5/24"], None),
    ("storage", ["10.10.0.6/24"], None),
])
def test_addresses_and_routes(world, node, addresses, default):
    out = world.run(node, ["ip", "-4", "-o", "addr", "show"]).stdout
    found = sorted(line.split()[3] for line in out.splitlines() if " lo " not in line)
    assert found == sorted(addresses)
    route = world.run(node, ["ip", "-4", "route", "show", "default"]).stdout.split()
    assert (route[2] if route else None) == default


def test_forwarding_only_on_nat(world):
    # site's forwarding is dynfarm's to switch on; nat is a router.
    forward = {node: world.run(node, ["cat", "/proc/sys/net/ipv4/ip_forward"]).stdout.strip()
               for node in ("nat", "site", "vm1", "master")}
    assert forward == {"nat": "1", "site": "0", "vm1": "0", "master": "0"}


def test_vm_reaches_site_from_the_nat_address(world):
    # Every VM is masqueraded: the site sees the NAT's address, never the VM's.
    for vm in ("vm1", "vm2"):
        assert peer_address_seen(world, "site", SITE_WAN_IP, vm) == NAT_WAN_IP


def test_vm_pings_site(world):
    world.run("vm1", ["ping", "-c", "1", "-W", "2", SITE_WAN_IP])


@contextlib.contextmanager
def listener(world, node, address, port):
    """A one-connection TCP listener in node; yields it once it listens."""
    argv = world.argv(node, [VM_PYTHON, "-c", worldlib.ACCEPT_ONCE, address, str(port), "10"])
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        yield proc
    finally:
        proc.kill()
        proc.wait()


def test_site_cannot_open_connections_to_vms(world):
    with listener(world, "vm1", "0.0.0.0", 4001) as vm1:
        # No route at all, as on the internet...
        assert not can_connect(world, "site", vm_ip("vm1"), 4001, wait=0.5)
        # ...and even with one, the NAT lets in only replies to what the VMs opened.
        world.run("site", ["ip", "route", "add", "192.168.100.0/24", "via", NAT_WAN_IP])
        try:
            assert not can_connect(world, "site", vm_ip("vm1"), 4001, wait=1)
        finally:
            world.run("site", ["ip", "route", "del", "192.168.100.0/24"])
        # The listener was there all along: its LAN neighbour gets through, un-NATed.
        assert can_connect(world, "vm2", vm_ip("vm1"), 4001)
        assert vm1.stdout.readline().strip() == vm_ip("vm2")


def test_master_and_storage_reach_site(world):
    assert peer_address_seen(world, "site", SITE_LAN_IP, "master") == MASTER_IP
    assert peer_address_seen(world, "site", SITE_LAN_IP, "storage") == STORAGE_IP


def test_vms_cannot_reach_site_lan(world):
    # Until dynfarm links them, master is out of the VMs' reach: site forwards
    # nothing, and master has no route back anyway.
    with listener(world, "master", MASTER_IP, 4002) as master:
        assert not can_connect(world, "vm1", MASTER_IP, 4002, wait=1)
        assert can_connect(world, "site", MASTER_IP, 4002)
        assert master.stdout.readline().strip() == SITE_LAN_IP


# --- VMs are machines ----------------------------------------------------------

def test_vms_are_distinct_machines(world):
    def identity(vm):
        with open(world.vm_path(vm, "/etc/ssh/ssh_host_ed25519_key.pub")) as f:
            key = f.read().split()[1]
        return (world.run(vm, ["hostname"]).stdout.strip(),
                world.run(vm, ["cat", "/etc/machine-id"]).stdout.strip(), key)

    vm1, vm2 = identity("vm1"), identity("vm2")
    assert vm1[0] == "vm1" and vm2[0] == "vm2"
    assert vm1[1] != vm2[1] and len(vm1[1]) == 32
    assert vm1[2] != vm2[2]
    with open("/etc/machine-id") as f:
        assert f.read().strip() not in (vm1[1], vm2[1])
    with open("/etc/ssh/ssh_host_ed25519_key.pub") as f:
        assert f.read().split()[1] not in (vm1[2], vm2[2])
    for kind in ("rsa", "ecdsa", "ed25519"):   # the whole set, as on a real machine
        assert os.path.exists(world.vm_path("vm1", f"/etc/ssh/ssh_host_{kind}_key"))


@pytest.mark.parametrize("path", [
    "/root/x", "/etc/dynfarm/x", "/var/lib/dynfarm/x", "/var/log/x",
    "/usr/local/bin/x", "/usr/local/sbin/x", "/etc/cron.d/x", "/tmp/x",
])
def test_private_dirs(world, path):
    path = f"{path}-{world.prefix}"   # a name the host surely does not have
    world.run("vm1", ["sh", "-c", 'echo from-vm1 > "$1"', "-", path])
    with open(world.vm_path("vm1", path)) as f:
        assert f.read() == "from-vm1\n"
    assert not os.path.exists(path)
    assert world.run("vm2", ["test", "-e", path], check=False).returncode == 1


def test_overlays_keep_host_etc_and_var_untouched(world):
    for path in (f"/etc/x-{world.prefix}", f"/var/tmp/x-{world.prefix}"):
        world.run("vm1", ["touch", path])
        assert not os.path.exists(path)
    hosts = world.run("vm1", ["cat", "/etc/hosts"]).stdout
    assert "vm1" in hosts
    with open("/etc/hosts") as f:
        assert "vm1" not in f.read()


@pytest.mark.parametrize("path", ["/usr/local/x", "/usr/x", "/opt/x"])
def test_rest_of_host_is_read_only(world, path):
    proc = world.run("vm1", ["touch", path], check=False)
    assert proc.returncode != 0 and "Read-only" in proc.stderr
    assert not os.path.exists(path)


def test_run_reports_failures(world):
    with pytest.raises(worldlib.CommandError, match=r"\[vm1\] sh -c 'echo oops >&2; exit 3' "
                                                    r"exited 3: oops"):
        world.run("vm1", ["sh", "-c", "echo oops >&2; exit 3"])


def test_vm_path_refuses_shared_paths(world):
    with pytest.raises(worldlib.WorldError, match="not one of vm1's private paths"):
        world.vm_path("vm1", "/usr/bin/env")


def test_sshd_takes_root_key_login(world, tmp_path):
    world.start_sshd("vm1")
    banner = world.run("vm1", [VM_PYTHON, "-c", worldlib.PROBE, "127.0.0.1", "22", "2"]).stdout
    assert banner.startswith("SSH-2.0-")
    world.run("vm1", ["sh", "-c", "mkdir -m 700 -p /root/.ssh && "
                      "ssh-keygen -q -t ed25519 -N '' -f /root/.ssh/id_ed25519 && "
                      "cat /root/.ssh/id_ed25519.pub >> /root/.ssh/authorized_keys"])
    ssh = ["ssh", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=accept-new",
           "root@127.0.0.1", "hostname; cat /etc/machine-id"]
    out = world.run("vm1", ssh, timeout=30).stdout.split()
    with open(world.vm_path("vm1", "/etc/machine-id")) as f:
        assert out == ["vm1", f.read().strip()]
    # The VM's known_hosts learned the VM's own key, not the host's.
    with open(world.vm_path("vm1", "/etc/ssh/ssh_host_ed25519_key.pub")) as f:
        key = f.read().split()[1]
    with open(world.vm_path("vm1", "/root/.ssh/known_hosts")) as f:
        assert key in f.read()
    world.stop_sshd("vm1")
    assert not can_connect(world, "vm1", "127.0.0.1", 22, wait=0.3)


# --- down() and sweep() --------------------------------------------------------

def test_down_kills_everything_and_deletes_namespaces(tmp_path):
    w = World(str(tmp_path), vms=2)
    w.up()
    sshd = w.start_sshd("vm1")
    daemon = w.spawn("site", ["sleep", "1000"], str(tmp_path / "daemon.log"))
    # A daemon that forks away from its parent: only the namespace sweep finds it.
    w.run("vm2", ["sh", "-c", "sleep 1001 >/dev/null 2>&1 &"])
    holders = [p.pid for p in w._holders.values()]
    in_namespaces = [pid for node in w.nodes for pid in worldlib.netns_pids(w.ns(node))]
    assert {sshd.pid, daemon.pid, *holders} <= set(in_namespaces)
    assert len(in_namespaces) >= 2 + len(holders)

    started = time.monotonic()
    w.down()
    assert time.monotonic() - started < 5
    assert namespaces_of(w.prefix) == []
    assert [pid for pid in in_namespaces + [sshd.pid, daemon.pid] if alive(pid)] == []
    w.down()   # idempotent


def test_failed_up_leaves_nothing(tmp_path, monkeypatch):
    w = World(str(tmp_path), vms=1)
    monkeypatch.setattr(w, "_configure_nat", lambda: w.run("nat", ["false"]))
    with pytest.raises(worldlib.CommandError, match=r"\[nat\] false exited 1"):
        w.up()
    assert namespaces_of(w.prefix) == []


def test_sweep_removes_dead_worlds_only(world, tmp_path):
    # A world whose owner was killed -9: no cleanup ran, its namespaces and holder live on.
    code = ("import sys, time, world; w = world.World(sys.argv[1], vms=1); w.up(); "
            "print(w.prefix, w._holders['vm1'].pid, flush=True); time.sleep(100)")
    owner = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE,
                             text=True, cwd=os.path.dirname(os.path.abspath(__file__)))
    prefix, holder = owner.stdout.readline().split()
    owner.kill()
    owner.wait()
    assert len(namespaces_of(prefix)) == 5 and alive(int(holder))
    # A look-alike that is not ours must survive.
    subprocess.run(["ip", "netns", "add", "dfzz999-keep"], check=True)
    try:
        swept = worldlib.sweep()
        assert sorted(swept) == sorted(f"{prefix}-{n}" for n in
                                       ("site", "nat", "master", "storage", "vm1"))
        assert namespaces_of(prefix) == []
        assert "dfzz999-keep" in list_netns()
        assert len(namespaces_of(world.prefix)) == 7   # a live world is left alone
        assert not alive(int(holder))
    finally:
        subprocess.run(["ip", "netns", "del", "dfzz999-keep"])
