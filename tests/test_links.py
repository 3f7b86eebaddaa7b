"""Site links for real: VMs reach the linked master at its own address, and nothing else.

The world of tests/world.py: master (10.10.0.5) is linked, storage (10.10.0.6)
is not. vm1 and vm2 join provider aruba, vm3 provider other. `links up` runs
on the VPN server (site), the peer script on master; real TCP both ways,
10 MB with a checksum, and `links down` must leave routing and firewall
exactly as they were.
"""

import re
import subprocess

import pytest

import dynfarm

from farm import SITE_CONF, running_farm, transfer
from world import VM_PYTHON

pytestmark = pytest.mark.system

MASTER, STORAGE = "10.10.0.5", "10.10.0.6"

def routing_state(farm):
    """What 'links up' may change and 'links down' must restore, counters stripped."""
    def run(argv):
        return farm.world.run("site", argv).stdout
    return {
        "rules": run(["ip", "rule"]),
        # IPv4 only: links touch nothing else, and IPv6 link-local routes
        # appear on their own some time after an interface comes up.
        "routes": run(["ip", "-4", "route", "show", "table", "all"]),
        "iptables": iptables_rules(run(["iptables-save"])),
        # every interface's forwarding switch, and what writing ip_forward would reset
        "forward": run(["sh", "-c", "grep -H . /proc/sys/net/ipv4/ip_forward /proc/sys/net/ipv4/conf/*/forwarding "
                                    "/proc/sys/net/ipv4/conf/*/accept_redirects | grep -v /dl-"]),
        "links": run(["ip", "-o", "link", "show"]).count("dl-"),
    }


def iptables_rules(saved):
    """iptables-save without comments and counters, and without tables that hold
    nothing but empty built-in chains with policy ACCEPT: iptables-nft makes
    such a table the first time a rule goes in, and it filters nothing."""
    tables = re.split(r"(?m)^(?=\*)", re.sub(r"(?m)^#.*\n", "", saved))
    kept = []
    for table in tables:
        lines = table.splitlines()
        empty = all(line.startswith("*") or line == "COMMIT" or re.fullmatch(r":\S+ ACCEPT \[\d+:\d+\]", line)
                    for line in lines)
        if table.strip() and not empty:
            kept.append(re.sub(r"\[\d+:\d+\]", "", table))
    return "".join(kept)


def enroll(farm, vm, provider):
    script = farm.dynfarm("bootstrap", provider).stdout
    farm.world.run(vm, ["sh", "-s"], input=script, timeout=90)
    return farm.host_of(vm)[1]


def gre_missing():
    """The kernel's own words if it cannot make a GRE device, else None."""
    probe = subprocess.run(["unshare", "--net", "ip", "link", "add", "gretest", "type", "gre",
                            "local", "192.0.2.1", "remote", "192.0.2.2"], capture_output=True, text=True)
    return probe.stderr.strip() if probe.returncode != 0 else None


@pytest.fixture(scope="module", params=["vxlan", "gre"])
def linked(request, tmp_path_factory):
    """A farm whose master link uses the given encapsulation, VMs enrolled, links up."""
    if request.param == "gre" and gre_missing():
        pytest.skip(f"this kernel cannot make GRE links: {gre_missing()}")
    conf = SITE_CONF.replace("encap = vxlan", f"encap = {request.param}")
    with running_farm(str(tmp_path_factory.mktemp(request.param)), conf=conf) as farm:
        addresses = {vm: enroll(farm, vm, provider) for vm, provider in
                     (("vm1", "aruba"), ("vm2", "aruba"), ("vm3", "other"))}
        before = routing_state(farm)
        up = farm.dynfarm("links", "up").stdout
        assert "links up (gre mode)" in up
        peer = farm.dynfarm("links", "peer", "master").stdout
        farm.world.run("master", ["sh", "-s"], input=peer)
        yield farm, addresses, before


def test_vm_reaches_the_master_at_its_own_address(linked):
    farm, addresses, _ = linked
    seen, sent, received = transfer(farm, "vm1", "master", MASTER)
    assert seen == addresses["vm1"]          # no NAT on the way: the master sees the VM
    assert sent == received


def test_vm_does_not_reach_the_storage_host(linked):
    farm, _, _ = linked
    assert transfer(farm, "storage", "storage", STORAGE) is not None   # it does listen
    assert transfer(farm, "vm1", "storage", STORAGE, port=5002) is None


def test_the_outside_does_not_reach_the_site_lan_through_the_vpn_server(linked):
    """Forwarding is on only where dynfarm's traffic comes in: the site's
    outside still routes nothing into its LAN, which still bridges."""
    farm, _, _ = linked
    assert farm.world.run("site", ["sysctl", "-n", "net.ipv4.ip_forward", "net.ipv4.conf.wan.forwarding"]
                          ).stdout.split() == ["0", "0"]
    farm.world.run("storage", ["ip", "route", "add", "203.0.113.0/24", "via", "10.10.0.1"])
    try:
        assert transfer(farm, "nat", "storage", STORAGE, port=5030) is None
        assert transfer(farm, "master", "storage", STORAGE, port=5031) is not None
    finally:
        farm.world.run("storage", ["ip", "route", "del", "203.0.113.0/24", "via", "10.10.0.1"])


def test_a_tun_device_made_after_links_up_forwards(linked):
    """OpenVPN makes its tun device anew at each start: one made while the links
    are up must forward like the one that was there."""
    farm, _, _ = linked
    site = farm.world
    assert site.run("site", ["sysctl", "-n", "net.ipv4.conf.df-aruba.forwarding"]).stdout.strip() == "1"
    site.run("site", ["ip", "tuntap", "add", "dev", "df-later", "mode", "tun"])
    try:
        assert site.run("site", ["sysctl", "-n", "net.ipv4.conf.df-later.forwarding"]).stdout.strip() == "1"
    finally:
        site.run("site", ["ip", "link", "del", "df-later"])


def test_a_forward_policy_of_drop_keeps_the_vms_traffic(linked):
    """The README's advice for a VPN server with an outside: dynfarm's chain
    accepts the VMs' traffic before the policy applies."""
    farm, addresses, _ = linked
    farm.world.run("site", ["iptables", "-w", "-P", "FORWARD", "DROP"])
    try:
        seen, sent, received = transfer(farm, "vm1", "master", MASTER, port=5032)
        assert seen == addresses["vm1"] and sent == received
        seen, sent, received = transfer(farm, "master", "vm1", addresses["vm1"], port=5033)
        assert seen == MASTER and sent == received
    finally:
        farm.world.run("site", ["iptables", "-w", "-P", "FORWARD", "ACCEPT"])


def test_both_ends_of_the_link_and_the_tunnel_have_the_mtus_that_fit(linked):
    """The LAN's 1500 less the encapsulation (vxlan 50, gre 24) on both ends, so
    the clamp and the kernel agree; the VM's tunnel device at OpenVPN's 1500."""
    farm = linked[0]
    encap = "gre" if "encap = gre" in open(farm.conf).read() else "vxlan"
    mtu = f" mtu {1500 - dynfarm.ENCAP_OVERHEAD[encap]} "
    assert mtu in farm.world.run("site", ["ip", "-o", "link", "show", "dl-master"]).stdout
    assert mtu in farm.world.run("master", ["ip", "-o", "link", "show", "dl-dynfarm"]).stdout
    for node, device in (("vm1", "tun0"), ("site", "df-aruba")):    # and both ends' queue as tuned
        shown = farm.world.run(node, ["ip", "-o", "link", "show", device]).stdout
        assert " mtu 1500 " in shown and " qlen 1000" in shown, shown

def test_master_reaches_the_vm(linked):
    farm, addresses, _ = linked
    seen, sent, received = transfer(farm, "master", "vm1", addresses["vm1"], port=5003)
    assert seen == MASTER and sent == received


def test_ten_megabytes_arrive_intact(linked):
    farm, _, _ = linked
    seen, sent, received = transfer(farm, "vm2", "master", MASTER, size=10 * 1024 * 1024, port=5004, wait=10)
    assert sent == received


def test_vms_of_one_provider_see_each_other_but_not_another_provider(linked):
    farm, addresses, _ = linked
    assert transfer(farm, "vm2", "vm1", addresses["vm1"], port=5005) is not None
    assert transfer(farm, "vm3", "vm1", addresses["vm1"], port=5006) is None
    assert transfer(farm, "vm1", "vm3", addresses["vm3"], port=5007) is None


def test_status_shows_the_link_and_its_peer(linked):
    farm, _, _ = linked
    out = farm.dynfarm("links", "status").stdout
    assert "links up" in out
    row = next(line for line in out.splitlines() if line.startswith("master"))
    assert row.split()[3:] == ["dl-master", "up", "answers"]
    # this kernel has no ovpn-dco: the data channel is OpenVPN's own
    assert "vpn aruba: df-aruba, data channel in user space (tun)" in out.splitlines()


def test_second_up_changes_nothing(linked):
    farm, _, _ = linked
    before = routing_state(farm)
    assert "already up" in farm.dynfarm("links", "up").stdout
    assert routing_state(farm) == before


def test_the_vpn_server_answers_vms_only_on_the_enrollment_port(linked):
    farm, addresses, _ = linked
    assert transfer(farm, "site", "site", "10.8.0.1", port=5010) is not None         # it does listen
    assert transfer(farm, "vm1", "site", "10.8.0.1", port=5012) is None              # not for VMs
    probe = farm.world.run("vm1", ["python3", "-c", "import socket; socket.create_connection(('10.8.0.1', 8443), 3)"],
                           check=False)
    assert probe.returncode == 0, probe.stderr                                        # enrollment port open
    done = farm.dynfarm("remote_control", "-p", "aruba", "run", "--", "true", check=False)
    assert done.returncode == 0, done.stderr                        # the site's own ssh still gets its answers


def test_down_restores_routing_and_firewall_exactly(linked):
    farm, addresses, before = linked
    assert "links down" in farm.dynfarm("links", "down").stdout
    assert routing_state(farm) == before
    assert transfer(farm, "vm1", "master", MASTER, port=5008) is None
    assert "not up" in farm.dynfarm("links", "down").stdout


def test_peer_down_script_removes_the_peer_end(linked):
    farm, _, _ = linked
    farm.world.run("master", ["sh", "-s"], input=farm.dynfarm("links", "peer", "master", "--down").stdout)
    assert "dl-dynfarm" not in farm.world.run("master", ["ip", "-o", "link"]).stdout
    assert "10.8.0.0/24" not in farm.world.run("master", ["ip", "route"]).stdout


@pytest.fixture(scope="module")
def bridged(tmp_path_factory):
    conf = SITE_CONF.replace("[site]\n", "[site]\nmode = bridged\nbridge = br-site\n") \
        .replace("vpn_subnet = 10.8.0.0/24\n", "vpn_subnet = 10.8.0.0/24\nbridge_pool = 10.10.0.100-10.10.0.149\n") \
        .replace("vpn_subnet = 10.9.0.0/29\n", "vpn_subnet = 10.9.0.0/29\nbridge_pool = 10.10.0.150-10.10.0.199\n")
    with running_farm(str(tmp_path_factory.mktemp("bridged")), conf=conf) as farm:
        yield farm


def test_bridged_vm_gets_its_pool_address_on_the_lan_and_reaches_the_master(bridged):
    farm = bridged
    address = enroll(farm, "vm1", "aruba")
    assert address == "10.10.0.100"
    assert "10.10.0.100/24" in farm.world.run("vm1", ["ip", "-o", "-4", "addr"]).stdout
    seen, sent, received = transfer(farm, "vm1", "master", MASTER)
    assert seen == "10.10.0.100" and sent == received
    assert enroll(farm, "vm2", "other") == "10.10.0.150"
    assert "in bridge br-site" in farm.dynfarm("links", "status").stdout


def test_bridged_links_down_takes_the_taps_out(bridged):
    farm = bridged
    farm.dynfarm("links", "down")
    assert "df-aruba" not in farm.world.run("site", ["ip", "-o", "link"]).stdout


@pytest.fixture(scope="module")
def routed(tmp_path_factory):
    """Routed mode: no links; the site's routers (here each LAN host's own
    route table) send the VPN subnets to the VPN server, which forwards."""
    conf = SITE_CONF.replace("[site]\n", "[site]\nmode = routed\n")
    with running_farm(str(tmp_path_factory.mktemp("routed")), conf=conf) as farm:
        addresses = {vm: enroll(farm, vm, provider) for vm, provider in
                     (("vm1", "aruba"), ("vm2", "aruba"), ("vm3", "other"))}
        before = routing_state(farm)
        assert "links up (routed mode)" in farm.dynfarm("links", "up").stdout
        status = farm.dynfarm("links", "status").stdout
        for subnet in ("10.8.0.0/24", "10.9.0.0/29"):
            assert f"ip route add {subnet} via ADDRESS-OF-THIS-HOST" in status
            for host in ("master", "storage"):
                farm.world.run(host, ["ip", "route", "add", subnet, "via", "10.10.0.1"])
        yield farm, addresses, before


def test_routed_vm_reaches_the_master_and_back_without_nat(routed):
    farm, addresses, _ = routed
    assert "dl-" not in farm.world.run("site", ["ip", "-o", "link"]).stdout
    seen, sent, received = transfer(farm, "vm1", "master", MASTER, port=5020)
    assert seen == addresses["vm1"] and sent == received
    seen, sent, received = transfer(farm, "master", "vm3", addresses["vm3"], port=5021)
    assert seen == MASTER and sent == received


def test_routed_vm_does_not_reach_an_unlinked_host_even_routing_it_through_the_tunnel(routed):
    farm, _, _ = routed
    tunnel = farm.world.run("vm1", ["ip", "-o", "route", "get", MASTER]).stdout.split()
    farm.world.run("vm1", ["ip", "route", "add", STORAGE, "dev", tunnel[tunnel.index("dev") + 1]])
    assert transfer(farm, "vm1", "storage", STORAGE, port=5022) is None
    assert transfer(farm, "master", "storage", STORAGE, port=5023) is not None   # it does listen


def test_routed_mode_keeps_providers_apart_and_the_outside_out(routed):
    farm, addresses, _ = routed
    assert transfer(farm, "vm2", "vm1", addresses["vm1"], port=5024) is not None
    # vm3 has no way to 10.8.0.0/24 but its NAT, whose next hop is this host's outside
    assert transfer(farm, "vm3", "vm1", addresses["vm1"], port=5025) is None
    assert transfer(farm, "vm1", "vm3", addresses["vm3"], port=5026) is None
    assert transfer(farm, "vm1", "site", "10.8.0.1", port=5027) is None


# One UDP datagram from the sender to ADDRESS:PORT in the receiver: one way is
# enough to leak, and no answer could come back through the outside anyway.
UDP_SINK = ("import socket, sys; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
            "s.bind((sys.argv[1], int(sys.argv[2]))); s.settimeout(2); print('ready', flush=True)\n"
            "try: print(s.recvfrom(64)[1][0])\nexcept socket.timeout: pass")


def datagram_arrives(farm, sender, receiver, address, port):
    world = farm.world
    with subprocess.Popen(world.argv(receiver, [VM_PYTHON, "-c", UDP_SINK, address, str(port)]),
                          stdout=subprocess.PIPE, text=True) as sink:
        assert sink.stdout.readline().strip() == "ready"
        world.run(sender, [VM_PYTHON, "-c", "import socket, sys; socket.socket(socket.AF_INET, socket.SOCK_DGRAM)"
                           ".sendto(b'x', (sys.argv[1], int(sys.argv[2])))", address, str(port)])
        return sink.stdout.read().strip() != ""


def test_routed_mode_with_a_forward_policy_of_drop(routed):
    """The README's advice: with FORWARD's policy DROP the VMs' traffic still
    flows, and a LAN host no longer sends out through the VPN server's outside."""
    farm, addresses, _ = routed
    farm.world.run("storage", ["ip", "route", "add", "203.0.113.0/24", "via", "10.10.0.1"])
    try:
        assert datagram_arrives(farm, "storage", "nat", "203.0.113.2", 5035)     # the leak the policy closes
        farm.world.run("site", ["iptables", "-w", "-P", "FORWARD", "DROP"])
        try:
            assert not datagram_arrives(farm, "storage", "nat", "203.0.113.2", 5036)
            seen, sent, received = transfer(farm, "vm1", "master", MASTER, port=5034)
            assert seen == addresses["vm1"] and sent == received
        finally:
            farm.world.run("site", ["iptables", "-w", "-P", "FORWARD", "ACCEPT"])
    finally:
        farm.world.run("storage", ["ip", "route", "del", "203.0.113.0/24", "via", "10.10.0.1"])


def test_routed_links_down_restores_routing_and_firewall_exactly(routed):
    farm, _, before = routed
    assert "links down" in farm.dynfarm("links", "down").stdout
    assert routing_state(farm) == before
    assert transfer(farm, "vm1", "master", MASTER, port=5028) is None
