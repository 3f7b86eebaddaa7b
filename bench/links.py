#!/usr/bin/env python3
"""The data plane: one TCP stream through each layer dynfarm builds, both ways,
beside the bare parts it wraps, in the namespace world (tests/world.py).

  bare veth            site <-> master over the site LAN (no tunnel at all)
  bare OpenVPN         vm1 <-> site through the NAT, a plain server/client
                       configuration (the site's PKI, OpenVPN's defaults): the anchor
  dynfarm tunnel       vm1 <-> the VPN server's own address (10.8.0.1)
  dynfarm full path    vm1 <-> master 10.10.0.5, through the VPN and the link
                       (vxlan, or gre where the kernel has it)

"up" is from the VM's side (or the site, for the veth) toward the site's
(master), "down" the other way. Per transfer: MB/s at the receiver, TCP
retransmits counted in the sender's namespace, and the CPU the two OpenVPN
processes spent per MB. Then the ratio of dynfarm's full path to the bare
OpenVPN tunnel. Median of ROUNDS.

Then the aggregate: two VMs streaming up to the VPN server at once, with the
provider served by one OpenVPN server, then by two (vpn_instances = 2, one VM
on each): MB/s together, the site's OpenVPN CPU per MB, and the share of a
core each server process took. On this 2-core machine the VMs, their
OpenVPN and the site share the cores, so the machine is the limit; the
server's CPU per MB is what extrapolates to a bigger VPN server.

Usage: bench/links.py [MB] [ROUNDS] (default 200 MB, 3 rounds). Needs root;
everything stays in our namespaces.
"""

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests"))
from farm import SITE_CONF, running_farm, wait_for  # noqa: E402
from world import MASTER_IP, SITE_LAN_IP, SITE_WAN_IP, VM_PYTHON  # noqa: E402

SINK = r"""
import socket, sys, time
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen(1)
s.settimeout(30)
print("ready", flush=True)
conn, _ = s.accept()
total, started = 0, time.monotonic()
while True:
    data = conn.recv(1 << 20)
    if not data:
        break
    total += len(data)
print(total, time.monotonic() - started, flush=True)
"""

SOURCE = r"""
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30)
chunk = b"x" * (1 << 20)
for _ in range(int(sys.argv[3])):
    s.sendall(chunk)
s.close()
"""

BARE_PORT = 1300
BARE_NET = "10.99.0"
BARE_DEVICE = "bare0"       # not df-*: dynfarm's firewall leaves it alone


def retransmits(world, node):
    """TCP segments retransmitted so far in node's namespace (/proc/net/snmp)."""
    lines = [line.split() for line in world.run(node, ["cat", "/proc/net/snmp"]).stdout.splitlines()
             if line.startswith("Tcp:")]
    return int(lines[1][lines[0].index("RetransSegs")])


def cpu_seconds(pids):
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def transfer(world, sender, receiver, address, megabytes, port, pids):
    """(MB/s at the receiver, retransmits, CPU ms per MB of each pid: the
    site's OpenVPN, the VM's) of one stream."""
    sink = subprocess.Popen(world.argv(receiver, [VM_PYTHON, "-c", SINK, address, str(port)]),
                            stdout=subprocess.PIPE, text=True)
    try:
        assert sink.stdout.readline().strip() == "ready"
        before, cpu = retransmits(world, sender), [cpu_seconds([pid]) for pid in pids]
        world.run(sender, [VM_PYTHON, "-c", SOURCE, address, str(port), str(megabytes)], timeout=300)
        total, seconds = sink.stdout.readline().split()
        sink.wait(30)
        spent = [cpu_seconds([pid]) - was for pid, was in zip(pids, cpu)]
    finally:
        if sink.poll() is None:
            sink.kill()
    if int(total) != megabytes << 20:
        raise SystemExit(f"bench: {sender} sent {megabytes} MB, {receiver} got {total} bytes")
    site, vm = (s * 1000 / megabytes for s in spent) if spent else (0.0, 0.0)
    return megabytes / float(seconds), retransmits(world, sender) - before, site, vm


def start_bare_tunnel(farm, tmp):
    """A plain OpenVPN server (site) and client (vm1) with the site's PKI and
    OpenVPN's defaults; their pids once the tunnel answers."""
    state = os.path.join(farm.dir, "state", "pki")
    server_conf = os.path.join(tmp, "bare-server.conf")
    with open(server_conf, "w") as f:
        f.write(f"mode server\ntls-server\nproto udp4\nport {BARE_PORT}\ndev {BARE_DEVICE}\ndev-type tun\n"
                f"topology subnet\nserver {BARE_NET}.0 255.255.255.0\n"
                f"ca {state}/ca.crt\ncert {state}/server.crt\nkey {state}/server.key\ndh none\n"
                "keepalive 10 60\nverb 1\n")
    client_conf = farm.world.vm_path("vm1", "/root/bare-client.conf")
    with open(client_conf, "w") as f:
        f.write(f"client\ndev {BARE_DEVICE}\ndev-type tun\nproto udp4\nremote {SITE_WAN_IP} {BARE_PORT}\nnobind\n"
                f"ca /etc/dynfarm/site-ca.pem\ncert /var/lib/dynfarm/client.crt\nkey /var/lib/dynfarm/client.key\n"
                "remote-cert-tls server\nverb 1\n")
    server = farm.world.spawn("site", ["openvpn", "--config", server_conf], os.path.join(tmp, "bare-server.log"))
    client = farm.world.spawn("vm1", ["openvpn", "--config", "/root/bare-client.conf"],
                              os.path.join(tmp, "bare-client.log"))
    # (a ping would not tell: the site answers for its own address over the NAT as well)
    wait_for(lambda: " inet " in farm.world.run("vm1", ["ip", "-o", "-4", "addr", "show", "dev", BARE_DEVICE],
                                               check=False).stdout, "the bare tunnel", timeout=30)
    return server.pid, client.pid


def measure(farm, paths, megabytes, rounds):
    """{(path, direction): [(MB/s, retransmits, CPU ms/MB), ...]}, rounds interleaved."""
    results = {}
    port = 6000
    for _ in range(rounds):
        for name, up, down, pids in paths:
            for direction, (sender, receiver, address) in (("up", up), ("down", down)):
                port += 1
                results.setdefault((name, direction), []).append(
                    transfer(farm.world, sender, receiver, address, megabytes, port, pids))
    return results


def aggregate(tmp, instances, megabytes):
    """Two VMs streaming at once to their VPN servers; (MB/s together,
    site CPU ms per MB, {server: share of a core})."""
    conf = SITE_CONF.replace("vpn_subnet = 10.8.0.0/24\n", f"vpn_subnet = 10.8.0.0/24\nvpn_instances = {instances}\n"
                             ).replace("vpn_port = 1195", "vpn_port = 1196")
    vms = ("vm1", "vm2")
    with running_farm(os.path.join(tmp, f"aggregate{instances}"), vms=vms, conf=conf) as farm:
        done = farm.run_at_once(farm.dynfarm("bootstrap", "aruba", "--uses", "2").stdout, vms)
        assert [code for code, _ in done] == [0, 0], done
        servers = {name: proc.pid for name, proc in farm.vpn.items() if name.startswith("aruba")}
        targets = []
        for port, vm in enumerate(vms, 7000):
            answer = json.loads(open(farm.world.vm_path(vm, "/var/lib/dynfarm/enrollment.json")).read())
            targets.append((vm, answer["vpn_server"], port))
        sinks = [subprocess.Popen(farm.world.argv("site", [VM_PYTHON, "-c", SINK, address, str(port)]),
                                  stdout=subprocess.PIPE, text=True) for _, address, port in targets]
        for sink in sinks:
            assert sink.stdout.readline().strip() == "ready"
        cpu = {name: cpu_seconds([pid]) for name, pid in servers.items()}
        started = time.monotonic()
        sources = [subprocess.Popen(farm.world.argv(vm, [VM_PYTHON, "-c", SOURCE, address, str(port), str(megabytes)]))
                   for vm, address, port in targets]
        for proc in sources + sinks:
            proc.wait(300)
        elapsed = time.monotonic() - started
        spent = {name: cpu_seconds([pid]) - cpu[name] for name, pid in servers.items()}
        received = sum(int(sink.stdout.readline().split()[0]) for sink in sinks) / (1 << 20)
    return received / elapsed, sum(spent.values()) * 1000 / received, {n: c / elapsed for n, c in spent.items()}


def median_of(runs):
    return tuple(statistics.median(values) for values in zip(*runs))


def main():
    megabytes = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    if os.geteuid() != 0:
        sys.exit("bench/links.py: needs root (network namespaces)")
    encap = "vxlan" if "encap = vxlan" in SITE_CONF else "gre"
    with tempfile.TemporaryDirectory(prefix="dynfarm-bench-links-") as tmp, running_farm(tmp, vms=("vm1",),
                                                                                         conf=SITE_CONF) as farm:
        world = farm.world
        world.run("vm1", ["sh", "-s"], input=farm.dynfarm("bootstrap", "aruba").stdout, timeout=90)
        vm_address = farm.host_of("vm1")[1]
        dynfarm_pids = [farm.vpn["aruba"].pid,
                        int(open(world.vm_path("vm1", "/var/lib/dynfarm/openvpn.pid")).read())]
        bare_pids = start_bare_tunnel(farm, tmp)
        bare_vm = world.run("vm1", ["ip", "-o", "-4", "addr", "show", "dev", BARE_DEVICE]).stdout.split()
        bare_vm = bare_vm[bare_vm.index("inet") + 1].split("/")[0]
        # The tunnel alone first: 'links up' makes the VPN server answer VMs on the enrollment port only.
        results = measure(farm, [
            ("bare veth", ("site", "master", MASTER_IP), ("master", "site", SITE_LAN_IP), []),
            ("bare OpenVPN", ("vm1", "site", f"{BARE_NET}.1"), ("site", "vm1", bare_vm), bare_pids),
            ("dynfarm tunnel", ("vm1", "site", "10.8.0.1"), ("site", "vm1", vm_address), dynfarm_pids),
        ], megabytes, rounds)
        farm.dynfarm("links", "up")
        world.run("master", ["sh", "-s"], input=farm.dynfarm("links", "peer", "master").stdout)
        time.sleep(0.5)
        results.update(measure(farm, [
            (f"dynfarm full path ({encap})", ("vm1", "master", MASTER_IP), ("master", "vm1", vm_address),
             dynfarm_pids)], megabytes, rounds))
    print(f"one TCP stream of {megabytes} MB each way, median of {rounds}; up = from the VM's side:")
    print(f"  {'':26} {'------------------ up -------------------':>41}   {'----------------- down ------------------':>41}")
    print(f"  {'path':26} {'MB/s':>7} {'retrans':>8} {'CPU ms/MB: site':>15} {'VM':>8}   {'MB/s':>7} {'retrans':>8} "
          f"{'CPU ms/MB: site':>15} {'VM':>8}")
    medians = {key: median_of(runs) for key, runs in results.items()}
    for name in dict.fromkeys(name for name, _ in results):
        up, down = medians[(name, "up")], medians[(name, "down")]
        cpu = (lambda m: f"{m[2]:15.1f} {m[3]:8.1f}") if "veth" not in name else (lambda m: f"{'-':>15} {'-':>8}")
        print(f"  {name:26} {up[0]:7.1f} {up[1]:8.0f} {cpu(up)}   {down[0]:7.1f} {down[1]:8.0f} {cpu(down)}")
    full = f"dynfarm full path ({encap})"
    print(f"  ratio, dynfarm's full path to the bare OpenVPN tunnel: up {medians[(full, 'up')][0] / medians[('bare OpenVPN', 'up')][0]:.2f}, "
          f"down {medians[(full, 'down')][0] / medians[('bare OpenVPN', 'down')][0]:.2f} (target: at least 0.9)")
    print("  CPU: the OpenVPN process at the site (the VPN server) and at the VM, per MB carried, kernel work "
          "they trigger included; everything shares the same 2 cores")
    with tempfile.TemporaryDirectory(prefix="dynfarm-bench-aggregate-") as tmp:
        print(f"\ntwo VMs streaming {megabytes} MB each up to their VPN server at once:")
        for instances in (1, 2):
            rate, per_mb, shares = aggregate(tmp, instances, megabytes)
            share = ", ".join(f"{name} {value:.0%}" for name, value in sorted(shares.items()))
            print(f"  {instances} server{'s' if instances > 1 else ' '}: {rate:6.1f} MB/s together; the site's OpenVPN "
                  f"{per_mb:.1f} ms CPU per MB; share of a core: {share}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
