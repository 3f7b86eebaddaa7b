"""System tests: three VMs behind one NAT join a site for real.

The world of tests/world.py (DESIGN.md's address plan), real openvpn, sshd,
iptables NAT, the real boot hook and bootstrap script. The tests run in file
order and share one world: each step builds on the previous ones, as a site's
life does (enroll, use, lose the server, reboot, update).
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import pytest

from farm import DYNFARM, VMS, read, running_farm, wait_for

pytestmark = pytest.mark.system


@pytest.fixture(scope="module")
def farm(tmp_path_factory):
    with running_farm(str(tmp_path_factory.mktemp("farm"))) as farm:
        yield farm


BOOTSTRAP = {}    # the script the VMs ran, for the tests that look for its token


def test_three_vms_behind_one_nat_enroll_with_distinct_static_addresses(farm):
    script = BOOTSTRAP["aruba"] = farm.dynfarm("bootstrap", "aruba", "--uses", "3").stdout
    done = farm.run_at_once(script, VMS)
    assert [code for code, _ in done] == [0, 0, 0], done
    hosts = farm.hosts()
    assert sorted(hosts) == ["aruba-0001", "aruba-0002", "aruba-0003"]
    assert sorted(h["address"] for h in hosts.values()) == ["10.8.0.2", "10.8.0.3", "10.8.0.4"]
    assert {h["state"] for h in hosts.values()} == {"connected"}
    assert {h["hostname"] for h in hosts.values()} == set(VMS)
    # the hook is installed for later boots
    for vm in VMS:
        assert "@reboot root /usr/local/sbin/dynfarm-client.sh" in read(farm.world.vm_path(vm, "/etc/cron.d/dynfarm"))


def test_private_key_never_left_the_vm(farm):
    for vm in VMS:
        key = read(farm.world.vm_path(vm, "/var/lib/dynfarm/client.key"))
        assert os.stat(farm.world.vm_path(vm, "/var/lib/dynfarm/client.key")).st_mode & 0o077 == 0
        body = key.split("-----")[2].strip()
        for root, _, files in os.walk(os.path.join(farm.dir, "state")):
            for name in files:
                if not os.path.isfile(os.path.join(root, name)):   # the management sockets
                    continue
                with open(os.path.join(root, name), "rb") as f:
                    assert body.encode() not in f.read(), os.path.join(root, name)


def test_no_file_a_job_could_read_holds_the_token(farm):
    token = next(line.split("=", 1)[1] for line in BOOTSTRAP["aruba"].splitlines()
                 if line.startswith("DYNFARM_TOKEN=")).strip("'\"")
    for vm in VMS:
        assert token not in read(farm.world.vm_path(vm, "/etc/dynfarm/client.conf"))
        for top in ("/etc/dynfarm", "/var/lib/dynfarm", "/var/log", "/usr/local/sbin", "/usr/local/bin", "/tmp", "/root"):
            for root, _, names in os.walk(farm.world.vm_path(vm, top)):
                for name in names:
                    path = os.path.join(root, name)
                    if os.path.isfile(path) and os.stat(path).st_mode & 0o044:   # readable by others than root
                        with open(path, "rb") as f:
                            assert token.encode() not in f.read(), path


# Answer one HTTP request on the metadata address, as a cloud's metadata service does.
METADATA_SERVICE = r"""
import socket
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("169.254.169.254", 80))
s.listen(8)
print("ready", flush=True)
while True:
    conn, _ = s.accept()
    conn.sendall(b"HTTP/1.0 200 OK\r\n\r\nuser-data with the token")
    conn.close()
"""

ASK_METADATA = r"""
import socket, sys
try:
    with socket.create_connection(("169.254.169.254", 80), timeout=3) as s:
        print(s.recv(100).decode().splitlines()[0])
except OSError as e:
    print(type(e).__name__)
"""


def test_only_root_reaches_the_metadata_service(farm):
    world = farm.world
    world.run("nat", ["ip", "addr", "add", "169.254.169.254/32", "dev", "br-lan"])
    service = subprocess.Popen(world.argv("nat", [sys.executable, "-c", METADATA_SERVICE]),
                               stdout=subprocess.PIPE, text=True)
    try:
        assert service.stdout.readline().strip() == "ready"
        for vm in VMS:
            as_root = world.run(vm, ["python3", "-c", ASK_METADATA]).stdout.strip()
            as_nobody = world.run(vm, ["setpriv", "--reuid", "nobody", "--regid", "nogroup", "--clear-groups",
                                       "python3", "-c", ASK_METADATA]).stdout.strip()
            assert (as_root, as_nobody) == ("HTTP/1.0 200 OK", "ConnectionRefusedError"), vm
    finally:
        service.kill()
        service.wait()
        world.run("nat", ["ip", "addr", "del", "169.254.169.254/32", "dev", "br-lan"])


def test_site_reaches_each_vm_by_ssh_checking_the_enrolled_host_key(farm):
    farm.write_known_hosts()
    for vm in VMS:
        name, address = farm.host_of(vm)
        assert farm.ssh(address, "hostname").stdout.strip() == vm
    # the check is real: with no recorded key, ssh refuses instead of trusting
    empty = os.path.join(farm.dir, "empty_known_hosts")
    open(empty, "w").close()
    refused = farm.ssh(farm.host_of("vm1")[1], "true", known_hosts=empty, check=False)
    assert refused.returncode == 255 and "Host key verification failed" in refused.stderr


def test_customization_applied(farm):
    for vm in VMS:
        cat = farm.world.run(vm, ["cat", "/etc/dynfarm-test/greeting", "/etc/dynfarm-test/setup-ran"]).stdout
        assert cat == f"hello from the site\n{vm}\n"
        assert farm.world.run(vm, ["stat", "-c", "%a", "/etc/dynfarm-test/greeting"]).stdout.strip() == "640"
        keys = read(farm.world.vm_path(vm, "/root/.ssh/authorized_keys")).splitlines()
        assert len(keys) == 1 and keys[0].endswith("admin@site")
    report = json.loads(farm.store().host("aruba-0001")["report"])
    assert report["ok"] is True and any(s["step"] == "command setup.sh" and s["rc"] == 0 for s in report["steps"])


def test_split_tunnel_keeps_the_vm_default_route(farm):
    routes = farm.world.run("vm1", ["ip", "route"]).stdout
    assert "default via 192.168.100.1" in routes
    assert "10.10.0.5 via 10.8.0.1" in routes


def test_tunnels_and_ssh_survive_the_server_stopping(farm):
    farm.stop_server()
    for vm in VMS:
        assert farm.ssh(farm.host_of(vm)[1], "hostname").stdout.strip() == vm


def test_reboot_with_server_down_keeps_name_and_address(farm):
    before = farm.host_of("vm1")
    farm.kill_vpn_client("vm1")
    assert farm.ssh(before[1], "true", check=False).returncode == 255     # really down
    done = farm.boot("vm1")
    assert "using the configuration stored" in read(farm.world.vm_path("vm1", "/var/log/dynfarm-client.log"))
    assert farm.host_of("vm1") == before
    assert farm.ssh(before[1], "hostname").stdout.strip() == "vm1", done.stderr


def test_boot_with_server_down_leaves_a_working_tunnel_alone(farm):
    pid = read(farm.world.vm_path("vm2", "/var/lib/dynfarm/openvpn.pid"))
    farm.boot("vm2")
    assert read(farm.world.vm_path("vm2", "/var/lib/dynfarm/openvpn.pid")) == pid
    assert "tunnel already up" in read(farm.world.vm_path("vm2", "/var/log/dynfarm-client.log"))


def test_reboot_with_server_up_re_enrolls_with_its_certificate(farm):
    farm.start_server()
    before = farm.host_of("vm2")
    enrolled_at = farm.hosts()[before[0]]["enrolled_at"]
    farm.kill_vpn_client("vm2")
    for _ in range(10):                          # ten boots: still one key line
        farm.boot("vm2")
    assert farm.host_of("vm2") == before
    assert farm.hosts()[before[0]]["enrolled_at"] > enrolled_at   # the token is used up: the cert did it
    assert len(read(farm.world.vm_path("vm2", "/root/.ssh/authorized_keys")).splitlines()) == 1
    assert farm.ssh(before[1], "hostname").stdout.strip() == "vm2"


def test_old_client_is_updated_and_proceeds(farm):
    installed = farm.world.vm_path("vm3", "/usr/local/sbin/dynfarm.py")
    with open(installed, "a") as f:
        f.write("# an older release\n")
    before = farm.host_of("vm3")
    farm.kill_vpn_client("vm3")
    farm.boot("vm3")
    with open(installed, "rb") as f, open(DYNFARM, "rb") as g:
        assert hashlib.sha256(f.read()).digest() == hashlib.sha256(g.read()).digest()
    assert "updated /usr/local/sbin/dynfarm.py" in read(farm.world.vm_path("vm3", "/var/log/dynfarm-client.log"))
    assert farm.host_of("vm3") == before
    assert farm.ssh(before[1], "hostname").stdout.strip() == "vm3"


def fresh_client(farm, vm, token, *extra):
    """A client run with a new state dir: a new machine as far as the site can tell."""
    shutil.rmtree(farm.world.vm_path(vm, "/var/lib/dynfarm/fresh"), ignore_errors=True)
    return farm.world.run(vm, ["python3", "/usr/local/sbin/dynfarm.py", "client",
                               "--server", "https://203.0.113.1:8443", "--ca", "/etc/dynfarm/site-ca.pem",
                               "--state-dir", "/var/lib/dynfarm/fresh", "--timeout", "10", *extra],
                          env={"DYNFARM_TOKEN": token}, check=False)


def table_dump(farm):
    return farm.dynfarm("remote_control", "list", "--json").stdout


def test_wrong_token_is_refused_and_nothing_stored(farm):
    before = table_dump(farm)
    done = fresh_client(farm, "vm1", "0123456789ab.not-the-secret")
    assert done.returncode == 1
    assert "401 invalid enrollment token" in done.stderr
    assert table_dump(farm) == before


def test_token_of_one_provider_cannot_enroll_into_another(farm):
    token = farm.dynfarm("token", "other").stdout.strip()
    before = table_dump(farm)
    done = fresh_client(farm, "vm1", token, "--provider", "aruba")
    assert done.returncode == 1 and "belongs to provider other, not aruba" in done.stderr
    assert table_dump(farm) == before


def test_vms_come_back_by_themselves_when_the_vpn_server_restarts(farm):
    """A restart of the provider's OpenVPN server (its unit restarted, say):
    every VM reconnects with its address, no action on the VMs."""
    before = {name: h["address"] for name, h in farm.hosts().items() if h["provider"] == "aruba"}
    farm.write_known_hosts()
    farm.vpn["aruba"].terminate()
    farm.vpn["aruba"].wait(10)
    started = time.monotonic()
    farm.start_vpn("aruba")
    wait_for(lambda: farm.dynfarm("remote_control", "-p", "aruba", "run", "--", "true", check=False).returncode == 0,
             "every VM reachable again", timeout=30)
    print(f"all {len(before)} VMs back {time.monotonic() - started:.1f} s after the restart")
    assert {name: h["address"] for name, h in farm.hosts().items() if h["provider"] == "aruba"} == before
    # list reads OpenVPN's status file, which the new server writes every 5 s
    wait_for(lambda: {h["state"] for name, h in farm.hosts().items() if name in before} == {"connected"},
             "list showing them connected", timeout=15)



def test_vms_reconnect_by_themselves_to_the_site_restored_from_a_backup(farm):
    """The site's machine is lost; a new one gets its backup restored into a
    fresh state directory: the VMs come back to it, unchanged, with no action on them."""
    def hosts():
        return {name: (h["provider"], h["address"], h["host_keys"]) for name, h in farm.hosts().items()}
    before = hosts()
    archive = os.path.join(farm.dir, "backup.tar.gz")
    farm.dynfarm("backup", archive)
    farm.stop_server()
    for vpn in farm.vpn.values():
        vpn.terminate()
        vpn.wait(10)
    state = os.path.join(farm.dir, "state")
    os.rename(state, state + ".lost")
    started = time.monotonic()
    farm.dynfarm("restore", archive)
    farm.start_vpns()
    farm.start_server()
    wait_for(lambda: farm.dynfarm("remote_control", "run", "--", "true", check=False).returncode == 0
             and {h["state"] for h in farm.hosts().values()} == {"connected"},
             "every VM back and reachable", timeout=60)
    print(f"all {len(before)} VMs back {time.monotonic() - started:.1f} s after the restore began")
    assert hosts() == before
    done = farm.dynfarm("remote_control", "run", "--", "hostname")
    assert sorted(line.split(": ", 1)[1] for line in done.stdout.splitlines()) == sorted(VMS)

def test_revoked_host_is_cut_off_and_refused(farm):
    name, address = farm.host_of("vm3")
    out = farm.dynfarm("revoke", name).stdout
    assert "its VPN session was ended" in out
    wait_for(lambda: farm.hosts()[name]["state"] == "revoked", "revoked state")
    assert farm.ssh(address, "true", check=False).returncode == 255
    done = farm.boot("vm3", check=False)
    assert done.returncode != 0
    assert "revoked" in read(farm.world.vm_path("vm3", "/var/log/dynfarm-client.log"))
