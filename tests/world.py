#!/usr/bin/env python3
"""The simulated world: a site, a NAT and its VMs in Linux network namespaces.

Used by the system tests and the demo. Needs root; standard library only.

     [vm1]--+                                  +--[master]  10.10.0.5
     [vm2]--+-- 192.168.100.0/24 --[nat]==203.0.113.0/24==[site] 10.10.0.1 --+
     [vm3]--+    (MASQUERADE: all VMs share 203.0.113.2)                     +--[storage] 10.10.0.6

  node      interfaces (inside its namespace)                  routes / settings
  vmN       eth0 192.168.100.(10+N)/24                         default via 192.168.100.1
  nat       br-lan 192.168.100.1/24 (ports lan-vmN),           default via 203.0.113.1,
            wan 203.0.113.2/24                                 ip_forward=1, MASQUERADE out of
                                                               wan, FORWARD: new connections
                                                               only from the LAN (a home router)
  site      wan 203.0.113.1/24,                                no default route,
            br-site 10.10.0.1/24 (ports lan-master, lan-storage)  ip_forward=0 (dynfarm forwards on its own interfaces)
  master    eth0 10.10.0.5/24                                  no default route
  storage   eth0 10.10.0.6/24                                  no default route

Nothing is ever joined to the machine's own network namespace, and no route leads
out of the world. site, nat, master and storage are only network namespaces: what runs
there shares the machine's files. Each VM is a "machine": its own network, mount and
UTS namespaces, held open by one `sleep infinity` process (the holder), with

  private, host-visible dirs   /root /etc/dynfarm /etc/ssh /etc/cron.d /var/lib/dynfarm
  (world.vm_path() maps them)  /var/log /usr/local/bin /usr/local/sbin /tmp /etc/machine-id
  private overlays             /etc and /var (writable; the host's files show through)
  private tmpfs                /run (with /run/sshd for sshd's privilege separation)
  read-only                    everything else of the host (/usr, /usr/local, /opt, ...)

so a VM writes nothing of the host's. Its /etc/ssh is the host's sshd/ssh config
with fresh host keys of its own; start_sshd() runs its own sshd.

Names: every namespace is PREFIX-NODE, PREFIX = "df" + 5 hex digits (from the pid),
e.g. dfa1b2c-vm1. Veths are born inside their namespaces under PREFIX names, then
renamed, so nothing of ours ever appears in the machine's namespace. Each namespace's
lo carries an alias "dfworld owner=PID start=TICKS"; sweep() (run by up()) removes
worlds whose owner is dead: it kills `ip netns pids`, then deletes the namespaces.

    with World(tmpdir, vms=3) as world:
        world.run("vm1", ["hostname"]).stdout          # 'vm1\\n'
        world.start_sshd("vm1")
        world.spawn("site", ["openvpn", ...], log_path)
        world.vm_path("vm1", "/root/.ssh/authorized_keys")

World(..., hosts=("master",)) gives the master a host of its own as well (writable
/etc and /var overlays, private /run, hostname "master"), for daemons that want their
usual paths and name (munged, slurmctld); it keeps the machine's /tmp and /root.

API: World(tmpdir, vms=3, prefix=None, echo=False, hosts=()) with .vms .nodes .hosts
.prefix, up(), down(), ns(node), argv(node, argv, env=None), run(node, argv, ...),
spawn(node, argv, log_path), vm_path(vm, path), holder_pid(node), start_sshd(vm),
stop_sshd(vm), crash(vm); sweep(); the probes can_connect() and peer_address_seen(). Every command is logged as "[#] ..." to
TMPDIR/world.log (and to stderr with echo=True).

Commands in a VM get a clean environment (VM_ENV), like a booted machine. Run Python
there as VM_PYTHON (/usr/bin/python3): a pyenv python lives under the host's /root,
which every VM replaces with its own.

CLI:  python3 tests/world.py selftest [--vms N] [--keep]   build, check, tear down
      python3 tests/world.py sweep                         remove dead runs' leftovers
"""

import atexit
import os
import posixpath
import re
import secrets
import selectors
import shlex
import shutil
import signal
import subprocess
import sys
import time

# === Constants: the topology ===

VM_LAN = "192.168.100.0/24"
NAT_LAN_IP = "192.168.100.1"
NAT_WAN_IP = "203.0.113.2"
SITE_WAN_IP = "203.0.113.1"
SITE_LAN_IP = "10.10.0.1"
MASTER_IP = "10.10.0.5"
STORAGE_IP = "10.10.0.6"
SITE_NODES = ("site", "nat", "master", "storage")


def vm_ip(vm):
    """The LAN address of a VM: vm1 -> 192.168.100.11."""
    return f"192.168.100.{10 + int(vm[2:])}"


# What a VM has of its own. Dirs and files are bind mounts of TMPDIR/vmN/<path>,
# so tests read and write them from the host with vm_path().
PRIVATE_DIRS = ("/root", "/etc/dynfarm", "/etc/ssh", "/etc/cron.d", "/var/lib/dynfarm",
                "/var/log", "/usr/local/sbin", "/usr/local/bin", "/tmp")
PRIVATE_FILES = ("/etc/machine-id",)
# Overlays give the VM a writable /etc and /var (e.g. /etc/hosts, /var/tmp) whose
# changes land in TMPDIR/vmN/.layers and never in the host's files; they also let us
# create mount points such as /etc/dynfarm that the host does not have.
OVERLAID_DIRS = ("/etc", "/var")
DIR_MODES = {"/root": 0o700, "/tmp": 0o1777}

# A clean environment for commands in VMs, as on a freshly booted machine: the
# host's PATH may name things under /root (pyenv), which a VM does not have.
VM_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
          "HOME": "/root", "USER": "root", "LOGNAME": "root", "LANG": "C.UTF-8"}
# The host's /usr/bin/python3 is visible in VMs (read-only); a pyenv one is not.
VM_PYTHON = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable

SSHD = "/usr/sbin/sshd"
PREFIX_RE = re.compile(r"^df[0-9a-f]{5}$")
NETNS_RE = re.compile(r"^(df[0-9a-f]{5})-[a-z0-9]+$")   # the only names we ever delete
OWNER_RE = re.compile(r"dfworld owner=(\d+) start=(\d+)")
# File systems the read-only pass leaves alone: kernel views, not the host's files.
VIRTUAL_FS = {"proc", "sysfs", "devtmpfs", "devpts", "mqueue", "cgroup", "cgroup2",
              "autofs", "binfmt_misc", "tracefs", "debugfs", "securityfs", "pstore",
              "bpf", "configfs", "hugetlbfs", "nsfs", "fusectl", "efivarfs", "rpc_pipefs"}


# === Errors ===

class WorldError(Exception):
    """The world could not be built, or a command in it failed."""


class CommandError(WorldError):
    """A command run in a node exited non-zero (raised by World.run with check=True)."""

    def __init__(self, node, argv, proc):
        self.node, self.argv = node, list(argv)
        self.returncode, self.stdout, self.stderr = proc.returncode, proc.stdout, proc.stderr
        super().__init__(f"[{node}] {_show(self.argv)} exited {proc.returncode}: "
                         f"{(proc.stderr or '').strip() or '(no stderr)'}")


# === Processes and namespaces (shared by World and sweep) ===

def list_netns():
    """Names of all named network namespaces on the machine."""
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def netns_pids(name):
    """Pids of the processes in a network namespace ([] if it is gone)."""
    out = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True).stdout
    return [int(p) for p in out.split() if p.isdigit()]


def _proc_stat(pid):
    """(state, ppid, start ticks) of a process, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[0], int(fields[1]), int(fields[19])


def _alive(pid, start=None):
    """True if pid runs (not a zombie) and, if start is given, is the same process."""
    stat = _proc_stat(pid)
    return bool(stat) and stat[0] not in "ZX" and (start is None or stat[2] == start)


def kill_netns_processes(names, timeout=5.0):
    """SIGKILL every process in these namespaces until none is left; return their pids.

    Repeated because a dying parent may have just forked. Returns once all are dead
    (zombies count as dead: their parent, or pid 1 for orphans, reaps them).
    """
    victims, deadline = set(), time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids = {p for name in names for p in netns_pids(name)} - {os.getpid()}
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        victims |= pids
        time.sleep(0.02)
    while any(_alive(pid) for pid in victims) and time.monotonic() < deadline:
        time.sleep(0.02)
    return victims


def delete_netns(names):
    """`ip netns del` each namespace that still exists; return the ones that would not go."""
    existing = set(list_netns())
    for name in names:
        if name in existing:
            subprocess.run(["ip", "netns", "del", name], capture_output=True, text=True)
    return sorted(set(names) & set(list_netns()))


def _netns_owner(name):
    """(pid, start ticks) recorded on the namespace's lo alias, or None."""
    out = subprocess.run(["ip", "-n", name, "-o", "link", "show", "lo"],
                         capture_output=True, text=True).stdout
    m = OWNER_RE.search(out)
    return (int(m.group(1)), int(m.group(2))) if m else None


def sweep(pattern=NETNS_RE):
    """Remove the namespaces of earlier worlds whose owner process is dead.

    Only names matching both pattern and NETNS_RE (^df[0-9a-f]{5}-...) are ever
    touched, whatever pattern says. A world whose lo alias was never written (crash
    right after `ip netns add`) is judged by the pid its prefix was derived from.
    Returns the deleted names.
    """
    pattern = re.compile(pattern) if isinstance(pattern, str) else pattern
    worlds = {}
    for name in list_netns():
        m = NETNS_RE.match(name)
        if m and pattern.match(name):
            worlds.setdefault(m.group(1), []).append(name)
    swept = []
    for prefix, names in sorted(worlds.items()):
        owners = {o for o in map(_netns_owner, names) if o}
        if any(_alive(pid, start) for pid, start in owners):
            continue
        if not owners and _alive(int(prefix[2:], 16)):
            continue
        kill_netns_processes(names)
        delete_netns(names)
        swept += names
    return swept


# === The world ===

class World:
    """The network of site, nat, master, storage and vm1..vmN (see the module doc)."""

    def __init__(self, tmpdir, vms=3, prefix=None, echo=False, hosts=()):
        """tmpdir: a directory (made if missing) for the VMs' private files and world.log.

        prefix: "df" + 5 hex digits; by default derived from our pid, or a free one.
        echo: also print every command to stderr (the log file always has them).
        hosts: site nodes (e.g. "master") that get a host of their own: writable
        /etc and /var overlays, a private /run and their own hostname, so that
        daemons such as munged and slurmctld find their usual paths and name. They
        keep the machine's other files (/tmp, /root), unlike VMs.
        """
        if not 1 <= vms <= 200:
            raise WorldError(f"vms={vms}: expected 1..200")
        if set(hosts) - {"master", "storage"}:
            raise WorldError(f"hosts={hosts}: expected some of master, storage")
        self.tmpdir = os.path.abspath(tmpdir)
        self.vms = [f"vm{n}" for n in range(1, vms + 1)]
        self.nodes = list(SITE_NODES) + self.vms
        self.hosts = [h for h in SITE_NODES if h in hosts]
        self.prefix = prefix or self._free_prefix()
        if not PREFIX_RE.match(self.prefix):
            raise WorldError(f"prefix {self.prefix!r}: expected df + 5 hex digits, "
                             "so that sweep() can find its leftovers")
        self.echo = echo
        self.log_path = os.path.join(self.tmpdir, "world.log")
        self._owner = (os.getpid(), _proc_stat(os.getpid())[2])
        self._holders = {}   # vm or host -> Popen of its `sleep infinity`
        self._procs = []     # every Popen we started that may outlive a call
        self._sshd = {}      # vm -> Popen of its sshd
        self._state = "new"

    @staticmethod
    def _free_prefix():
        taken = {n.split("-", 1)[0] for n in list_netns()}
        prefix = f"df{os.getpid() & 0xfffff:05x}"
        while prefix in taken:   # a second world in this process, or a pid clash
            prefix = "df" + secrets.token_hex(3)[:5]
        return prefix

    # --- naming ---

    def ns(self, node):
        """The network namespace of a node: 'vm1' -> 'dfa1b2c-vm1'."""
        if node not in self.nodes:
            raise WorldError(f"no node {node!r} in this world (nodes: {', '.join(self.nodes)})")
        return f"{self.prefix}-{node}"

    def _vm_dir(self, vm):
        return os.path.join(self.tmpdir, vm)

    def vm_path(self, vm, path):
        """Host-side path of a VM's private file: ('vm1', '/root/x') -> TMPDIR/vm1/root/x."""
        self._check_vm(vm)
        path = posixpath.normpath(path)
        for private in PRIVATE_DIRS + PRIVATE_FILES:
            if path == private or path.startswith(private + "/"):
                return os.path.join(self._vm_dir(vm), path.lstrip("/"))
        raise WorldError(f"{path} is not one of {vm}'s private paths ({' '.join(PRIVATE_DIRS)}); "
                         f"read it with world.run({vm!r}, ['cat', {path!r}])")

    def _check_vm(self, vm):
        if vm not in self.vms:
            raise WorldError(f"{vm!r} is not a VM of this world ({', '.join(self.vms)})")

    # --- running things ---

    def argv(self, node, argv, env=None):
        """The command line that runs argv inside node.

        VMs and hosts: nsenter into the holder's network, mount and UTS namespaces,
        with the clean VM_ENV (+ env). Other nodes: `ip netns exec`, the caller's
        environment.
        """
        if node in self._holders:
            assigns = [f"{k}={v}" for k, v in {**VM_ENV, **(env or {})}.items()]
            return (["nsenter", "-t", str(self._holders[node].pid), "-n", "-m", "-u", "--",
                     "env", "-i"] + assigns + list(argv))
        if node in self.vms + self.hosts:
            raise WorldError(f"{node} is not running (world not up?)")
        return ["ip", "netns", "exec", self.ns(node)] + list(argv)

    def holder_pid(self, node):
        """The pid whose namespaces are a VM's or host's (for nsenter -t PID -m: its files)."""
        if node not in self._holders:
            raise WorldError(f"{node} is not a running VM or host of this world")
        return self._holders[node].pid

    def _env(self, node, env):
        """subprocess env: VMs carry theirs in argv; the rest inherit ours (+ env)."""
        return None if node in self.vms + self.hosts or not env else {**os.environ, **env}

    def run(self, node, argv, check=True, timeout=60, input=None, env=None):
        """Run argv in node, wait, return CompletedProcess (text, output captured).

        env adds variables (it does not replace the environment). Raises CommandError
        (node, argv, rc, stderr) if check and rc != 0; TimeoutExpired after timeout.
        """
        self._log(f"[{node}] {_show(argv)}")
        proc = subprocess.run(self.argv(node, argv, env), input=input, capture_output=True,
                              text=True, timeout=timeout, env=self._env(node, env))
        if check and proc.returncode != 0:
            raise CommandError(node, argv, proc)
        return proc

    def spawn(self, node, argv, log_path, env=None):
        """Start a background process (a daemon in the foreground) in node.

        stdout and stderr are appended to log_path (a host path). down() kills it.
        It gets its own session, so a Ctrl-C at the terminal leaves it to down().
        """
        self._log(f"[{node}] {_show(argv)} >>{log_path} &")
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(self.argv(node, argv, env), stdin=subprocess.DEVNULL,
                                    stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True, env=self._env(node, env))
        self._procs.append(proc)
        return proc

    def _ip(self, *args, node=None):
        """Run ip(8) in the machine's namespace, or with -n in a node's."""
        argv = ["ip"] + (["-n", self.ns(node)] if node else []) + list(args)
        self._log(shlex.join(argv))
        proc = subprocess.run(argv, capture_output=True, text=True)
        if proc.returncode != 0:
            raise CommandError(node or "machine", argv, proc)

    def _log(self, line):
        try:
            with open(self.log_path, "a") as f:
                f.write(f"[#] {line}\n")
        except OSError:   # tmpdir already removed: cleanup must go on regardless
            pass
        if self.echo:
            print(f"[#] {line}", file=sys.stderr, flush=True)

    # --- up and down ---

    def up(self):
        """Build the world. On any failure, tear down what was built and re-raise."""
        if self._state != "new":
            raise WorldError(f"world {self.prefix} is {self._state}; make a new World")
        self._state = "up"
        atexit.register(self._down_at_exit)
        try:
            sweep()
            taken = [n for n in list_netns() if n.startswith(self.prefix + "-")]
            if taken:
                raise WorldError(f"prefix {self.prefix} is in use by a live world: {taken}")
            self._check_tmpdir()
            os.makedirs(self.tmpdir, exist_ok=True)
            keygens = [self._prepare_vm_files(vm) for vm in self.vms]
            for host in self.hosts:
                self._make_layers(self._vm_dir(host))
            self._make_namespaces()
            self._make_links()
            self._configure_nat()
            self._start_holders()
            for vm, keygen in zip(self.vms, keygens):
                if keygen.wait(timeout=60) != 0:
                    raise WorldError(f"ssh-keygen -A for {vm} failed (see {self.log_path})")
        except BaseException:
            self.down()
            raise
        return self

    def down(self):
        """Kill everything we started and every process in our namespaces, delete them.

        Idempotent. Does not remove tmpdir (keep it for debugging; the caller owns it).
        Raises WorldError only if a namespace of ours still exists afterwards.
        """
        if self._state in ("new", "down"):
            return
        self._state = "down"
        self._terminate(self._procs)
        names = [self.ns(node) for node in self.nodes]
        kill_netns_processes(names)
        self._terminate(self._procs)   # reap the holders and anything that lingered
        self._holders.clear()   # argv() must not nsenter a pid that may be reused
        left = delete_netns(names)
        self._log(f"down: deleted {', '.join(names)}")
        atexit.unregister(self._down_at_exit)
        if left:
            raise WorldError(f"namespaces still present after down(): {left}")

    def _down_at_exit(self):
        if os.getpid() == self._owner[0]:   # not in a forked child
            self.down()

    @staticmethod
    def _terminate(procs, grace=2.0):
        """SIGTERM the running ones, give them grace seconds together, then SIGKILL."""
        running = [p for p in procs if p.poll() is None]
        for p in running:
            _signal(p, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for p in running:
            try:
                p.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal(p, signal.SIGKILL)
                p.wait()

    def __enter__(self):
        return self.up()

    def __exit__(self, *exc):
        self.down()

    # --- building: files ---

    def _check_tmpdir(self):
        real = os.path.realpath(self.tmpdir)
        for layer in OVERLAID_DIRS:
            if real == layer or real.startswith(layer + "/"):
                raise WorldError(f"tmpdir {real} is inside {layer}, which VMs overlay; "
                                 "use a directory elsewhere (e.g. under /tmp)")
        if re.search(r"[,:\s\\]", real):
            raise WorldError(f"tmpdir {real}: no commas, colons or spaces (overlay options)")
        for target in PRIVATE_DIRS:   # bind targets the overlays cannot create for us
            if not target.startswith(tuple(d + "/" for d in OVERLAID_DIRS)) \
                    and not os.path.isdir(target):
                raise WorldError(f"the host has no {target}: a VM cannot mount over it")

    def _prepare_vm_files(self, vm):
        """Make TMPDIR/vmN: private dirs, /etc/ssh config, machine-id. Start ssh-keygen."""
        base = self._vm_dir(vm)
        if os.path.exists(base):
            raise WorldError(f"{base} exists: give each World a fresh tmpdir")
        os.makedirs(base, mode=0o755)
        for d in PRIVATE_DIRS:
            os.makedirs(base + d, exist_ok=True)
            os.chmod(base + d, DIR_MODES.get(d, 0o755))
        self._make_layers(base)
        with open(base + "/etc/machine-id", "w") as f:
            f.write(secrets.token_hex(16) + "\n")
        os.chmod(base + "/etc/machine-id", 0o444)
        # The host's ssh configuration, but never its host keys: each VM is its own machine.
        for name in sorted(os.listdir("/etc/ssh")):
            src, dst = os.path.join("/etc/ssh", name), os.path.join(base + "/etc/ssh", name)
            if name.endswith(".d") and os.path.isdir(src):
                shutil.copytree(src, dst, symlinks=True)
            elif name in ("sshd_config", "ssh_config", "moduli"):
                shutil.copy2(src, dst)
        # Run in the background: the RSA key takes most of a second.
        argv = ["ssh-keygen", "-q", "-A", "-f", base]
        self._log(shlex.join(argv))
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        self._procs.append(proc)
        return proc

    @staticmethod
    def _make_layers(base):
        for layer in OVERLAID_DIRS:
            for part in ("upper", "work"):
                os.makedirs(f"{base}/.layers{layer}/{part}")

    # --- building: network ---

    def _make_namespaces(self):
        owner = "dfworld owner=%d start=%d" % self._owner
        for node in self.nodes:
            self._ip("netns", "add", self.ns(node))
            # The owner tag first, so that sweep() can judge this namespace from now on.
            self._ip("link", "set", "lo", "up", "alias", owner, node=node)

    def _link_plan(self):
        """(node, ifname, node, ifname) for each veth, and bridges {(node, br): ports}."""
        veths = [("nat", "wan", "site", "wan"),
                 ("site", "lan-master", "master", "eth0"),
                 ("site", "lan-storage", "storage", "eth0")]
        veths += [("nat", f"lan-{vm}", vm, "eth0") for vm in self.vms]
        bridges = {("nat", "br-lan"): [f"lan-{vm}" for vm in self.vms],
                   ("site", "br-site"): ["lan-master", "lan-storage"]}
        return veths, bridges

    def _address_plan(self):
        """{node: [(dev, cidr)]} and {node: default gateway}."""
        addresses = {"nat": [("br-lan", NAT_LAN_IP + "/24"), ("wan", NAT_WAN_IP + "/24")],
                     "site": [("wan", SITE_WAN_IP + "/24"), ("br-site", SITE_LAN_IP + "/24")],
                     "master": [("eth0", MASTER_IP + "/24")],
                     "storage": [("eth0", STORAGE_IP + "/24")]}
        gateways = {"nat": SITE_WAN_IP}
        for vm in self.vms:
            addresses[vm] = [("eth0", vm_ip(vm) + "/24")]
            gateways[vm] = NAT_LAN_IP
        return addresses, gateways

    def _make_links(self):
        veths, bridges = self._link_plan()
        for i, (a, a_name, b, b_name) in enumerate(veths):
            # Born inside the namespaces under unique names, then renamed there.
            tmp_a, tmp_b = f"{self.prefix}a{i}", f"{self.prefix}b{i}"
            self._ip("link", "add", tmp_a, "netns", self.ns(a), "type", "veth",
                     "peer", "name", tmp_b, "netns", self.ns(b))
            self._ip("link", "set", tmp_a, "name", a_name, node=a)
            self._ip("link", "set", tmp_b, "name", b_name, node=b)
        for (node, bridge), ports in bridges.items():
            self._ip("link", "add", bridge, "type", "bridge", "forward_delay", "0", node=node)
            for port in ports:
                self._ip("link", "set", port, "master", bridge, node=node)
        addresses, gateways = self._address_plan()
        for node, pairs in addresses.items():
            for dev, cidr in pairs:
                self._ip("addr", "add", cidr, "dev", dev, node=node)
        for a, a_name, b, b_name in veths:
            self._ip("link", "set", a_name, "up", node=a)
            self._ip("link", "set", b_name, "up", node=b)
        for node, bridge in bridges:
            self._ip("link", "set", bridge, "up", node=node)
        for node, gateway in gateways.items():
            self._ip("route", "add", "default", "via", gateway, node=node)

    def _configure_nat(self):
        """A home router: masquerade the LAN, let in only replies to what it opened."""
        rules = "\n".join([
            "*nat",
            f"-A POSTROUTING -s {VM_LAN} -o wan -j MASQUERADE",
            "COMMIT",
            "*filter",
            ":FORWARD DROP [0:0]",
            "-A FORWARD -i br-lan -o wan -j ACCEPT",
            # VM to VM, in case br_netfilter sends bridged frames through iptables.
            "-A FORWARD -i br-lan -o br-lan -j ACCEPT",
            "-A FORWARD -i wan -o br-lan -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT",
            "COMMIT", ""])
        self.run("nat", ["iptables-restore"], input=rules)
        self.run("nat", ["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"])

    # --- building: the VMs' machines ---

    def _holder_script(self, vm):
        """The sh script that makes a VM's (or host's) mount and UTS namespaces, then sleeps."""
        base = self._vm_dir(vm)
        q = shlex.quote
        lines = ["set -e",
                 # Drop our copies of the machine's /run/netns mounts: they would hold the
                 # other namespaces alive and make `ip netns del` fail with EBUSY.
                 "if mountpoint -q /run/netns; then umount -R -l /run/netns; fi"]
        if vm in self.hosts:
            return "\n".join(lines + self._overlay_lines(base) + self._identity_lines(vm)
                             + ['echo "ready $$"', "exec sleep infinity </dev/null >/dev/null 2>&1"])
        lines += self._overlay_lines(base)
        # Mount points the host may lack; they land in the overlays, not on the host.
        lines += [f"mkdir -p {d}" for d in PRIVATE_DIRS if d.startswith(("/etc/", "/var/"))]
        lines += [f"[ -e {f} ] || : > {f}" for f in PRIVATE_FILES]
        # A target that hides our own tmpdir (/tmp for /tmp/pytest-...) goes last.
        real = os.path.realpath(base)
        targets = sorted(PRIVATE_DIRS + PRIVATE_FILES,
                         key=lambda t: real == t or real.startswith(t + "/"))
        lines += [f"mount --bind {q(base + t)} {t}" for t in targets]
        lines += self._identity_lines(vm)
        # Last: the rest of the host read-only (per-mount flag, this namespace only).
        lines += [f"mount -o remount,bind,ro {q(t)}" for t in self._host_mounts_to_freeze()]
        lines += ['echo "ready $$"', "exec sleep infinity </dev/null >/dev/null 2>&1"]
        return "\n".join(lines)

    @staticmethod
    def _overlay_lines(base):
        q, lines = shlex.quote, []
        for layer in OVERLAID_DIRS:
            up, work = f"{base}/.layers{layer}/upper", f"{base}/.layers{layer}/work"
            lines.append(f"mount -t overlay overlay -o "
                         f"lowerdir={layer},upperdir={q(up)},workdir={q(work)} {layer}")
        return lines

    @staticmethod
    def _identity_lines(node):
        """A private /run, the node's hostname, and that name resolving without DNS."""
        return ["mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs /run",
                "mkdir -m 0755 /run/sshd",
                "mkdir -m 1777 /run/lock",
                f"hostname {node}",
                f"echo {node} > /etc/hostname",
                # There is no resolver in the world.
                f"printf '127.0.1.1\\t{node}\\n' >> /etc/hosts"]

    @staticmethod
    def _host_mounts_to_freeze():
        """Mount points of the host's real, writable file systems outside our mounts."""
        ours = PRIVATE_DIRS + PRIVATE_FILES + OVERLAID_DIRS + ("/run", "/proc", "/sys", "/dev")
        targets = []
        with open("/proc/self/mountinfo") as f:
            for line in f:
                left, right = line.split(" - ")
                fields, fstype = left.split(), right.split()[0]
                target = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
                if fstype in VIRTUAL_FS or "ro" in fields[5].split(","):
                    continue
                if any(target == o or target.startswith(o + "/") for o in ours if o != "/"):
                    continue
                if target not in targets:
                    targets.append(target)
        return sorted(targets, key=len)

    def _start_holders(self, timeout=20):
        """Start every VM's and host's holder at once, then wait for each to say "ready PID"."""
        for vm in self.vms + self.hosts:
            argv = ["ip", "netns", "exec", self.ns(vm), "unshare", "--mount", "--uts",
                    "--propagation", "private", "sh", "-c", self._holder_script(vm), vm]
            self._log(f"[{vm}] holder: unshare --mount --uts sh -c <mounts>; exec sleep infinity")
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, start_new_session=True)
            self._procs.append(proc)
            self._holders[vm] = proc
        deadline = time.monotonic() + timeout
        for vm, proc in self._holders.items():
            line = _read_line(proc.stdout, deadline)
            if line != f"ready {proc.pid}":
                # ip netns exec, unshare and sh exec each other: the pid must stay the same.
                err = proc.stderr.read().decode(errors="replace") if proc.poll() is not None else ""
                raise WorldError(f"{vm}: holder did not come up (said {line!r}): {err.strip()}")
            proc.stdout.close()
            proc.stderr.close()

    # --- sshd ---

    def start_sshd(self, vm, timeout=10):
        """Start the VM's own sshd (its /etc/ssh/sshd_config); wait until port 22 answers.

        Runs `sshd -D -e`: in the foreground as our child, so down() and stop_sshd()
        can stop it by pid; it logs to the VM's /var/log/sshd.log.
        """
        self._check_vm(vm)
        if vm in self._sshd and self._sshd[vm].poll() is None:
            return self._sshd[vm]
        log = self.vm_path(vm, "/var/log/sshd.log")
        proc = self.spawn(vm, [SSHD, "-D", "-e", "-f", "/etc/ssh/sshd_config"], log)
        self._sshd[vm] = proc
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise WorldError(f"{vm}: sshd exited {proc.returncode}: {_tail(log)}")
            banner = self.run(vm, [VM_PYTHON, "-c", PROBE, "127.0.0.1", "22", "0.5"],
                              check=False).stdout
            if banner.startswith("SSH-"):
                return proc
            if time.monotonic() > deadline:
                self.stop_sshd(vm)
                raise WorldError(f"{vm}: sshd not answering on port 22 after {timeout}s: "
                                 f"{_tail(log)}")

    def crash(self, vm, timeout=10):
        """Kill every process of a VM but its holder and sshd: what its daemons see of
        a power cut. Its files stay, as a disk does."""
        keep = {self.holder_pid(vm)} | ({self._sshd[vm].pid} if vm in self._sshd else set())
        self._log(f"[{vm}] crash: kill all but {sorted(keep)}")
        deadline = time.monotonic() + timeout
        while True:
            victims = set(netns_pids(self.ns(vm))) - keep
            if not victims:
                return
            if time.monotonic() > deadline:
                raise WorldError(f"{vm}: processes {sorted(victims)} survive SIGKILL")
            for pid in victims:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.05)

    def stop_sshd(self, vm):
        """Stop the VM's sshd listener (open sessions live on, as with a real sshd)."""
        proc = self._sshd.pop(vm, None)
        if proc:
            self._log(f"[{vm}] stop sshd {proc.pid}")
            self._terminate([proc])


def _show(argv):
    """argv for the log, with inline scripts (python3 -c '...') shortened."""
    return shlex.join(a if "\n" not in a else f"<{a.count(chr(10))}-line script>" for a in argv)


def _signal(proc, sig):
    try:
        proc.send_signal(sig)
    except ProcessLookupError:
        pass


def _read_line(stream, deadline):
    """One line from a pipe, or '' at EOF or deadline."""
    sel = selectors.DefaultSelector()
    sel.register(stream, selectors.EVENT_READ)
    data = b""
    while not data.endswith(b"\n") and sel.select(max(0.0, deadline - time.monotonic())):
        chunk = os.read(stream.fileno(), 1)
        if not chunk:
            break
        data += chunk
    sel.close()
    return data.decode(errors="replace").strip()


def _tail(path, lines=5):
    try:
        with open(path, errors="replace") as f:
            return " | ".join(f.read().strip().splitlines()[-lines:]) or "(empty log)"
    except OSError:
        return f"(no log at {path})"


# === Checks: small probes for tests and the selftest ===

# Connect to HOST PORT, retrying for up to WAIT seconds; print what the server says
# first (an sshd banner, or nothing). Exit 1 if no connection was made.
PROBE = r"""
import socket, sys, time
host, port, wait = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
deadline = time.monotonic() + wait
while True:
    try:
        s = socket.create_connection((host, port), timeout=max(0.2, deadline - time.monotonic()))
        break
    except OSError as e:
        if time.monotonic() >= deadline:
            sys.exit(f"{host}:{port}: {e}")
        time.sleep(0.05)
s.settimeout(0.5)
try:
    print(s.recv(256).decode("ascii", "replace").strip())
except OSError:
    print()
"""

# Listen on ADDRESS PORT, say "ready", accept one connection within WAIT seconds and
# print the peer's address: what this node sees as the source.
ACCEPT_ONCE = r"""
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen(1)
s.settimeout(float(sys.argv[3]))
print("ready", flush=True)
conn, peer = s.accept()
print(peer[0], flush=True)
conn.close()
"""


def can_connect(world, node, host, port, wait=2.0):
    """True if node opens a TCP connection to host:port within wait seconds."""
    argv = [VM_PYTHON, "-c", PROBE, host, str(port), str(wait)]
    return world.run(node, argv, check=False, timeout=wait + 30).returncode == 0


def peer_address_seen(world, server, address, client, port=4000, wait=5.0):
    """Listen in server on address:port, connect from client: the source address seen.

    Returns None if no connection arrived.
    """
    argv = world.argv(server, [VM_PYTHON, "-c", ACCEPT_ONCE, address, str(port), str(wait)])
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                          text=True) as listener:
        if listener.stdout.readline().strip() != "ready":
            raise WorldError(f"{server}: could not listen on {address}:{port}")
        can_connect(world, client, address, port, wait)
        peer = listener.stdout.readline().strip()
        listener.wait(timeout=wait + 5)
    return peer or None


# === CLI ===

def selftest(vms=3, keep=False):
    """Build a world, print what works, tear it down. Returns an exit code."""
    import tempfile
    tmpdir = tempfile.mkdtemp(prefix="dfworld-")
    failures = []

    def check(what, ok):
        print(f"{'ok  ' if ok else 'FAIL'} {what}", flush=True)
        if not ok:
            failures.append(what)

    world = World(tmpdir, vms=vms, echo=True)
    started = time.monotonic()
    world.up()
    print(f"up: {time.monotonic() - started:.2f}s, prefix {world.prefix}, tmpdir {tmpdir}")
    try:
        names = [world.run(vm, ["hostname"]).stdout.strip() for vm in world.vms]
        check(f"hostnames {names}", names == world.vms)
        ids = {open(world.vm_path(vm, "/etc/machine-id")).read() for vm in world.vms}
        check("machine-ids differ", len(ids) == len(world.vms))
        check("vm1 -> site 203.0.113.1 seen as 203.0.113.2 (NAT)",
              peer_address_seen(world, "site", SITE_WAN_IP, "vm1") == NAT_WAN_IP)
        world.start_sshd("vm1")
        banner = world.run("vm1", [VM_PYTHON, "-c", PROBE, "127.0.0.1", "22", "2"]).stdout
        check(f"vm1 sshd: {banner.strip()}", banner.startswith("SSH-"))
        if "vm2" in world.vms:
            check("vm2 -> vm1:22 on the LAN", can_connect(world, "vm2", vm_ip("vm1"), 22))
        check("site -/-> vm1:22", not can_connect(world, "site", vm_ip("vm1"), 22, 1))
        check("master -> site 10.10.0.1",
              peer_address_seen(world, "site", SITE_LAN_IP, "master") == MASTER_IP)
        check("vm1 cannot write the host's /usr",
              world.run("vm1", ["touch", "/usr/dfworld-probe"], check=False).returncode != 0)
    finally:
        started = time.monotonic()
        world.down()
        print(f"down: {time.monotonic() - started:.2f}s")
    left = [n for n in list_netns() if n.startswith(world.prefix + "-")]
    check("no namespace left", not left)
    if keep or failures:
        print(f"kept {tmpdir}")
    else:
        shutil.rmtree(tmpdir)
    return 1 if failures else 0


def main(argv=None):
    import argparse
    parser = argparse.ArgumentParser(prog="world.py", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    st = sub.add_parser("selftest", help="build a world, check it, tear it down")
    st.add_argument("--vms", type=int, default=3)
    st.add_argument("--keep", action="store_true", help="keep the temp dir")
    sub.add_parser("sweep", help="remove leftovers of dead runs")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("world.py: needs root (network namespaces)", file=sys.stderr)
        return 2
    # Let a kill (SIGTERM) run the atexit cleanup too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    if args.command == "sweep":
        for name in sweep():
            print(f"deleted {name}")
        return 0
    return selftest(args.vms, args.keep)


if __name__ == "__main__":
    sys.exit(main())
