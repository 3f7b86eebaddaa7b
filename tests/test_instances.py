"""A provider served by several OpenVPN servers (vpn_instances = N): each has
its own port, tun device, slice of the provider's subnet, client-config
entries, status and management socket. New hosts go to the servers in turn;
a host keeps its server and address; links, firewall, revoke and list know
every server. The unit tests here check the data; the last ones run two
servers for real in the namespace world.
"""

import os
import subprocess

import pytest

import dynfarm
from farm import SITE_CONF, running_farm, wait_for
from helpers import SITE_CONF as LOOPBACK_CONF, call, enroll_body, write_site
from world import MASTER_IP, STORAGE_IP, can_connect

TWO = "vpn_subnet = 10.8.0.0/24\nvpn_instances = 2\n"


def two_servers(conf):
    """aruba with two servers (ports 1194, 1195); other moves to 1196."""
    return conf.replace("vpn_subnet = 10.8.0.0/24\n", TWO).replace("vpn_port = 1195", "vpn_port = 1196")


@pytest.fixture
def two(tmp_path):
    """An initialised loopback site whose aruba has two servers: (config, app)."""
    path = write_site(str(tmp_path), two_servers(LOOPBACK_CONF))
    assert dynfarm.main(["-c", path, "init"]) == 0
    config = dynfarm.load_config(path)
    return config, dynfarm.App(config)


# --- configuration -----------------------------------------------------------------

def test_each_server_has_its_port_device_and_slice(two):
    config, _ = two
    vpns = config.providers["aruba"].vpns
    assert [(v.name, v.port, v.interface, str(v.subnet), str(v.server_address)) for v in vpns] == [
        ("aruba", 1194, "df-aruba", "10.8.0.0/25", "10.8.0.1"),
        ("aruba-1", 1195, "df-aruba-1", "10.8.0.128/25", "10.8.0.129")]
    assert config.vpn("aruba-1") == vpns[1]
    assert [v.name for v in config.providers["other"].vpns] == ["other"]       # the default: one


@pytest.mark.parametrize("value, error", [
    ("0", "vpn_instances = 0: expected a count of 1 or more, or auto"),
    ("two", "vpn_instances = two: expected a count of 1 or more, or auto"),
    ("65", "10.8.0.0/24 cut in 65 leaves no room for hosts"),
    ("70000", "ports 1194-71193 do not exist"),
])
def test_bad_instance_counts_are_refused(tmp_path, capsys, value, error):
    path = write_site(str(tmp_path), LOOPBACK_CONF.replace("vpn_subnet = 10.8.0.0/24\n",
                                                           f"vpn_subnet = 10.8.0.0/24\nvpn_instances = {value}\n"))
    assert dynfarm.main(["-c", path, "token", "list"]) == 2
    assert error in capsys.readouterr().err


def test_instances_that_clash_or_do_not_fit_are_refused(tmp_path, capsys):
    # aruba's second server would take port 1195, other's
    path = write_site(str(tmp_path), two_servers(LOOPBACK_CONF).replace("vpn_port = 1196", "vpn_port = 1195"))
    assert dynfarm.main(["-c", path, "token", "list"]) == 2
    assert "'other' and 'aruba' both use udp port 1195" in capsys.readouterr().err
    long_name = two_servers(LOOPBACK_CONF).replace("[provider:aruba]", "[provider:arubacloud1]")
    path = write_site(str(tmp_path), long_name)
    assert dynfarm.main(["-c", path, "token", "list"]) == 2
    assert "device df-arubacloud1-1 would be over 15 bytes" in capsys.readouterr().err


@pytest.mark.parametrize("change, error", [
    (("vpn_port = 1194", "vpn_port = 8442\nvpn_proto = tcp"),
     "its server aruba-1 would use tcp port 8443, the enrollment server's ([site] listen)"),
    (("vpn_port = 1194", "vpn_port = 4788"), "its server aruba-1 would use udp port 4789, the vxlan links'"),
])
def test_a_server_port_taken_on_the_same_host_is_refused(tmp_path, capsys, change, error):
    conf = two_servers(LOOPBACK_CONF).replace("listen = 127.0.0.1:0", "listen = 127.0.0.1:8443").replace(*change)
    path = write_site(str(tmp_path), conf)
    assert dynfarm.main(["-c", path, "token", "list"]) == 2
    assert error in capsys.readouterr().err

def test_auto_is_this_machines_cores(tmp_path):
    path = write_site(str(tmp_path), LOOPBACK_CONF.replace(
        "vpn_subnet = 10.8.0.0/24\n", "vpn_subnet = 10.8.0.0/22\nvpn_instances = auto\n").replace(
        "vpn_port = 1195", "vpn_port = 2000"))
    assert dynfarm.load_config(path).providers["aruba"].instances == os.cpu_count()


def test_bridged_mode_keeps_one_server_per_provider(tmp_path, capsys):
    conf = two_servers(LOOPBACK_CONF).replace("[site]\n", "[site]\nmode = bridged\nbridge = br-lan\n").replace(
        "vpn_instances = 2\n", "vpn_instances = 2\nbridge_pool = 10.10.0.100-10.10.0.120\n").replace(
        "vpn_subnet = 10.9.0.0/29\n", "vpn_subnet = 10.9.0.0/29\nbridge_pool = 10.10.0.130-10.10.0.140\n")
    path = write_site(str(tmp_path), conf)
    assert dynfarm.main(["-c", path, "token", "list"]) == 2
    assert "bridged mode runs one OpenVPN server per provider" in capsys.readouterr().err


# --- what each server is given -----------------------------------------------------

def test_init_writes_a_configuration_per_server_and_real_openvpn_takes_it(two):
    config, _ = two
    text = open(config.state.vpn_config("aruba-1")).read().splitlines()
    for line in ("port 1195", "dev df-aruba-1", "ifconfig 10.8.0.129 255.255.255.128",
                 'push "route-gateway 10.8.0.129"', f"client-config-dir {config.state.ccd_dir('aruba-1')}",
                 f"status {config.state.vpn_status('aruba-1')} 5",
                 f"management {config.state.management_socket('aruba-1')} unix",
                 'push "route 10.8.0.0 255.255.255.0"'):                    # its VMs reach the other slice's
        assert line in text, line
    assert "ifconfig 10.8.0.1 255.255.255.128" in open(config.state.vpn_config("aruba")).read()
    assert os.path.isdir(config.state.ccd_dir("aruba-1"))
    for name in ("aruba", "aruba-1"):
        done = subprocess.run(["openvpn", "--config", config.state.vpn_config(name), "--dev", "null",
                               "--ifconfig-noexec", "--route-noexec", "--verb", "0", "--show-ciphers"],
                              capture_output=True, text=True, timeout=20)
        assert done.returncode == 0, done.stderr


def test_new_hosts_go_to_the_servers_in_turn_and_keep_theirs(two, make_csr):
    config, app = two
    token, _ = dynfarm.new_token(app.store, "aruba", 4, 60)
    answers, keys = [], []
    for _ in range(4):
        key, csr = make_csr()
        status, answer, _ = call(app, "/v1/enroll", enroll_body(token, csr))
        assert status == 200, answer
        answers.append(answer)
        keys.append(key)
    assert [(a["name"], a["address"], a["netmask"], a["vpn_server"]) for a in answers] == [
        ("aruba-0001", "10.8.0.2", "255.255.255.128", "10.8.0.1"),
        ("aruba-0002", "10.8.0.130", "255.255.255.128", "10.8.0.129"),
        ("aruba-0003", "10.8.0.3", "255.255.255.128", "10.8.0.1"),
        ("aruba-0004", "10.8.0.131", "255.255.255.128", "10.8.0.129")]
    assert "remote 127.0.0.1 1195" in answers[1]["openvpn_config"]
    assert "remote 127.0.0.1 1194" in answers[2]["openvpn_config"]
    assert sorted(os.listdir(config.state.ccd_dir("aruba"))) == ["aruba-0001", "aruba-0003"]
    assert sorted(os.listdir(config.state.ccd_dir("aruba-1"))) == ["aruba-0002", "aruba-0004"]
    assert open(os.path.join(config.state.ccd_dir("aruba-1"), "aruba-0002")).read() == \
        "ifconfig-push 10.8.0.130 255.255.255.128\n"
    # enrolling again (a reboot), the host keeps its server and address
    nonce_csr = dynfarm.make_csr(keys[1], dynfarm.NONCE_PREFIX + app.nonces.new())
    status, again, _ = call(app, "/v1/enroll", enroll_body(token, nonce_csr))
    assert (status, again["address"], again["vpn_server"]) == (200, "10.8.0.130", "10.8.0.129")
    assert "remote 127.0.0.1 1195" in again["openvpn_config"]


def test_a_full_server_passes_its_turn(tmp_path, make_csr):
    """aruba's /27 in two: 13 hosts each; the 27th VM finds both full."""
    path = write_site(str(tmp_path), two_servers(LOOPBACK_CONF).replace("10.8.0.0/24", "10.8.0.0/27"))
    assert dynfarm.main(["-c", path, "init"]) == 0
    app = dynfarm.App(dynfarm.load_config(path))
    token, _ = dynfarm.new_token(app.store, "aruba", 30, 60)
    addresses = []
    for _ in range(27):
        status, answer, _ = call(app, "/v1/enroll", enroll_body(token, make_csr()[1]))
        addresses.append(answer.get("address") if status == 200 else (status, answer["error"]))
    assert addresses[:26] == [f"10.8.0.{i // 2 + 2 + (16 if i % 2 else 0)}" for i in range(26)]
    assert addresses[26] == (503, "provider aruba: no free address left in 10.8.0.2-10.8.0.14, "
                              "10.8.0.18-10.8.0.30")


def test_links_wall_and_route_every_server(two):
    config, _ = two
    do = [" ".join(a["do"]) for a in dynfarm.links_plan(config, {"master": dynfarm.Route("10.10.0.1", "br-site", 1500)})]
    for device in ("df-aruba", "df-aruba-1"):
        assert f"sysctl -qw -e net/ipv4/conf/{device}/forwarding=1" in do
        assert f"ip rule add iif {device} to 10.8.0.0/24 lookup main pref 4199" in do
        assert f"ip rule add iif {device} lookup 4200 pref 4200" in do
    for device in ("df-aruba", "df-aruba-1"):      # the provider's VMs reach each other across servers
        assert f"iptables -w -t filter -A DYNFARM-FWD -i {device} -o df-+ -d 10.8.0.0/24 -j ACCEPT" in do
    assert not any("-i df-aruba" in line and "10.9.0.0/29" in line for line in do)


def test_the_server_puts_an_entry_where_its_host_belongs(two, make_csr, capfd):
    config, app = two
    token, _ = dynfarm.new_token(app.store, "aruba", 2, 60)
    for _ in range(2):
        call(app, "/v1/enroll", enroll_body(token, make_csr()[1]))
    misplaced = os.path.join(config.state.ccd_dir("aruba"), "aruba-0002")
    os.rename(os.path.join(config.state.ccd_dir("aruba-1"), "aruba-0002"), misplaced)
    capfd.readouterr()
    dynfarm.App(config)
    log = capfd.readouterr().err
    assert "removed the client-config entries of hosts not enrolled: aruba-0002" in log
    assert "wrote missing or partial client-config entries: aruba-0002" in log
    assert os.listdir(config.state.ccd_dir("aruba-1")) == ["aruba-0002"]


def test_a_server_added_after_init_gets_its_entries(tmp_path, make_csr):
    """vpn_instances raised on a site with no hosts yet, the server restarted
    without init: the new server's client-config directory is made at start."""
    path = write_site(str(tmp_path), LOOPBACK_CONF.replace("vpn_port = 1195", "vpn_port = 1196"))
    assert dynfarm.main(["-c", path, "init"]) == 0
    with open(path, "w") as f:
        f.write(two_servers(LOOPBACK_CONF))
    config = dynfarm.load_config(path)
    app = dynfarm.App(config)
    token, _ = dynfarm.new_token(app.store, "aruba", 2, 60)
    for _ in range(2):
        status, answer, _ = call(app, "/v1/enroll", enroll_body(token, make_csr()[1]))
        assert status == 200, answer
    assert os.listdir(config.state.ccd_dir("aruba-1")) == ["aruba-0002"]


def test_the_server_refuses_hosts_a_new_count_leaves_astray(tmp_path, make_csr, capsys):
    """Hosts enrolled with one server; then vpn_instances = 2 cuts 10.8.0.0/24 in
    two, and 10.8.0.129 becomes the second server's own address."""
    path = write_site(str(tmp_path), LOOPBACK_CONF.replace("vpn_port = 1195", "vpn_port = 1196"))
    assert dynfarm.main(["-c", path, "init"]) == 0
    app = dynfarm.App(dynfarm.load_config(path))
    token, _ = dynfarm.new_token(app.store, "aruba", 1, 60)
    assert call(app, "/v1/enroll", enroll_body(token, make_csr()[1]))[0] == 200
    app.store.db.execute("UPDATE hosts SET address = '10.8.0.129'")
    with open(path, "w") as f:
        f.write(two_servers(LOOPBACK_CONF))
    with pytest.raises(dynfarm.UsageError, match=r"1 enrolled host\(s\) outside the address ranges of their "
                                                 r"provider's servers: aruba-0001 \(10.8.0.129\); vpn_instances "
                                                 "changed after they enrolled: set it back, or retire them"):
        dynfarm.App(dynfarm.load_config(path))


def test_units_start_every_server(two, tmp_path):
    config, _ = two
    lines = dynfarm.install_units(config, str(tmp_path))
    assert "dynfarm-vpn@aruba.service dynfarm-vpn@aruba-1.service dynfarm-vpn@other.service" in lines[-1]


# --- in the namespace world: two servers for real ----------------------------------

@pytest.fixture(scope="module")
def farm(tmp_path_factory):
    with running_farm(str(tmp_path_factory.mktemp("instances")), conf=two_servers(SITE_CONF)) as farm:
        yield farm


@pytest.mark.system
def test_vms_land_on_both_servers_and_reach_the_master_not_the_storage(farm):
    done = farm.run_at_once(farm.dynfarm("bootstrap", "aruba", "--uses", "3").stdout, ("vm1", "vm2", "vm3"))
    assert [code for code, _ in done] == [0, 0, 0], done
    hosts = farm.hosts()
    assert sorted(h["address"] for h in hosts.values()) == ["10.8.0.130", "10.8.0.2", "10.8.0.3"]
    wait_for(lambda: {h["state"] for h in farm.hosts().values()} == {"connected"}, "all connected", timeout=15)
    farm.dynfarm("links", "up")
    farm.world.run("master", ["sh", "-s"], input=farm.dynfarm("links", "peer", "master").stdout)
    for vm in ("vm1", "vm2", "vm3"):
        assert can_connect(farm.world, vm, MASTER_IP, 22) or farm.world.run(
            vm, ["ping", "-c1", "-W2", MASTER_IP], check=False).returncode == 0, vm
        assert farm.world.run(vm, ["ping", "-c1", "-W1", STORAGE_IP], check=False).returncode != 0, vm
    status = farm.dynfarm("links", "status", check=False).stdout
    assert "vpn aruba-1: df-aruba-1, data channel in user space (tun)" in status


@pytest.mark.system
def test_vms_of_one_provider_reach_each_other_across_servers(farm):
    on_second = vm_at(farm, "10.8.0.130")
    on_first = vm_at(farm, "10.8.0.2")
    assert farm.world.run(on_first, ["ping", "-c1", "-W2", "10.8.0.130"], check=False).returncode == 0
    assert farm.world.run(on_second, ["ping", "-c1", "-W2", "10.8.0.2"], check=False).returncode == 0
    farm.write_known_hosts()
    done = farm.dynfarm("remote_control", "run", "--", "hostname", check=False)
    assert done.returncode == 0, done.stderr


@pytest.mark.system
def test_a_reboot_keeps_the_host_on_its_server(farm):
    vm = vm_at(farm, "10.8.0.130")
    before = farm.host_of(vm)
    farm.boot(vm)
    assert farm.host_of(vm) == before
    config = open(farm.world.vm_path(vm, "/var/lib/dynfarm/openvpn.conf")).read()
    assert "remote 203.0.113.1 1195" in config


@pytest.mark.system
def test_a_host_is_revoked_on_its_own_server(farm):
    vm = vm_at(farm, "10.8.0.130")
    name, address = farm.host_of(vm)
    out = farm.dynfarm("revoke", name).stdout
    assert "its VPN session was ended" in out
    wait_for(lambda: farm.hosts()[name]["state"] == "revoked", "revoked state")
    assert farm.ssh(address, "true", check=False).returncode == 255
    others = [h for n, h in farm.hosts().items() if n != name]
    assert {h["state"] for h in others} == {"connected"}


def vm_at(farm, address):
    """The VM that holds address."""
    return next(vm for vm in ("vm1", "vm2", "vm3") if farm.host_of(vm)[1] == address)
