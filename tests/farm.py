"""A dynfarm site in the namespace world: config, daemons, the admin's view.

Shared by the system tests and the demo. The site directory holds site.conf,
the admin key, the customization tree and the daemons' logs.
"""

import contextlib
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import dynfarm  # noqa: E402
from helpers import known_hosts, site_conf, write_site  # noqa: E402
from world import VM_PYTHON, World  # noqa: E402

DYNFARM = os.path.join(REPO, "dynfarm.py")
VMS = ("vm1", "vm2", "vm3")

# The world's site: VMs reach it from the provider's side of the NAT, at the
# site's public address; namespaces and real daemons are slower than loopback.
SITE_CONF = site_conf(listen="0.0.0.0:8443", public_address="203.0.113.1", request_timeout=5,
                      networks="203.0.113.0/24")


class Farm:
    """The world plus the site's daemons and the admin's view of it."""

    def __init__(self, world, site_dir):
        self.world = world
        self.dir = site_dir
        self.conf = os.path.join(site_dir, "site.conf")
        self.server = None
        self.vpn = {}          # provider -> its OpenVPN server's process

    def dynfarm(self, *args, node="site", check=True, input=None):
        return self.world.run(node, [sys.executable, DYNFARM, "-c", self.conf, *args], check=check, input=input)

    def start_vpn(self, provider):
        self.vpn[provider] = self.world.spawn("site", [sys.executable, DYNFARM, "-c", self.conf, "vpn", provider],
                                              os.path.join(self.dir, f"vpn-{provider}.log"))

    def start_vpns(self):
        """Every OpenVPN server of the site: each provider's, each of its instances."""
        for provider in dynfarm.load_config(self.conf).providers.values():
            for vpn in provider.vpns:
                self.start_vpn(vpn.name)

    def start_server(self):
        self.server = self.world.spawn("site", [sys.executable, DYNFARM, "-c", self.conf, "server"],
                                       os.path.join(self.dir, "server.log"))
        wait_for(lambda: self.world.run("site", [sys.executable, "-c", HEALTH], check=False).returncode == 0,
                 "enrollment server answering")

    def stop_server(self):
        self.server.terminate()
        self.server.wait(10)

    def hosts(self):
        return {h["name"]: h for h in json.loads(self.dynfarm("remote_control", "list", "--json").stdout)}

    def host_of(self, vm):
        state = json.loads(read(self.world.vm_path(vm, "/var/lib/dynfarm/enrollment.json")))
        return state["name"], state["address"]

    def store(self):
        return dynfarm.Store(os.path.join(self.dir, "state", "dynfarm.db"))

    def write_known_hosts(self):
        """The admin's known_hosts, from the host keys the VMs sent at enrollment."""
        with open(os.path.join(self.dir, "known_hosts"), "w") as f:
            f.write(known_hosts(self.store()))

    def ssh(self, address, command, known_hosts=None, check=True):
        known_hosts = known_hosts or os.path.join(self.dir, "known_hosts")
        return self.world.run("site", [
            "ssh", "-F", "/dev/null", "-i", os.path.join(self.dir, "admin_key"),
            "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes", "-o", f"UserKnownHostsFile={known_hosts}",
            "-o", "ConnectTimeout=5", f"root@{address}", command], check=check, timeout=30)

    def boot(self, vm, check=True):
        """What the VM's boot runs (cron @reboot): the hook the bootstrap installed."""
        return self.world.run(vm, ["/usr/local/sbin/dynfarm-client.sh"], check=check, timeout=90)

    def run_at_once(self, script, vms):
        """Run a script (the bootstrap) on VMs all at once, as a provider starts
        them; [(exit code, output)] in the order of vms."""
        procs = [subprocess.Popen(self.world.argv(vm, ["sh", "-s"]), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True) for vm in vms]
        for proc in procs:
            proc.stdin.write(script)
            proc.stdin.close()
        outputs = [proc.stdout.read() for proc in procs]
        return [(proc.wait(90), output) for proc, output in zip(procs, outputs)]

    def kill_vpn_client(self, vm):
        pid = int(read(self.world.vm_path(vm, "/var/lib/dynfarm/openvpn.pid")))
        os.kill(pid, 15)
        wait_for(lambda: not os.path.exists(f"/proc/{pid}"), f"openvpn of {vm} gone")


HEALTH = ("import ssl,sys,urllib.request;"
          "ctx=ssl.create_default_context(cafile=sys.argv[1] if len(sys.argv)>1 else None);"
          "ctx.check_hostname=False;ctx.verify_mode=ssl.CERT_NONE;"
          "urllib.request.urlopen('https://203.0.113.1:8443/v1/health',context=ctx,timeout=2)")


def read(path):
    with open(path) as f:
        return f.read()


def wait_for(check, what, timeout=20, interval=0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for: {what}")


@contextlib.contextmanager
def running_farm(tmp, vms=VMS, conf=SITE_CONF, hosts=()):
    """The world up, the site initialised, its VPNs and server running, sshd on every VM.

    hosts: site nodes that get a host of their own (World's hosts)."""
    site_dir = os.path.join(tmp, "site")
    write_site(site_dir, conf)
    world = World(os.path.join(tmp, "world"), vms=len(vms), hosts=hosts)
    world.up()
    try:
        farm = Farm(world, site_dir)
        farm.dynfarm("init")
        if "mode = bridged" in conf:       # the taps must be in the bridge before OpenVPN opens them
            farm.dynfarm("links", "up")
        farm.start_vpns()
        farm.start_server()
        for vm in vms:
            world.start_sshd(vm)
        yield farm
    finally:
        world.down()


# Listen on ADDRESS:PORT, accept one connection, read to EOF; print the peer and
# the sha256 of what arrived (or time out and exit 1).
SINK = r"""
import hashlib, socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen(1)
s.settimeout(float(sys.argv[3]))
print("ready", flush=True)
conn, peer = s.accept()
conn.settimeout(30)
h = hashlib.sha256()
while True:
    data = conn.recv(65536)
    if not data:
        break
    h.update(data)
print(peer[0], h.hexdigest(), flush=True)
"""

# Connect to HOST:PORT within WAIT seconds, send SIZE random bytes, print their sha256.
SOURCE = r"""
import hashlib, os, socket, sys
host, port, wait, size = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
data = os.urandom(size)
s = socket.create_connection((host, port), timeout=wait)
s.settimeout(60)
s.sendall(data)
s.close()
print(hashlib.sha256(data).hexdigest())
"""


def transfer(farm, sender, receiver, address, size=1000, port=5001, wait=3.0):
    """Send size bytes from sender to address (listened on in receiver).

    Returns (source address seen, sent hash, received hash), or None if no
    connection could be made.
    """
    world = farm.world
    argv = world.argv(receiver, [VM_PYTHON, "-c", SINK, address, str(port), str(wait + 2)])
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True) as sink:
        assert sink.stdout.readline().strip() == "ready"
        sent = world.run(sender, [VM_PYTHON, "-c", SOURCE, address, str(port), str(wait), str(size)],
                         check=False, timeout=120)
        received = sink.stdout.readline().split()
        sink.wait(timeout=60)
    if sent.returncode != 0 or not received:
        return None
    return received[0], sent.stdout.strip(), received[1]
