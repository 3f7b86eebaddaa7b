"""Shared fixtures: a real site (openssl CA, openvpn keys, sqlite) in a temp dir."""

import os
import subprocess
import sys
import textwrap

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import dynfarm  # noqa: E402

SITE_CONF = """\
[site]
state_dir = state
listen = 127.0.0.1:0
public_address = 127.0.0.1
ssh_keys = admin_key.pub
request_timeout = 2

[provider:aruba]
vpn_port = 1194
vpn_subnet = 10.8.0.0/24
files = custom/aruba/files
commands = custom/aruba/setup.sh

[provider:other]
vpn_port = 1195
vpn_subnet = 10.9.0.0/29

[link:master]
address = 10.10.0.5
encap = vxlan
"""


def write_site(directory, conf=SITE_CONF):
    """A site configuration with its customization tree and admin key."""
    files = os.path.join(directory, "custom", "aruba", "files", "etc", "dynfarm-test")
    os.makedirs(files, exist_ok=True)
    with open(os.path.join(files, "greeting"), "w") as f:
        f.write("hello from the site\n")
    os.chmod(os.path.join(files, "greeting"), 0o640)
    with open(os.path.join(directory, "custom", "aruba", "setup.sh"), "w") as f:
        f.write("echo customized > /tmp/dynfarm-setup-ran\n")
    key = os.path.join(directory, "admin_key")
    if not os.path.exists(key):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", key], check=True)
    path = os.path.join(directory, "site.conf")
    with open(path, "w") as f:
        f.write(textwrap.dedent(conf))
    return path


@pytest.fixture
def site(tmp_path):
    """An initialised site: (config, store, pki)."""
    path = write_site(str(tmp_path))
    assert dynfarm.main(["-c", path, "init"]) == 0
    config = dynfarm.load_config(path)
    return config, dynfarm.open_store(config), dynfarm.PKI(config.state)


@pytest.fixture
def make_csr(tmp_path):
    """Make a fresh machine key and its CSR; returns (key path, csr pem)."""
    counter = [0]

    def make():
        counter[0] += 1
        key = str(tmp_path / f"machine{counter[0]}.key")
        dynfarm.make_key(key)
        return key, dynfarm.make_csr(key, "dynfarm-client")
    return make
