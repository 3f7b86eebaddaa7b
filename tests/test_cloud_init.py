"""The cloud-init user-data `bootstrap --cloud-init` prints, run as cloud-init
runs it, on a VM of the namespace world: its write_files module (the Debian
package's own code) inflates the script, then the runcmd line runs it, and
the VM enrolls."""

import os

import pytest

from farm import read, running_farm
from world import VM_PYTHON

pytestmark = pytest.mark.system

# cloud-init's write_files step, with its own code, then the runcmd entries.
AS_CLOUD_INIT = r"""
import subprocess, sys, yaml
from cloudinit.config.cc_write_files import write_files
config = yaml.safe_load(sys.stdin)
write_files("write_files", config["write_files"], "root:root")
for command in config["runcmd"]:
    subprocess.run(command, check=True)
"""


def test_a_vm_booted_with_the_cloud_init_user_data_enrolls(tmp_path):
    with running_farm(str(tmp_path), vms=("vm1",)) as farm:
        user_data = farm.dynfarm("bootstrap", "aruba", "--cloud-init").stdout
        assert len(user_data.encode()) < 16 * 1024
        farm.world.run("vm1", [VM_PYTHON, "-c", AS_CLOUD_INIT], input=user_data, timeout=120)
        assert "aruba-0001 ready at 10.8.0.2" in read(farm.world.vm_path("vm1", "/var/log/dynfarm-client.log"))
        assert farm.hosts()["aruba-0001"]["state"] == "connected"
        assert os.stat(farm.world.vm_path("vm1", "/etc/dynfarm/client.conf")).st_mode & 0o077 == 0
        assert "DYNFARM_TOKEN" not in read(farm.world.vm_path("vm1", "/etc/dynfarm/client.conf"))
