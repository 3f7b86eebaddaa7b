"""Fixtures: a real site (openssl CA, openvpn keys, sqlite) in a temp dir; and
the one rule that skips the system tests for anyone but root."""

import os

import pytest

from helpers import write_site

import dynfarm  # noqa: E402  (helpers put the repository on sys.path)


def pytest_collection_modifyitems(config, items):
    # Here rather than in each file, so that a new system test cannot forget it.
    if os.geteuid() == 0:
        return
    needs_root = pytest.mark.skip(reason="needs root: network namespaces, tun, iptables")
    for item in items:
        if item.get_closest_marker("system"):
            item.add_marker(needs_root)


@pytest.fixture
def site(tmp_path):
    """An initialised site: (config, store, pki)."""
    path = write_site(str(tmp_path))
    assert dynfarm.main(["-c", path, "init"]) == 0
    config = dynfarm.load_config(path)
    return config, dynfarm.open_store(config), dynfarm.PKI(config.state)


@pytest.fixture
def app(site):
    """The site's enrollment app, to call in-process (helpers.call)."""
    return dynfarm.App(site[0])


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
