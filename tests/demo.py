#!/usr/bin/env python3
"""make demo: a site and three VMs behind a NAT, in network namespaces, for real.

It builds the world of tests/world.py, starts the site (OpenVPN per provider and
the enrollment server), runs the bootstrap script on three VMs at once, shows
`remote_control list`, runs a command on each VM over the VPN with ssh (checking
the host keys the VMs sent at enrollment), and measures boot-to-ready against a
bare OpenVPN connect in the same run. Everything is torn down at the end.
"""

import os
import subprocess
import sys
import tempfile
import time

from farm import VMS, running_farm, transfer

PROBE = """
import socket, subprocess, sys, time
# Start argv, then poll until a TCP probe from our VPN address to the VPN server
# gets any answer (a refusal counts: it came back through the tunnel).
address, server, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
started = time.monotonic()
code = subprocess.call(sys.argv[4:])
while time.monotonic() - started < 30:
    with socket.socket() as s:
        s.settimeout(0.5)
        try:
            s.bind((address, 0))
            s.connect((server, port))
            break
        except ConnectionRefusedError:
            break
        except OSError:
            time.sleep(0.01)
print(f"{time.monotonic() - started:.3f} {code}")
"""


def step(text):
    print(f"\n== {text}", flush=True)


def timed(farm, vm, argv):
    """Seconds from starting argv in vm until its tunnel carries traffic (and argv exited)."""
    done = farm.world.run(vm, ["python3", "-c", PROBE, farm.host_of(vm)[1], "10.8.0.1", "8443", *argv],
                          timeout=60)
    seconds, code = done.stdout.split()[-2:]
    if code != "0":
        raise SystemExit(f"demo: {' '.join(argv)} failed in {vm}:\n{done.stdout}{done.stderr}")
    return float(seconds)


def measure_boot_to_ready(farm, vm="vm1", rounds=3):
    """Bare `openvpn` connect vs the whole dynfarm client, alternately, same VM, same run."""
    conf = "/var/lib/dynfarm/openvpn.conf"
    bare, client = [], []
    for _ in range(rounds):
        farm.kill_vpn_client(vm)
        bare.append(timed(farm, vm, ["openvpn", "--daemon", "bare", "--config", conf,
                                     "--writepid", "/var/lib/dynfarm/openvpn.pid", "--log", "/tmp/bare.log"]))
        farm.kill_vpn_client(vm)
        client.append(timed(farm, vm, ["python3", "/usr/local/sbin/dynfarm.py", "client",
                                       "--server", "https://203.0.113.1:8443", "--ca", "/etc/dynfarm/site-ca.pem"]))
    return min(bare), min(client)


def main():
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="dynfarm-demo-") as tmp, running_farm(tmp) as farm:
        step("site up: OpenVPN for providers aruba and other, enrollment server on 203.0.113.1:8443")
        script = farm.dynfarm("bootstrap", "aruba", "--uses", "3").stdout
        print(f"bootstrap script for aruba: {len(script.splitlines())} lines of POSIX sh (token inside)")

        step("three VMs behind one NAT (192.168.100.0/24 -> 203.0.113.2) run it at boot")
        procs = [subprocess.Popen(farm.world.argv(vm, ["sh", "-s"]), stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for vm in VMS]
        for proc in procs:
            proc.stdin.write(script)
            proc.stdin.close()
        for vm, proc in zip(VMS, procs):
            lines = proc.stdout.read().splitlines()
            if proc.wait(90) != 0:
                raise SystemExit(f"demo: bootstrap failed on {vm}:\n" + "\n".join(lines))
        for vm in VMS:
            log = farm.world.vm_path(vm, "/var/log/dynfarm-client.log")
            with open(log) as f:
                print(f"{vm}: " + next(line for line in f if "ready at" in line).split("dynfarm client: ")[-1].strip())

        step("remote_control list")
        print(farm.dynfarm("remote_control", "-p", "aruba", "list").stdout, end="")

        command = "cat /etc/dynfarm-test/greeting; nproc"
        step(f"remote_control run -b -- '{command}'  (ssh over the VPN, host keys from enrollment, no prompt)")
        done = farm.dynfarm("remote_control", "run", "-b", "--", command, check=False)
        print(done.stdout + done.stderr, end="")
        step("remote_control run -- hostname  (lines as they arrive)")
        done = farm.dynfarm("remote_control", "run", "--", "hostname", check=False)
        print(done.stdout + done.stderr, end="")

        step("links up on the VPN server, and the master's end of its link (vxlan here: this kernel has no GRE)")
        print(farm.dynfarm("links", "up").stdout, end="")
        farm.world.run("master", ["sh", "-s"], input=farm.dynfarm("links", "peer", "master").stdout)
        print(farm.dynfarm("links", "status").stdout, end="")
        reached = transfer(farm, "vm1", "master", "10.10.0.5")
        print(f"vm1 -> master 10.10.0.5:  {'connected, the master sees ' + reached[0] if reached else 'FAILED'}")
        blocked = transfer(farm, "vm1", "storage", "10.10.0.6", port=5002, wait=2)
        print(f"vm1 -> storage 10.10.0.6: {'connected (WRONG)' if blocked else 'unreachable, as it must be'}")
        if not reached or blocked:
            raise SystemExit("demo: the links do not do what they must")
        print(farm.dynfarm("links", "down").stdout, end="")

        step("boot-to-ready vs a bare OpenVPN connect (best of 3, same VM, same run)")
        bare, client = measure_boot_to_ready(farm)
        print(f"bare openvpn connect:            {bare:.3f} s")
        print(f"dynfarm client, boot to ready:   {client:.3f} s  (enroll, VPN up, customization applied)")
        print(f"overhead: {client - bare:+.3f} s (target: at most +0.500 s)")

        step("tearing down")
    print(f"demo done in {time.monotonic() - started:.1f} s; nothing left behind")
    return 0


if __name__ == "__main__":
    if os.geteuid() != 0:
        sys.exit("demo: needs root (network namespaces, tun devices, iptables)")
    sys.exit(main())
