"""Site links as data: the plan `links up` would run, and running it.

The commands of a plan (gre, vxlan, routed and bridged's forwarding, vm_to_vm),
that every step that adds has its undo, apply_plan rolling back on failure and
restoring the switches it changed, the record of a plan from another boot,
and the peer script for the linked host. Nothing here touches the network:
test_links.py runs the plans for real.
"""

import json
import os
import subprocess

import pytest

import dynfarm


# --- the plan ---------------------------------------------------------------------

# The way to the master, as link_routes() finds it: our address, interface, its MTU.
LAN = {"master": dynfarm.Route("10.10.0.1", "br-site", 1500)}

def gre_config(site):
    config, _, _ = site
    config.links["master"].encap = "gre"
    return config


def test_gre_link_plan_commands(site):
    config = gre_config(site)
    plan = dynfarm.links_plan(config, LAN)
    do = [" ".join(action["do"]) for action in plan]
    assert do[:9] == [
        "sysctl -qw net/ipv4/conf/default/forwarding=1",
        "sysctl -qw -e net/ipv4/conf/df-aruba/forwarding=1",
        "sysctl -qw -e net/ipv4/conf/df-other/forwarding=1",
        "ip link add dl-master type gre local 10.10.0.1 remote 10.10.0.5 ttl 64",
        "ip link set dl-master mtu 1476",
        "ip addr add 169.254.64.1/30 dev dl-master",
        "sysctl -qw net.ipv4.conf.dl-master.rp_filter=2",
        "ip link set dl-master up",
        "ip route add 10.10.0.5/32 via 169.254.64.2 dev dl-master table 4200",
    ]
    assert "ip route add unreachable default table 4200" in do
    assert "ip rule add iif df-aruba to 10.8.0.0/24 lookup main pref 4199" in do
    assert "ip rule add iif df-aruba lookup 4200 pref 4200" in do
    assert "ip rule add iif df-other lookup 4200 pref 4200" in do
    assert "iptables -w -t filter -A DYNFARM-FWD -i df-+ -o dl-master -d 10.10.0.5 -j ACCEPT" in do
    assert "iptables -w -t filter -A DYNFARM-FWD -i df-+ -j DROP" in do
    assert do.index("iptables -w -t filter -I FORWARD 1 -j DYNFARM-FWD") > do.index(
        "iptables -w -t filter -A DYNFARM-FWD -i df-+ -j DROP")     # the wall is whole before it is used
    assert any("TCPMSS --clamp-mss-to-pmtu" in line for line in do)


def test_vxlan_link_uses_its_own_id_and_port(site):
    config, _, _ = site
    plan = [a for a in dynfarm.links_plan(config, LAN) if a["do"][0] == "ip"]
    assert plan[0]["do"] == ["ip", "link", "add", "dl-master", "type", "vxlan", "id", "4200", "local",
                             "10.10.0.1", "remote", "10.10.0.5", "dstport", "4789"]
    assert plan[1]["do"] == ["ip", "link", "set", "dl-master", "mtu", "1450"]


@pytest.mark.parametrize("encap, lan_mtu, link_mtu", [("vxlan", 1500, 1450), ("gre", 1500, 1476),
                                                      ("vxlan", 9000, 8950), ("gre", 9000, 8976)])
def test_the_link_mtu_is_the_ways_less_the_encapsulation(site, encap, lan_mtu, link_mtu):
    """A jumbo LAN gets a jumbo link: it carries only site traffic; what leaves
    for the internet goes through the tun device (1500) and OpenVPN's mssfix."""
    config, _, _ = site
    config.links["master"].encap = encap
    lan = {"master": dynfarm.Route("10.10.0.1", "br-site", lan_mtu)}
    assert ["ip", "link", "set", "dl-master", "mtu", str(link_mtu)] in [a["do"] for a in dynfarm.links_plan(config, lan)]
    script = dynfarm.peer_script(config, config.links["master"], lan["master"])
    assert f'mtu=$(( $(cat /sys/class/net/$dev/mtu) - {lan_mtu - link_mtu} ))' in script
    assert f'if [ "$mtu" -gt {link_mtu} ]; then mtu={link_mtu}; fi' in script
    assert 'ip link set dl-dynfarm mtu "$mtu"' in script        # an existing end is set right too
    assert '[ -n "$dev" ] || { echo "no route to the VPN server 10.10.0.1" >&2; exit 1; }' in script

def test_every_step_that_adds_has_its_undo(site):
    config = gre_config(site)
    for action in dynfarm.links_plan(config, LAN):
        verb = action["do"][2] if action["do"][0] == "ip" else action["do"][-1]
        if action["do"][:3] in (["ip", "addr", "add"], ["ip", "link", "set"]) or "rp_filter" in verb:
            continue                          # gone with the link device
        assert action["undo"], action["do"]


def test_vm_to_vm_no_drops_the_same_provider_rule(site):
    config, _, _ = site
    config.providers["aruba"].vm_to_vm = False
    do = [" ".join(a["do"]) for a in dynfarm.links_plan(config, LAN)]
    assert not any("iif df-aruba to 10.8.0.0/24" in line for line in do)
    assert not any("-i df-aruba -o df-+ -d 10.8.0.0/24" in line for line in do)
    assert "iptables -w -t filter -A DYNFARM-FWD -i df-other -o df-+ -d 10.9.0.0/29 -j ACCEPT" in do


def test_routed_mode_forwards_only_to_and_from_the_linked_hosts(site, capsys):
    config, _, _ = site
    config.mode = "routed"
    do = [" ".join(a["do"]) for a in dynfarm.links_plan(config, LAN)]
    assert not any(line.startswith(("ip link", "ip rule", "ip route")) for line in do)
    assert [line for line in do if line.startswith("sysctl")] == [
        "sysctl -qw net/ipv4/conf/default/forwarding=1", "sysctl -qw -e net/ipv4/conf/df-aruba/forwarding=1",
        "sysctl -qw -e net/ipv4/conf/df-other/forwarding=1", "sysctl -qw net/ipv4/conf/br-site/forwarding=1"]
    rules = [line.split("-A DYNFARM-FWD ")[1] for line in do if "-A DYNFARM-FWD" in line]
    assert rules == ["-i df-+ -o br-site -d 10.10.0.5 -j ACCEPT", "-i br-site -s 10.10.0.5 -o df-+ -j ACCEPT",
                     "-i br-site -o df-+ -p icmp -m conntrack --ctstate RELATED -j ACCEPT",
                     "-i df-aruba -o df-+ -d 10.8.0.0/24 -j ACCEPT", "-i df-other -o df-+ -d 10.9.0.0/29 -j ACCEPT",
                     "-i df-+ -j DROP", "-o df-+ -j DROP"]


# --- applying it and undoing it ---------------------------------------------------

def test_apply_plan_rolls_back_on_failure(tmp_path, monkeypatch):
    ran = []

    def fake_run(argv, check=True, **kw):
        ran.append(argv)
        if argv == ["boom"]:
            raise dynfarm.Fatal("boom failed")
        return subprocess.CompletedProcess(argv, 0, b"", b"")
    monkeypatch.setattr(dynfarm, "run", fake_run)
    plan = [dynfarm.step(["a"], ["undo-a"]), dynfarm.step(["b"], ["undo-b"]), dynfarm.step(["boom"], ["x"])]
    record = str(tmp_path / "links.json")
    with pytest.raises(dynfarm.Fatal):
        dynfarm.apply_plan(plan, record)
    assert ran == [["a"], ["b"], ["boom"], ["undo-b"], ["undo-a"]]
    assert not os.path.exists(record)


def test_sysctl_undo_restores_the_previous_value(tmp_path, monkeypatch):
    monkeypatch.setattr(dynfarm, "run", lambda argv, check=True, **kw: subprocess.CompletedProcess(argv, 0))
    proc = tmp_path / "forwarding"
    proc.write_text("0\n")
    action = dynfarm.sysctl_step("net/ipv4/conf/eth0.100/forwarding", 1)
    assert action["previous"] == "/proc/sys/net/ipv4/conf/eth0.100/forwarding"   # a dot in a name stays
    action["previous"] = str(proc)
    done = dynfarm.apply_plan([action], str(tmp_path / "rec.json"))
    assert done[0]["undo"] == ["sysctl", "-qw", "net/ipv4/conf/eth0.100/forwarding=0"]


def test_a_tun_device_gets_back_its_own_forwarding_switch(site, tmp_path, monkeypatch):
    """On a host that forwarded already, links down must leave its tun devices forwarding."""
    config, _, _ = site
    monkeypatch.setattr(dynfarm, "run", lambda argv, check=True, **kw: subprocess.CompletedProcess(argv, 0))
    (tmp_path / "on").write_text("1\n")
    steps = [a for a in dynfarm.forwarding_steps(config, {}) if "-e" in a["do"]]
    steps[0]["previous"] = str(tmp_path / "on")                       # df-aruba: there, forwarding
    steps[1]["previous"] = str(tmp_path / "absent")                   # df-other: not made yet
    done = dynfarm.apply_plan(steps, str(tmp_path / "rec.json"))
    assert [d["undo"][-1] for d in done] == ["net/ipv4/conf/df-aruba/forwarding=1",
                                             "net/ipv4/conf/df-other/forwarding=0"]


def test_a_links_record_from_another_boot_is_stale(tmp_path, monkeypatch):
    record = tmp_path / "links.json"
    record.write_text(json.dumps({"boot": "an-earlier-boot", "steps": [{"do": ["x"], "undo": ["y"]}]}))
    assert dynfarm.read_record(str(record)) is None and not record.exists()
    record.write_text(json.dumps({"boot": dynfarm.boot_id(), "steps": [{"do": ["x"], "undo": ["y"]}]}))
    assert dynfarm.read_record(str(record)) == [{"do": ["x"], "undo": ["y"]}]


# --- the peer's end ---------------------------------------------------------------

def test_peer_script_is_posix_and_idempotent_in_form(site):
    config = gre_config(site)
    script = dynfarm.peer_script(config, config.links["master"], LAN["master"])
    for shell in (["dash", "-n"], ["busybox", "sh", "-n"]):
        assert subprocess.run(shell, input=script, text=True).returncode == 0
    assert "ip link show dl-dynfarm >/dev/null 2>&1 || ip link add dl-dynfarm type gre local 10.10.0.5 " \
           "remote 10.10.0.1 ttl 64" in script
    assert "ip route replace 10.8.0.0/24 via 169.254.64.1 dev dl-dynfarm src 10.10.0.5" in script
    assert "ip route replace 10.9.0.0/29 via 169.254.64.1 dev dl-dynfarm src 10.10.0.5" in script
    assert script.rstrip().endswith('main "$@"')
    down = dynfarm.peer_script(config, config.links["master"], LAN["master"], down=True)
    assert "ip link del dl-dynfarm" in down and "ip link add" not in down


# --- the kernel's caps on socket buffers -------------------------------------------

def test_every_mode_raises_the_socket_buffer_caps_and_undoes_it(site):
    config, _, _ = site
    for mode in ("gre", "routed", "bridged"):
        config.mode = mode
        plan = dynfarm.links_plan(config, LAN)
        limits = [a for a in plan if a["previous"] in ("/proc/sys/net/core/rmem_max", "/proc/sys/net/core/wmem_max")]
        assert len(limits) == 2, mode
        for action in limits:
            assert action["do"][:2] == ["sh", "-c"] and "-ge 1048576 ] || sysctl -qw net/core/" in action["do"][2]
            # put back only if it still has our value: a later raise by the admin stays
            assert '" != 1048576 ] || sysctl -qw net/core/' in action["undo"][2] and "{previous}" in action["undo"][2]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: runs the steps in a network namespace of its own")
def test_socket_buffer_steps_leave_a_cap_the_namespace_cannot_write(tmp_path):
    """In a network namespace the caps are the host's, readable, not writable:
    the steps must do nothing there, and succeed (the test world's site)."""
    for action in dynfarm.socket_buffer_steps():
        before = open(action["previous"]).read()
        for argv in (action["do"], [a.replace("{previous}", "212992") for a in action["undo"]]):
            done = subprocess.run(["unshare", "-n"] + argv, capture_output=True, text=True)
            assert done.returncode == 0, done.stderr
        assert open(action["previous"]).read() == before


def test_the_client_raises_low_caps_and_leaves_high_ones(tmp_path):
    root = tmp_path / "sys"
    (root / "net" / "core").mkdir(parents=True)
    (root / "net" / "core" / "rmem_max").write_text("212992\n")
    (root / "net" / "core" / "wmem_max").write_text("4194304\n")
    assert dynfarm.raise_kernel_limits(str(root)) == []
    assert (root / "net" / "core" / "rmem_max").read_text() == "1048576"
    assert (root / "net" / "core" / "wmem_max").read_text() == "4194304\n"
    (root / "net" / "core" / "wmem_max").unlink()
    assert dynfarm.raise_kernel_limits(str(root)) == [
        "could not raise net.core.wmem_max to 1048576 (No such file or directory): the tunnel may be slower"]


# --- where the data channel runs (links status) --------------------------------------

TUN = ("7: df-aruba: <POINTOPOINT,MULTICAST,NOARP,UP,LOWER_UP> mtu 1500 qdisc fq_codel state UNKNOWN qlen 1000"
       "\\    link/none  promiscuity 0 \\    tun type tun pi off vnet_hdr off persist off addrgenmode none")


@pytest.mark.parametrize("shown, where", [
    (TUN, "in user space (tun)"),
    (TUN.replace("tun type tun", "tun type tap"), "in user space (tap: DCO takes tun only)"),
    (TUN.replace("tun type tun pi off vnet_hdr off persist off", "ovpn-dco"), "in the kernel (DCO)"),   # 2.6
    (TUN.replace("tun type tun pi off vnet_hdr off persist off", "ovpn mode mp"), "in the kernel (DCO)"),  # 2.7
    ("", None),                                                          # no device: not running
])
def test_links_status_tells_where_the_data_channel_runs(monkeypatch, shown, where):
    """The kind of the VPN server's device, as `ip -d -o link show` gives it (the
    tun line is this machine's; the ovpn ones are what a DCO kernel names)."""
    def ip(argv, check=True):
        assert argv == ["ip", "-d", "-o", "link", "show", "dev", "df-aruba"]
        return subprocess.CompletedProcess(argv, 0 if shown else 1, shown.encode(), b"")
    monkeypatch.setattr(dynfarm, "run", ip)
    assert dynfarm.data_channel("df-aruba") == where
