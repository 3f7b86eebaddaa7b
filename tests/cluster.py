"""A Slurm cluster on the namespace world's master, and the site that joins
its VMs to it with examples/slurm: shared by tests/test_slurm.py and the demo.

The master runs munged and slurmctld with a small cluster's slurm.conf plus
the lines of examples/slurm/slurm.conf (what the README tells a site to add);
aruba's customization is join.sh and the cluster's munge key; the site's
[batch] hooks are site.conf.example's, verbatim.
"""

import contextlib
import os
import shutil
import subprocess
import sys

from farm import DYNFARM, REPO, SITE_CONF, VMS, read, running_farm, wait_for
from world import MASTER_IP

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

    def wait_idle(self, names, timeout=30, interval=0.1):
        wait_for(lambda: all(self.nodes().get(n, ("",))[0] == "idle" for n in names),
                 f"{', '.join(names)} idle in sinfo", timeout=timeout, interval=interval)

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


def bootstrap_all(farm, vms=VMS):
    script = farm.dynfarm("bootstrap", "aruba", "--uses", str(len(vms))).stdout
    codes, outputs = zip(*farm.run_at_once(script, vms))
    logs = [read(farm.world.vm_path(vm, "/var/log/dynfarm-client.log"))[-1500:] for vm in vms]
    assert codes == (0,) * len(vms), "\n".join(outputs + tuple(logs))


@contextlib.contextmanager
def running_cluster(tmp):
    """running_farm with the Slurm site, its links up and the controller running."""
    key = prepare_site(os.path.join(tmp, "site"))
    with running_farm(tmp, conf=slurm_site_conf(), hosts=("master",)) as farm:
        farm.dynfarm("links", "up")
        farm.world.run("master", ["sh", "-s"], input=farm.dynfarm("links", "peer", "batch-master").stdout)
        cluster = Cluster(farm)
        cluster.start_controller(key)
        yield cluster
