#!/usr/bin/env python3
"""Fan-out over ssh: `remote_control run` beside clush and pssh, same run, same checks.

Topology (everything inside a private network, PID and mount namespace made
for this run, gone when it ends):

    remote_control / clush / pssh --ssh x fan-out--> 127.0.0.1 ... 127.0.x.y
                                                       (all of 127/8 is lo)
                                                            |
                                                     one sshd, 0.0.0.0:22,
                                                     its own config, host key,
                                                     authorized_keys (temp dir)

For N = 10, 100, 300 distinct loopback addresses (the VMs' stand-ins), each
tool runs `true` on every address with a fan-out of 64, its own defaults
otherwise, and the same identity and host-key check: one ed25519 client key,
StrictHostKeyChecking=yes against a known_hosts file holding the sshd's host
key for each address (remote_control writes its own from its database, which
this bench fills with dynfarm's Store), BatchMode, `-F /dev/null` so that no
ssh_config on the machine (Debian's turns GSSAPI on) favours one tool. Then
remote_control --reuse twice: the first run opens the ControlMasters, the
second, the one timed, reuses them (TMPDIR points into the bench's temp dir, so
their sockets never land in the machine's /tmp; they are closed before the next
N). sshd sees an empty /root: `bash -c true` would otherwise source this
machine's ~/.bashrc for every connection, which measures the machine, not ssh.

Printed per N and tool: wall seconds, ratio to the faster of clush and pssh,
CPU (client + sshd), CPU per connection, core utilization, the largest
process's max RSS (wait4's ru_maxrss: for remote_control, its Python process),
the peak summed RSS of the tool's whole process tree (sampled from /proc every
0.1 s; shared pages are counted once per process), and failures. The ssh CPU
per connection gives this machine's floor: N * cpu / cores seconds.

clush (ClusterShell) and pssh are installed for this bench only, in a
throwaway venv (/tmp/dynfarm-bench-venv): PyPI's `pssh` 2.3.1 is Python 2 code,
so Debian's pssh (`parallel-ssh`, Python 3) is unpacked there with `dpkg -x`,
not installed on the system. Needs root (namespaces), openssh-server, and
PyPI and Debian's archive for the first run.

Usage: bench/fanout.py [-n 10,100,300] [-f 64] [--rounds R] [--dynfarm PATH]
"""

import argparse
import glob
import json
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import dynfarm  # noqa: E402

VENV = "/tmp/dynfarm-bench-venv"
DEB_ROOT = os.path.join(VENV, "deb", "root")
TICK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
SAMPLE_EVERY = 0.1


def say(text):
    print(text, flush=True)


# --- the tools, installed for the bench only ---

def ensure_tools():
    """{'clush': argv prefix, 'pssh': argv prefix, 'pssh_env': env, 'pssh_from': text}."""
    if not os.path.exists(os.path.join(VENV, "bin", "python")):
        say(f"[bench] making the throwaway venv {VENV}")
        subprocess.run([sys.executable, "-m", "venv", VENV], check=True)
    pip = [os.path.join(VENV, "bin", "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    if not os.path.exists(os.path.join(VENV, "bin", "clush")):
        say("[bench] pip install ClusterShell (for clush)")
        subprocess.run(pip + ["ClusterShell"], check=True)
    tools = {"clush": [os.path.join(VENV, "bin", "clush")]}
    pypi_pssh = os.path.join(VENV, "bin", "pssh")
    if not os.path.isdir(DEB_ROOT):
        if not os.path.exists(pypi_pssh):
            say("[bench] pip install pssh")
            subprocess.run(pip + ["pssh"], check=False)
        if os.path.exists(pypi_pssh) and subprocess.run([pypi_pssh, "--version"], capture_output=True).returncode == 0:
            tools["pssh"], tools["pssh_env"] = [pypi_pssh], {}
            tools["pssh_from"] = "PyPI pssh (venv)"
            return tools
        say("[bench] PyPI's pssh does not run on this Python 3; unpacking Debian's pssh into the venv")
        fetch_debian_pssh()
    # Debian's interpreter, as the package expects (and no pyenv shim on the way)
    python = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
    tools["pssh"] = [python, os.path.join(DEB_ROOT, "usr", "bin", "parallel-ssh")]
    tools["pssh_env"] = {"PYTHONPATH": os.path.join(DEB_ROOT, "usr", "lib", "python3", "dist-packages")}
    tools["pssh_from"] = "Debian's pssh package (parallel-ssh), unpacked with dpkg -x into the venv"
    return tools


def fetch_debian_pssh():
    where = os.path.dirname(DEB_ROOT)
    os.makedirs(where, exist_ok=True)
    get = ["apt-get", "download", "-q", "pssh", "python3-psshlib"]
    if subprocess.run(get, cwd=where, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update", "-qq"], check=True)
        subprocess.run(get, cwd=where, check=True, capture_output=True)
    for deb in glob.glob(os.path.join(where, "*.deb")):
        subprocess.run(["dpkg", "-x", deb, DEB_ROOT], check=True)


def version_of(argv, env=None):
    done = subprocess.run(argv, capture_output=True, text=True, env=env)
    return (done.stdout + done.stderr).strip().splitlines()[0]


# --- the stage: keys, sshd, the site ---

def make_keys(tmp):
    for name in ("host", "admin"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "", "-f", os.path.join(tmp, name)],
                       check=True)
    host_key = " ".join(read(os.path.join(tmp, "host.pub")).split()[:2])
    os.rename(os.path.join(tmp, "admin.pub"), os.path.join(tmp, "authorized_keys"))
    return host_key


def start_sshd(tmp):
    """One sshd for every 127.0.x.y; its PID (ours to stop)."""
    conf = os.path.join(tmp, "sshd_config")
    with open(conf, "w") as f:
        f.write(f"""ListenAddress 0.0.0.0:22
HostKey {tmp}/host
PidFile {tmp}/sshd.pid
AuthorizedKeysFile {tmp}/authorized_keys
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
PubkeyAuthentication yes
UsePAM no
UseDNS no
StrictModes no
MaxStartups 1000:30:1000
MaxSessions 1000
LogLevel ERROR
""")
    # sshd gets a mount namespace of its own: /run/sshd (its privilege-separation
    # directory) on a tmpfs, and an empty /root, because `bash -c CMD` started by
    # sshd sources ~/.bashrc, and this machine's runs `pyenv init` (~0.1 s of CPU
    # per connection): the figures are for ssh, not for this machine's shell setup.
    # The exec keeps the PID: the one we stop is sshd itself.
    setup = ("mount -t tmpfs -o mode=0755 bench-run /run && mkdir -m 0755 /run/sshd && "
             "mount -t tmpfs -o mode=0700 bench-home /root && exec \"$@\"")
    sshd = ["unshare", "--mount", "--propagation", "private", "--", "/bin/sh", "-c", setup, "sh", "/usr/sbin/sshd"]
    subprocess.run(sshd + ["-t", "-f", conf], check=True)
    proc = subprocess.Popen(sshd + ["-D", "-e", "-f", conf], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=open(os.path.join(tmp, "sshd.log"), "w"))
    deadline = time.monotonic() + 10
    while True:
        try:
            with socket.create_connection(("127.0.0.1", 22), timeout=1) as s:
                if s.recv(64).startswith(b"SSH-2.0"):
                    return proc
        except OSError:
            pass
        if time.monotonic() > deadline or proc.poll() is not None:
            sys.exit(f"bench: sshd did not start; see {tmp}/sshd.log")
        time.sleep(0.05)


def addresses(n):
    """127.0.0.1, 127.0.0.2, ... 127.0.0.254, 127.0.1.1, ...: n distinct ones."""
    return [f"127.0.{i // 254}.{i % 254 + 1}" for i in range(n)]


def make_site(tmp, n, host_key):
    """A site whose database holds n hosts at n loopback addresses; its config path."""
    base = os.path.join(tmp, f"n{n}")
    os.makedirs(os.path.join(base, "s", "run"), mode=0o700)
    conf = os.path.join(base, "site.conf")
    with open(conf, "w") as f:
        f.write(f"[site]\nstate_dir = s\nlisten = 127.0.0.1:8443\npublic_address = 127.0.0.1\n"
                f"ssh_keys = {tmp}/authorized_keys\nssh_identity = {tmp}/admin\nmode = routed\n\n"
                "[provider:bench]\nvpn_port = 1194\nvpn_subnet = 10.99.0.0/22\n")
    config = dynfarm.load_config(conf)
    store = dynfarm.Store(config.state.database)
    store.create()
    with store.transaction():
        for seq, address in enumerate(addresses(n), 1):
            name = dynfarm.host_name("bench", seq)
            store.add_host(name, "bench", seq, address, f"{seq:064x}",
                           dynfarm.enrollment_record(f"{seq:x}", f"machine{seq}", name, [host_key], {}, "bench"))
    store.close()
    with open(os.path.join(base, "known_hosts"), "w") as f:
        f.writelines(f"{a} {host_key}\n" for a in addresses(n))
    with open(os.path.join(base, "hosts"), "w") as f:
        f.writelines(a + "\n" for a in addresses(n))
    return conf


def common_ssh_options(tmp, n):
    """What clush and pssh get so their ssh checks exactly what remote_control's does."""
    return ["-F", "/dev/null", "-i", f"{tmp}/admin", "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
            "-o", "StrictHostKeyChecking=yes", "-o", f"UserKnownHostsFile={tmp}/n{n}/known_hosts",
            "-o", "GlobalKnownHostsFile=/dev/null", "-o", "User=root"]


def tool_argv(tool, tools, dynfarm_py, tmp, n, fanout, reuse=False):
    if tool == "remote_control":
        return [sys.executable, dynfarm_py, "-c", f"{tmp}/n{n}/site.conf", "remote_control", "--all",
                "-f", str(fanout)] + (["--reuse"] if reuse else []) + ["run", "--", "true"]
    options = common_ssh_options(tmp, n)
    if tool == "clush":
        return tools["clush"] + ["-f", str(fanout), "-l", "root", "-o", " ".join(options),
                                 "-w", ",".join(addresses(n)), "true"]
    if tool == "pssh":
        return tools["pssh"] + ["-p", str(fanout), "-l", "root", "-h", f"{tmp}/n{n}/hosts",
                                "-x", " ".join(options), "true"]
    raise ValueError(tool)


def count_failures(tool, n, rc, out, err):
    """(failures, note): every host must succeed."""
    if tool == "remote_control":
        m = re.search(r"^(\d+) ok, .*$", err, re.M)
        if not m:
            return n, f"no summary line (exit {rc})"
        return n - int(m.group(1)), m.group(0) if int(m.group(1)) != n else ""
    if tool == "pssh":
        ok = len(re.findall(r"\[SUCCESS\]", out))
        return n - ok, "" if ok == n else f"exit {rc}: " + "; ".join(re.findall(r"\[FAILURE\].*", out)[:3])
    bad = set(re.findall(r"^(?:clush: )?(127\.\d+\.\d+\.\d+)\b", err, re.M))
    if rc != 0 and not bad:
        return n, f"exit {rc}: {err.strip()[:200]}"
    return len(bad), "" if not bad else f"exit {rc}: " + "; ".join(err.strip().splitlines()[:3])


# --- measuring: CPU and memory of everything in our PID namespace ---

def proc_table():
    """{pid: (ppid, own + reaped children's CPU s, rss bytes)} for every process but us (PID 1)."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or entry == "1":
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        table[int(entry)] = (int(fields[1]), sum(int(x) for x in fields[11:15]) / TICK, int(fields[21]) * PAGE)
    return table


def subtree(table, root):
    members, grew = {root}, True
    while grew:
        more = {pid for pid, row in table.items() if row[0] in members} - members
        members |= more
        grew = bool(more)
    return members & set(table) | {root}


def cpu_split(sshd_pid):
    """(client CPU s, sshd CPU s) so far: live processes, plus the ones we reaped."""
    table = proc_table()
    server = subtree(table, sshd_pid)
    client = sum(row[1] for pid, row in table.items() if pid not in server)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return client + kids.ru_utime + kids.ru_stime, sum(table[p][1] for p in server if p in table)


class TreeMemory(threading.Thread):
    """Peak summed RSS of every process outside sshd's tree (the tool, its ssh, masters)."""

    def __init__(self, sshd_pid):
        super().__init__(daemon=True)
        self.sshd_pid = sshd_pid
        self.peak = 0
        self.stopping = threading.Event()

    def run(self):
        while not self.stopping.is_set():
            table = proc_table()
            server = subtree(table, self.sshd_pid)
            self.peak = max(self.peak, sum(row[2] for pid, row in table.items() if pid not in server))
            self.stopping.wait(SAMPLE_EVERY)

    def stop(self):
        self.stopping.set()
        self.join()
        return self.peak


def measure(argv, tmp, label, sshd_pid, timeout, env=None):
    """Run one tool once, bounded; its figures."""
    out_path, err_path = (os.path.join(tmp, f"{label}.{s}") for s in ("out", "err"))
    memory = TreeMemory(sshd_pid)
    memory.start()
    cpu_before = cpu_split(sshd_pid)
    started = time.monotonic()
    with open(out_path, "w") as out, open(err_path, "w") as err:
        # TMPDIR: remote_control --reuse keeps its control sockets under it; the
        # bench's own temp dir keeps them away from the machine's /tmp.
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err, start_new_session=True,
                                env=dict(os.environ, TMPDIR=tmp, **(env or {})))
    timer = threading.Timer(timeout, kill_group, (proc.pid,))
    timer.daemon = True
    timer.start()
    try:
        # WNOWAIT: the tool is a zombie now, its own CPU still readable apart from its children's
        os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)
    finally:
        timer.cancel()
        memory.stopping.set()
    wall = time.monotonic() - started
    with open(f"/proc/{proc.pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    driver_cpu = (int(fields[11]) + int(fields[12])) / TICK
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    kill_group(proc.pid)    # stragglers of the group, if any (masters have their own session)
    time.sleep(0.3)         # let sshd reap the sessions this run closed
    client, server = (after - before for after, before in zip(cpu_split(sshd_pid), cpu_before))
    peak = memory.stop()
    return {"wall": wall, "rc": proc.returncode, "timed_out": wall >= timeout,
            "cpu_client": client, "cpu_server": server, "cpu_driver": driver_cpu,
            "maxrss": usage.ru_maxrss * 1024, "tree_rss": peak,
            "out": read(out_path), "err": read(err_path)}


def kill_group(pid):
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def read(path):
    with open(path, errors="replace") as f:
        return f.read()


# --- the run ---

def bench(args, tools):
    tmp = args.tmp      # made and removed by the outer process, which outlives the namespace
    sshd = None
    try:
        subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
        host_key = make_keys(tmp)
        sshd = start_sshd(tmp)
        say(f"[bench] sshd pid {sshd.pid} on 0.0.0.0:22 in a private namespace; temp dir {tmp}")
        cores = os.cpu_count()
        rows = []
        for n in args.n:
            make_site(tmp, n, host_key)
            say(f"[bench] N={n}: site with {n} hosts (127.0.0.1 .. {addresses(n)[-1]})")
            runs = {}
            order = ["remote_control", "clush", "pssh"]
            for r in range(args.rounds):
                for tool in order[r % 3:] + order[:r % 3]:       # rotate, so no tool always goes first
                    env = tools.get("pssh_env") if tool == "pssh" else None
                    argv = tool_argv(tool, tools, args.dynfarm, tmp, n, args.fanout)
                    res = measure(argv, tmp, f"n{n}.{tool}.{r}", sshd.pid, args.timeout, env)
                    res["failures"], res["note"] = count_failures(tool, n, res["rc"], res["out"], res["err"])
                    runs.setdefault(tool, []).append(res)
                    say(f"[bench] N={n} {tool:<15} {res['wall']:7.2f} s  exit {res['rc']}  "
                        f"{res['failures']} failed {res['note']}")
                for label in ("warm", "timed"):
                    argv = tool_argv("remote_control", tools, args.dynfarm, tmp, n, args.fanout, reuse=True)
                    res = measure(argv, tmp, f"n{n}.reuse-{label}.{r}", sshd.pid, args.timeout)
                    res["failures"], res["note"] = count_failures("remote_control", n, res["rc"], res["out"],
                                                                  res["err"])
                    runs.setdefault(f"remote_control --reuse ({label})", []).append(res)
                    say(f"[bench] N={n} --reuse {label:<7} {res['wall']:7.2f} s  exit {res['rc']}  "
                        f"{res['failures']} failed {res['note']}")
                close_masters(tmp)
            rows.append((n, {tool: pick_median(results) for tool, results in runs.items()}))
        report(rows, cores, args)
        return 0 if all(res["failures"] == 0 for _, runs in rows for res in runs.values()) else 1
    finally:
        close_masters(tmp)
        if sshd is not None:
            sshd.terminate()
            try:
                sshd.wait(5)
            except subprocess.TimeoutExpired:
                sshd.kill()
                sshd.wait()
        end_namespace_processes()


def close_masters(tmp):
    """Tell each ControlMaster to exit: they outlive the run by design, and the
    next N would reuse them (the socket name hashes only the address)."""
    sockets = (glob.glob(os.path.join(tmp, "dynfarm-ssh-*", "*"))       # remote_control's control_dir()
               + glob.glob(os.path.join(tmp, "n*", "s", "run", "cm-*")))  # where it kept them before
    procs = [subprocess.Popen(["ssh", "-F", "/dev/null", "-o", f"ControlPath={path}", "-O", "exit", "bench"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for path in sockets]
    for proc in procs:
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if sockets:
        time.sleep(0.5)
        reap_orphans()


def reap_orphans():
    """Masters that exited were re-parented to us (PID 1 here): reap them.
    Only called when no child of ours but sshd is running."""
    while True:
        try:
            if os.waitpid(-1, os.WNOHANG)[0] == 0:
                return
        except ChildProcessError:
            return


def end_namespace_processes():
    """Everything left in our PID namespace was started by this bench: end it by PID, reap it."""
    for pid in proc_table():
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    while True:
        try:
            if os.waitpid(-1, 0)[0] == 0:
                break
        except ChildProcessError:
            break


def pick_median(results):
    """The round with the median wall time (all rounds' failures still show)."""
    ordered = sorted(results, key=lambda r: r["wall"])
    chosen = dict(ordered[(len(ordered) - 1) // 2])
    chosen["failures"] = max(r["failures"] for r in results)
    chosen["walls"] = [r["wall"] for r in results]
    return chosen


def report(rows, cores, args):
    mb = 1 << 20
    say("")
    say(f"fan-out {args.fanout}; remote command `true`; {cores} cores; rounds {args.rounds} (median shown)")
    head = (f"{'N':>4}  {'tool':<30} {'wall s':>7} {'ratio':>6} {'CPU s':>6} {'ms/conn':>8} {'util':>5} "
            f"{'maxRSS MB':>9} {'tree MB':>8}  failures")
    say(head)
    say("-" * len(head))
    for n, runs in rows:
        best = min(runs["clush"]["wall"], runs["pssh"]["wall"])
        for tool, res in runs.items():
            cpu = res["cpu_client"] + res["cpu_server"]
            failures = str(res["failures"]) if res["failures"] == 0 else f"{res['failures']} FAILED  <-- {res['note']}"
            say(f"{n:>4}  {tool:<30} {res['wall']:7.2f} {res['wall'] / best:6.2f} {cpu:6.2f} "
                f"{1000 * cpu / n:8.1f} {cpu / (res['wall'] * cores):5.0%} "
                f"{res['maxrss'] / mb:9.1f} {res['tree_rss'] / mb:8.1f}  {failures}")
    say("")
    say("ratio: wall / the faster of clush and pssh at that N.  CPU: the tool's tree + sshd's, user + system.")
    say("util: CPU / (wall x cores).  maxRSS: largest single process (wait4).  tree: peak summed RSS of the")
    say("tool's processes (and ControlMasters), sampled every 0.1 s.")
    say("")
    say("this machine's ssh cost per connection (first runs; client ssh + sshd, CPU ms):")
    for n, runs in rows:
        parts = []
        for tool in ("remote_control", "clush", "pssh"):
            res = runs[tool]
            parts.append(f"{tool} {1000 * (res['cpu_client'] + res['cpu_server']) / n:.1f} "
                         f"(client {1000 * res['cpu_client'] / n:.1f}, sshd {1000 * res['cpu_server'] / n:.1f}, "
                         f"driver {1000 * res['cpu_driver'] / n:.1f})")
        floor = min(runs[t]["cpu_client"] + runs[t]["cpu_server"] for t in ("clush", "pssh")) / cores
        say(f"  N={n}: " + "; ".join(parts))
        say(f"        floor at clush/pssh's cost per connection (N x CPU / {cores} cores): {floor:.2f} s")
    n, runs = rows[-1]
    best = min(runs["clush"]["wall"], runs["pssh"]["wall"])
    first = runs["remote_control"]["wall"] / best
    again = runs["remote_control --reuse (timed)"]["wall"] / best
    memory = max(r["maxrss"] for t, r in runs.items() if t.startswith("remote_control")) / mb
    say("")
    say(f"targets at N={n} (from the issue):")
    say(f"  first run <= 0.4x the faster of clush/pssh:  {first:.2f}x  {'MET' if first <= 0.4 else 'MISSED'}")
    say(f"  repeated run (--reuse) <= 0.1x:              {again:.2f}x  {'MET' if again <= 0.1 else 'MISSED'}")
    say(f"  peak memory < 100 MB (remote_control process): {memory:.1f} MB  {'MET' if memory < 100 else 'MISSED'}")
    say("  host-key and authentication checks: identical for all three (StrictHostKeyChecking=yes,")
    say("  per-address known_hosts, one ed25519 identity, BatchMode)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([{"n": n, "runs": {t: {k: v for k, v in r.items() if k not in ("out", "err")}
                                         for t, r in runs.items()}} for n, runs in rows], f, indent=1)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("-n", type=lambda s: [int(x) for x in s.split(",")], default=[10, 100, 300],
                   help="host counts, comma separated (default 10,100,300; at most 508)")
    p.add_argument("-f", "--fanout", type=int, default=64, help="hosts at once, for every tool (default 64)")
    p.add_argument("--rounds", type=int, default=1, help="runs of each tool per N; the median is shown")
    p.add_argument("--timeout", type=float, default=120, help="seconds one tool run may take (default 120)")
    p.add_argument("--dynfarm", default=os.path.join(REPO, "dynfarm.py"),
                   help="the dynfarm.py to run (a private copy, to try a change)")
    p.add_argument("--json", help="also write the figures to this file")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (logs, outputs)")
    p.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--tmp", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if max(args.n) > 508:
        p.error("-n: at most 508 (127.0.0.1 .. 127.0.1.254)")
    return args


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.inner:
        tools = json.loads(os.environ["DFBENCH_TOOLS"])
        try:
            return bench(args, tools)
        except KeyboardInterrupt:
            say("[bench] interrupted; every process of the bench stopped")
            return 130
    if os.geteuid() != 0:
        sys.exit("bench/fanout.py: needs root (it makes a network namespace and runs sshd)")
    for need in ("/usr/sbin/sshd", shutil.which("ssh"), shutil.which("unshare")):
        if not need or not os.path.exists(need):
            sys.exit("bench/fanout.py: needs openssh-server, openssh-client and util-linux (unshare)")
    tools = ensure_tools()
    say(f"[bench] {version_of(['ssh', '-V'])}")
    say(f"[bench] clush: {version_of(tools['clush'] + ['--version'])}")
    say(f"[bench] pssh: {version_of(tools['pssh'] + ['--version'], dict(os.environ, **tools['pssh_env']))} "
        f"from {tools['pssh_from']}")
    # A new network namespace (only lo), PID namespace (whatever we start dies
    # with us, whatever happens) and mount namespace (/run for sshd, a /proc
    # that lists only our processes).
    tmp = tempfile.mkdtemp(prefix="dfb-", dir="/tmp")    # short: control sockets live below it
    cmd = ["unshare", "--net", "--pid", "--fork", "--mount-proc", "--kill-child", "--",
           sys.executable, os.path.abspath(__file__), "--inner", "--tmp", tmp] + argv
    inner = subprocess.Popen(cmd, env=dict(os.environ, DFBENCH_TOOLS=json.dumps(tools)))
    try:
        return inner.wait()
    except KeyboardInterrupt:
        # Ctrl-C reached the inner bench too: give it time to stop its processes
        try:
            inner.wait(20)
        except (subprocess.TimeoutExpired, KeyboardInterrupt):
            inner.kill()    # unshare: --kill-child, and the PID namespace takes the rest
            inner.wait()
        return 130
    finally:
        if args.keep:
            say(f"[bench] kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
