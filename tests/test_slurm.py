"""Slurm on the cloud VMs, for real: jobs submitted at the site run behind the NAT.

The master of the world runs munged and slurmctld with a small cluster's
slurm.conf plus the lines of examples/slurm/slurm.conf; three VMs run the real
bootstrap with examples/slurm/join.sh as their provider's command and the
cluster's munge key in its files. Their slurmd (-Z, configless) reaches the
master through the VPN and the vxlan link, and job steps connect back.
`retire` runs the [batch] hooks of site.conf.example, unchanged, on the site,
which is a Slurm client: it borrows the master's /etc and /run (slurm.conf and
munged's socket), since the world's site shares the machine's files.

The tests run in file order and share one world, as a cluster's life goes.
"""

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from farm import DYNFARM, REPO, SITE_CONF, VMS, read, running_farm, wait_for
from world import MASTER_IP

pytestmark = pytest.mark.system

EXAMPLES = os.path.join(REPO, "examples", "slurm")

# A cluster with no static nodes of its own: only the site-specific lines; the
# lines dynfarm needs come from examples/slurm/slurm.conf.
CLUSTER_CONF = f"""\
ClusterName=dynfarm
SlurmctldHost=master({MASTER_IP})
AuthType=auth/munge
SlurmUser=root
StateSaveLocation=/var/spool/slurmctld
SlurmctldPidFile=/run/slurmctld.pid
SlurmctldLogFile=/var/log/slurmctld.log
SlurmdSpoolDir=/var/spool/slurmd
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# The namespaces have no cgroup file system of their own (ip netns exec
# mounts a fresh /sys): track processes by their parentage instead.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
"""
# Served to the VMs by configless, as slurm.conf is.
CGROUP_CONF = "CgroupPlugin=cgroup/v1\n"


def example_batch_section():
    """site.conf.example's [batch] section, as documented (comments and all)."""
    with open(os.path.join(REPO, "site.conf.example")) as f:
        return "[batch]" + f.read().split("\n[batch]", 1)[1]


def slurm_site_conf():
    """The world's site, with aruba's VMs joining Slurm and the batch hooks of the example."""
    conf = SITE_CONF.replace("commands = custom/aruba/setup.sh", "commands = custom/aruba/join.sh")
    conf = conf.replace("[link:master]", "[link:batch-master]")
    assert "custom/aruba/join.sh" in conf and "[link:batch-master]" in conf
    return conf + "\n" + example_batch_section()


def prepare_site(site_dir):
    """What the README tells the admin to put in aruba's customization: the
    recipe's join.sh and the cluster's munge key (0600). Returns the key's path."""
    files = os.path.join(site_dir, "custom", "aruba", "files", "etc", "munge")
    os.makedirs(files)
    key = os.path.join(files, "munge.key")
    subprocess.run(["mungekey", "--create", "--keyfile", key], check=True)
    os.chmod(key, 0o600)
    shutil.copy(os.path.join(EXAMPLES, "join.sh"), os.path.join(site_dir, "custom", "aruba", "join.sh"))
    return key


class Cluster:
    """The farm plus the Slurm controller on its master."""

    def __init__(self, farm):
        self.farm = farm
        self.world = farm.world

    def start_controller(self, key):
        self.key = key
        with open(os.path.join(EXAMPLES, "slurm.conf")) as f:
            conf = CLUSTER_CONF + f.read()
        master = self.world
        master.run("master", ["sh", "-c", "mkdir -p /etc/slurm /var/spool/slurmctld && "
                              "cat > /etc/slurm/slurm.conf"], input=conf)
        master.run("master", ["sh", "-c", "cat > /etc/slurm/cgroup.conf"], input=CGROUP_CONF)
        # A fresh key: the VMs see the machine's own /etc/munge through their
        # overlays, so only the key dynfarm delivered can make them trusted.
        master.run("master", ["sh", "-c", 'install -o munge -g munge -m 0400 "$0" /etc/munge/munge.key '
                              "&& install -d -o munge -g munge /run/munge "
                              "&& runuser -u munge -- /usr/sbin/munged", key])
        self.slurmctld = master.spawn("master", ["slurmctld", "-D", "-i"],
                                      os.path.join(self.farm.dir, "slurmctld.out"))
        wait_for(lambda: self.run("scontrol", "ping", check=False).returncode == 0, "slurmctld answering")

    def run(self, *argv, check=True, timeout=60):
        return self.world.run("master", list(argv), check=check, timeout=timeout)

    def nodes(self):
        """{node: (state, features)} as sinfo shows them."""
        out = self.run("sinfo", "-h", "-N", "-o", "%N %t %f").stdout
        return {name: (state, features) for name, state, features in map(str.split, out.splitlines())}

    def wait_idle(self, names, timeout=30):
        wait_for(lambda: all(self.nodes().get(n, ("",))[0] == "idle" for n in names),
                 f"{', '.join(names)} idle in sinfo", timeout=timeout)

    def wait_jobs_done(self, timeout=60):
        wait_for(lambda: not self.run("squeue", "-h", "-o", "%i").stdout.strip(), "no job in squeue",
                 timeout=timeout)

    def dynfarm_as_slurm_client(self, *args, check=True):
        """dynfarm.py on the site, with the master's files (slurm.conf, munged's socket)."""
        pid = str(self.world.holder_pid("master"))
        return self.world.run("site", ["nsenter", "-t", pid, "-m", "--", sys.executable, DYNFARM,
                                       "-c", self.farm.conf, *args], check=check, timeout=120)

    def logs(self):
        """What to look at when a test fails: the controller's and the VMs' slurm logs."""
        parts = [self.run("tail", "-n", "30", "/var/log/slurmctld.log", check=False).stdout]
        for vm in self.world.vms:
            parts.append(f"--- {vm}\n" + self.world.run(vm, ["tail", "-n", "15", "/var/log/slurmd.log"],
                                                         check=False).stdout)
        return "\n".join(parts)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("slurm"))
    site_dir = os.path.join(tmp, "site")
    key = prepare_site(site_dir)
    with running_farm(tmp, conf=slurm_site_conf(), hosts=("master",)) as farm:
        farm.dynfarm("links", "up")
        farm.world.run("master", ["sh", "-s"], input=farm.dynfarm("links", "peer", "batch-master").stdout)
        cluster = Cluster(farm)
        cluster.start_controller(key)
        yield cluster


def bootstrap_all(farm, vms=VMS):
    script = farm.dynfarm("bootstrap", "aruba", "--uses", str(len(vms))).stdout
    procs = [subprocess.Popen(farm.world.argv(vm, ["sh", "-s"]), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for vm in vms]
    for proc in procs:
        proc.stdin.write(script)
        proc.stdin.close()
    outputs = [proc.stdout.read() for proc in procs]
    codes = [proc.wait(90) for proc in procs]
    logs = [read(farm.world.vm_path(vm, "/var/log/dynfarm-client.log"))[-1500:] for vm in vms]
    assert codes == [0] * len(vms), "\n".join(outputs + logs)


def test_vms_join_slurm_as_idle_cloud_nodes_named_by_dynfarm(cluster):
    bootstrap_all(cluster.farm)
    names = sorted(cluster.farm.hosts())
    assert names == ["aruba-0001", "aruba-0002", "aruba-0003"]
    try:
        cluster.wait_idle(names)
    except AssertionError:
        raise AssertionError(cluster.logs())
    nodes = cluster.nodes()
    assert sorted(nodes) == names
    assert {features for _, features in nodes.values()} == {"cloud,aruba"}
    # the node's size is the VM's, as the client reported it
    facts = cluster.run("scontrol", "-o", "show", "node", "aruba-0001").stdout
    assert f"CPUTot={os.cpu_count()} " in facts


def test_the_munge_key_arrived_whole_as_a_secret_of_munge(cluster):
    with open(cluster.key, "rb") as f:
        key = f.read()
    for vm in VMS:
        mode = cluster.world.run(vm, ["stat", "-c", "%a %U", "/etc/munge/munge.key"]).stdout.split()
        assert mode == ["400", "munge"]
        copy = cluster.world.run(vm, ["sha256sum", "/etc/munge/munge.key"]).stdout.split()[0]
        assert copy == hashlib.sha256(key).hexdigest()


def test_a_job_array_runs_on_every_vm(cluster):
    job = cluster.run("sbatch", "--parsable", "-p", "cloud", "--array=1-6", "--exclusive", "--chdir=/tmp",
                      "--output=/tmp/array-%a.out", "--wrap",
                      'echo "$SLURMD_NODENAME $(hostname)"; sleep 1').stdout.strip()
    assert re.fullmatch(r"\d+", job), job
    cluster.wait_jobs_done()
    ran = {}
    for vm in VMS:   # each task wrote its output on the VM it ran on
        out_dir = cluster.world.vm_path(vm, "/tmp")
        for name in os.listdir(out_dir):
            if re.fullmatch(r"array-\d\.out", name):
                node, hostname = read(os.path.join(out_dir, name)).split()
                assert hostname == vm
                ran[name] = node
    assert sorted(ran) == [f"array-{i}.out" for i in range(1, 7)], cluster.logs()
    assert sorted(set(ran.values())) == ["aruba-0001", "aruba-0002", "aruba-0003"]


def test_srun_from_the_master_reaches_every_vm_and_back(cluster):
    # srun listens on the master; the VMs' job steps connect back to it.
    out = cluster.run("srun", "-p", "cloud", "-N3", "hostname", timeout=60).stdout.split()
    assert sorted(out) == list(VMS)


def reboot(farm, vm):
    """Power cut and boot: every process of the VM dies (the VPN, munged,
    slurmd), then its boot hook runs."""
    farm.world.crash(vm)
    return farm.boot(vm, check=False)


def test_a_rebooted_vm_rejoins_under_its_name_even_with_the_server_down(cluster):
    farm = cluster.farm
    name = farm.host_of("vm2")[0]
    farm.stop_server()
    try:
        booted = reboot(farm, "vm2")
        assert booted.returncode == 0, booted.stdout + booted.stderr
    finally:
        farm.start_server()
    cluster.wait_idle([name])
    assert sorted(cluster.nodes()) == ["aruba-0001", "aruba-0002", "aruba-0003"]   # not doubled
    assert cluster.run("srun", "-p", "cloud", "-w", name, "hostname").stdout.strip() == "vm2"


def wait_running(cluster, job):
    try:
        wait_for(lambda: cluster.run("squeue", "-h", "-j", job, "-o", "%t").stdout.strip() == "R", "job running")
    except AssertionError:
        raise AssertionError(cluster.run("squeue", "-j", job, "-o", "%i %t %R").stdout + cluster.logs())


def test_retire_past_its_timeout_leaves_the_host_enrolled(cluster):
    name = cluster.farm.host_of("vm2")[0]
    job = cluster.run("sbatch", "--parsable", "-p", "cloud", "-w", name, "--chdir=/tmp", "--wrap", "sleep 60").stdout.strip()
    wait_running(cluster, job)
    done = cluster.dynfarm_as_slurm_client("retire", name, "--timeout", "3", check=False)
    assert done.returncode == 1
    assert f"{name}: still running jobs after 3s; left drained and enrolled" in done.stderr
    assert cluster.farm.hosts()[name]["state"] == "connected"
    assert cluster.nodes()[name][0] in ("drng", "drain")
    cluster.run("scancel", job)
    cluster.run("scontrol", "update", f"nodename={name}", "state=resume")
    cluster.wait_idle([name])


def test_retire_waits_for_the_running_job_then_the_node_is_gone(cluster):
    farm = cluster.farm
    name, address = farm.host_of("vm3")
    job = cluster.run("sbatch", "--parsable", "-p", "cloud", "-w", name, "--chdir=/tmp",
                      "--output=/tmp/last-job.out", "--wrap", "sleep 4; echo finished").stdout.strip()
    wait_running(cluster, job)
    done = cluster.dynfarm_as_slurm_client("retire", name, "--timeout", "60")
    assert f"{name}: draining" in done.stdout
    assert f"retired {name}: its VPN session was ended; its name and {address} are free again" in done.stdout
    # the job ran to its end before the node went
    assert read(farm.world.vm_path("vm3", "/tmp/last-job.out")).strip() == "finished"
    assert name not in cluster.nodes()
    assert farm.hosts()[name]["state"] == "retired"
    # the others keep running jobs
    assert sorted(cluster.run("srun", "-p", "cloud", "-N2", "hostname").stdout.split()) == ["vm1", "vm2"]


def test_a_retired_vm_cannot_come_back_and_its_address_goes_to_the_next(cluster):
    farm = cluster.farm
    name, address = farm.host_of("vm3")
    done = cluster.dynfarm_as_slurm_client("retire", name, check=False)
    assert done.returncode == 2 and f"{name} was retired" in done.stderr
    booted = reboot(farm, "vm3")   # its certificate is on the CRL, its key refused
    assert booted.returncode != 0
    log = read(farm.world.vm_path("vm3", "/var/log/dynfarm-client.log"))
    assert "retired" in log, log[-2000:]
    # the same VM as a new machine (a fresh key) is the next new VM
    farm.world.run("vm3", ["find", "/var/lib/dynfarm", "-mindepth", "1", "-delete"])
    bootstrap_all(farm, vms=["vm3"])
    assert farm.host_of("vm3") == (name, address)
    cluster.wait_idle([name])
    assert cluster.run("srun", "-p", "cloud", "-w", name, "hostname").stdout.strip() == "vm3"


def test_retire_of_an_unknown_host_changes_nothing(cluster):
    before = json.dumps(cluster.farm.hosts(), sort_keys=True)
    done = cluster.dynfarm_as_slurm_client("retire", "aruba-0099", check=False)
    assert done.returncode == 2 and "no host named aruba-0099" in done.stderr
    assert json.dumps(cluster.farm.hosts(), sort_keys=True) == before
    assert sorted(cluster.nodes()) == ["aruba-0001", "aruba-0002", "aruba-0003"]
    assert {state for state, _ in cluster.nodes().values()} == {"idle"}
