#!/usr/bin/env python3
"""VM-to-master TCP throughput through VPN plus link, beside the bare namespace link.

Builds the namespace world (tests/world.py), enrolls vm1, brings the links up
(vxlan, or gre where the kernel has it), then sends SIZE bytes over TCP:

  through    vm1 --OpenVPN--> site --link--> master 10.10.0.5
  baseline   site --veth/bridge--> master 10.10.0.5 (the bare namespace link)

both measured in the same run, best of ROUNDS. Usage: bench/links.py [MB] [ROUNDS]
(default 200 MB, 3 rounds). Needs root; everything stays in our namespaces.
"""

import os
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests"))
from farm import SITE_CONF, running_farm  # noqa: E402
from world import VM_PYTHON  # noqa: E402

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


def throughput(world, sender, megabytes, port):
    """MB/s of one transfer from sender to the master, timed at the receiver."""
    sink = subprocess.Popen(world.argv("master", [VM_PYTHON, "-c", SINK, "10.10.0.5", str(port)]),
                            stdout=subprocess.PIPE, text=True)
    try:
        assert sink.stdout.readline().strip() == "ready"
        world.run(sender, [VM_PYTHON, "-c", SOURCE, "10.10.0.5", str(port), str(megabytes)], timeout=300)
        total, seconds = sink.stdout.readline().split()
        sink.wait(30)
    finally:
        if sink.poll() is None:
            sink.kill()
    if int(total) != megabytes << 20:
        raise SystemExit(f"bench: {sender} sent {megabytes} MB, the master got {total} bytes")
    return megabytes / float(seconds)


def main():
    megabytes = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    if os.geteuid() != 0:
        sys.exit("bench/links.py: needs root (network namespaces)")
    with tempfile.TemporaryDirectory(prefix="dynfarm-bench-links-") as tmp, running_farm(tmp, vms=("vm1",),
                                                                                         conf=SITE_CONF) as farm:
        farm.world.run("vm1", ["sh", "-s"], input=farm.dynfarm("bootstrap", "aruba").stdout, timeout=90)
        farm.dynfarm("links", "up")
        farm.world.run("master", ["sh", "-s"], input=farm.dynfarm("links", "peer", "master").stdout)
        through, bare = [], []
        for n in range(rounds):
            bare.append(throughput(farm.world, "site", megabytes, 6000 + 2 * n))
            through.append(throughput(farm.world, "vm1", megabytes, 6001 + 2 * n))
        encap = "vxlan" if "encap = vxlan" in SITE_CONF else "gre"
        print(f"{megabytes} MB over TCP to the master 10.10.0.5, best of {rounds}:")
        print(f"  bare namespace link (site -> master):     {max(bare):8.1f} MB/s")
        print(f"  VM through OpenVPN + {encap} link:         {max(through):8.1f} MB/s")
        print(f"  ratio: {max(through) / max(bare):.2f} of the bare link (OpenVPN's user-space crypto "
              f"is the cost; both on the same 2 cores)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
