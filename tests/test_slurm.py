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

import pytest

from cluster import bootstrap_all, running_cluster
from farm import VMS, read, wait_for
from world import netns_pids

pytestmark = pytest.mark.system


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with running_cluster(str(tmp_path_factory.mktemp("slurm"))) as cluster:
        yield cluster


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
    # the node's size is the VM's: the cores slurmd finds, the memory the client reported
    facts = cluster.run("scontrol", "-o", "show", "node", "aruba-0001").stdout
    assert f"CPUTot={os.cpu_count()} " in facts
    assert f"RealMemory={cluster.farm.hosts()['aruba-0001']['facts']['memory_mb']} " in facts


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


def daemons(world, vm, name):
    """Pids of the VM's processes called name (its network namespace's)."""
    def comm(pid):
        try:
            return read(f"/proc/{pid}/comm").strip()
        except OSError:   # gone meanwhile
            return None
    return [pid for pid in netns_pids(world.ns(vm)) if comm(pid) == name]


def test_the_boot_run_again_restarts_the_daemons_and_keeps_one_node(cluster):
    farm = cluster.farm
    name = farm.host_of("vm1")[0]
    before = daemons(farm.world, "vm1", "slurmd") + daemons(farm.world, "vm1", "munged")
    assert len(before) == 2
    farm.boot("vm1")
    after = daemons(farm.world, "vm1", "slurmd") + daemons(farm.world, "vm1", "munged")
    assert len(after) == 2 and not set(after) & set(before)
    cluster.wait_idle([name])
    assert sorted(cluster.nodes()) == ["aruba-0001", "aruba-0002", "aruba-0003"]
    assert cluster.run("srun", "-p", "cloud", "-w", name, "hostname").stdout.strip() == "vm1"


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
    booted = reboot(farm, "vm3")   # its key is refused ...
    assert booted.returncode != 0
    log = read(farm.world.vm_path("vm3", "/var/log/dynfarm-client.log"))
    assert "retired" in log, log[-2000:]
    # ... and its certificate, if it tries the tunnel on its own, is on the CRL
    farm.world.run("vm3", ["openvpn", "--daemon", "retired", "--config", "/var/lib/dynfarm/openvpn.conf",
                           "--log", "/tmp/retired-vpn.log"])
    vpn_log = os.path.join(farm.dir, "vpn-aruba.log")
    wait_for(lambda: f"certificate revoked: CN={name}" in read(vpn_log), "the VPN server refusing it")
    assert address not in farm.world.run("vm3", ["ip", "-o", "addr"]).stdout
    assert "Initialization Sequence Completed" not in read(farm.world.vm_path("vm3", "/tmp/retired-vpn.log"))
    farm.world.crash("vm3")
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
