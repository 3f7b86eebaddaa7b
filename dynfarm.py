#!/usr/bin/env python3
"""dynfarm: turn someone else's cloud VMs into worker nodes of your batch farm.

One file, standard library only, Python 3.9+. It is:

  * the site's enrollment server   (init, server, vpn, token, bootstrap, revoke, backup)
  * the site's router to the VMs   (links: gre/vxlan links, policy routing, firewall)
  * the VM's boot-time client      (client: key, enroll, OpenVPN up, customize)
  * the admin's remote_control     (list, run, put, get over ssh, with a fan-out)

Sections, in the order data flows (grep for "# === "):

  constants -> errors -> seam (external commands, files) -> config and the
  state directory -> store (sqlite) -> tokens, addresses -> PKI -> network
  (OpenVPN; links) -> site (init, backup, revoke) -> enrollment service -> HTTPS
  transport -> bootstrap -> client -> remote_control -> CLI

The enrollment API (a client can be written from this):

  POST /v1/enroll   JSON body (at most 64 KiB):
      version     sha256 hex of the client's own dynfarm.py (required)
      token       enrollment token (required unless the TLS client certificate
                  of an enrolled host is presented)
      provider    the provider the client expects to join (optional)
      machine_id, hostname, csr (PEM), host_keys (["type base64", ...]),
      facts ({"cores": 2, ...})
    200 {"status": "update", "sha256": H, "url": "/v1/client"}
        the client must fetch /v1/client, check H, replace itself and rerun.
    200 {"status": "enrolled", "name", "provider", "address", "netmask",
         "vpn_server", "probe_port", "links": {NAME: site address of each [link:]},
         "certificate", "openvpn_config",
         "customization": {"ssh_keys": [...], "files": [...], "commands": [...]}}
    4xx {"error": "one clear line"}; nothing is stored.
  GET  /v1/client   the server's dynfarm.py; header X-Dynfarm-Sha256.
  POST /v1/report   (client certificate required) {"ok", "steps", "ready_seconds"}
  GET  /v1/health   {"ok": true, "version": H}
"""

import argparse
import base64
import calendar
import collections
import configparser
import dataclasses
import datetime
import errno
import fcntl
import functools
import gzip
import hashlib
import hmac
import http
import io
import ipaddress
import itertools
import json
import math
import os
import platform
import queue
import random
import re
import resource
import secrets
import selectors
import shlex
import signal
import socket
import sqlite3
import ssl
import stat
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import urllib.error
import urllib.request
import zlib

# === Constants ===

DEFAULT_CONFIG = "/etc/dynfarm/site.conf"
CLIENT_STATE_DIR = "/var/lib/dynfarm"
MAX_BODY = 64 * 1024
CERT_DAYS = 825
RENEW_BEFORE = 30 * 86400     # seconds before expiry when init renews the server certificate
CA_DAYS = 3650
CRL_DAYS = 3650
SERVER_CN = "dynfarm-server"
# Provider names end up in interface names (df-NAME, 15 bytes at most) and
# host names (NAME-0001), so they are short and carry no dash.
PROVIDER_RE = re.compile(r"^[a-z][a-z0-9]{0,11}$")
# Link names end up in interface names too: dl-NAME, 15 bytes at most.
LINK_RE = re.compile(r"^[a-z][a-z0-9-]{0,11}$")
HOST_KEY_RE = re.compile(r"(ssh-ed25519|ssh-rsa|ecdsa-sha2-nistp(256|384|521)) [A-Za-z0-9+/]+={0,2}")
MACHINE_ID_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
HOSTNAME_RE = re.compile(r"[A-Za-z0-9._-]{1,253}")
HEX64_RE = re.compile(r"[0-9a-f]{64}")
NONCE_RE = re.compile(r"[0-9]{1,12}\.[0-9a-f]{8}\.[0-9a-f]{24}")


# === Errors ===
#
# One class per meaning. main() turns a Fatal (Overtaken, UsageError) into
# one line on stderr and its exit code; the enrollment service turns
# RequestError and CSRRejected into answers; the client retries on
# ServerUnreachable.

class Fatal(Exception):
    """An expected failure: one line for the user (what failed, what to do
    next), exit 1."""
    code = 1


class UsageError(Fatal):
    """A mistake in the command line or the site configuration: exit 2."""
    code = 2


class RequestError(Exception):
    """A request the enrollment service refuses: HTTP status and one clear
    line (and, for a challenge, the nonce to answer it with)."""

    def __init__(self, status, message, nonce=None, retry_after=None):
        super().__init__(message)
        self.status = status
        self.nonce = nonce
        self.headers = {"Retry-After": str(retry_after)} if retry_after else {}

    def answer(self):
        return {"error": str(self)} if self.nonce is None else {"error": str(self), "nonce": self.nonce}


class CSRRejected(Exception):
    """A certificate request the CA will not sign: the requester's fault."""


class ServerUnreachable(Exception):
    """The client found nobody answering at the enrollment URL, or was told
    to come back later (429, 503): either way, a first boot tries again."""


class Challenged(Fatal):
    """The server wants a fresh proof that this machine holds its key: a CSR
    naming the nonce it sent."""

    def __init__(self, message, nonce):
        super().__init__(message)
        self.nonce = nonce


class Overtaken(Fatal):
    """The server's 409: a release, or another request of this machine,
    overtook ours while it was signed (App.overtaken)."""


# === Seam: every external command goes through run(); files ===

# -v sets it: every external command is then echoed as "[#] ..." on stderr.
ECHO_COMMANDS = False


# Control characters a client sent (in a path, an error echoing a value)
# must not reach the admin's terminal or split a log line.
LOG_ESCAPES = {c: f"\\x{c:02x}" for c in [*range(0x20), 0x7F, *range(0x80, 0xA0)]}


def log(message):
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    sys.stderr.write(f"{stamp} dynfarm: {message.translate(LOG_ESCAPES)}\n")
    sys.stderr.flush()


def run(argv, input=None, check=True, timeout=120, env=None):
    """Run argv (never through a shell); raise Fatal with its stderr on failure."""
    if ECHO_COMMANDS:
        log("[#] " + " ".join(shlex.quote(a) for a in argv))
    try:
        done = subprocess.run(argv, input=input, capture_output=True, timeout=timeout, env=env)
    except FileNotFoundError:
        raise Fatal(f"{argv[0]}: command not found; install it and try again")
    except subprocess.TimeoutExpired:
        raise Fatal(f"{argv[0]}: no answer after {timeout}s")
    if check and done.returncode != 0:
        detail = done.stderr.decode(errors="replace").strip().splitlines()
        raise Fatal(f"{' '.join(argv[:3])}: failed ({detail[-1] if detail else 'exit %d' % done.returncode})")
    return done


def write_file(path, data, mode=0o644, sync=False):
    """Write atomically (temp file in the same directory, then rename) with
    mode; sync: on disk before the rename, and the rename too (a backup must
    survive the crash it is for)."""
    if isinstance(data, str):
        data = data.encode()
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".dynfarm-")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if sync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    if sync:
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def read_text(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def read_bytes(path):
    with open(path, "rb") as f:
        return f.read()


def read_own_source():
    """This file's bytes: what the server hands out as the client, and what its version hashes."""
    return read_bytes(os.path.realpath(__file__))


# === Config ===

SITE_KEYS = {
    "state_dir": "/var/lib/dynfarm",
    "listen": "0.0.0.0:8443",
    "public_address": None,
    "ssh_keys": None,
    "ssh_identity": "",
    "mode": "gre",
    "bridge": "",
    "request_timeout": "10",
}
PROVIDER_KEYS = {
    "vpn_port": None,
    "vpn_subnet": None,
    "vpn_proto": "udp",
    "networks": "0.0.0.0/0",
    "files": "",
    "commands": "",
    "vm_to_vm": "yes",
    "bridge_pool": "",
    "vpn_instances": "1",
}
LINK_KEYS = {"address": None, "encap": "gre"}
# How retire asks the batch system to let a node go: shell commands run on
# this host with the node in their environment (retire_environment).
BATCH_KEYS = {"drain": None, "idle": None, "remove": None}
MODES = ("gre", "routed", "bridged")
ENCAPS = ("gre", "vxlan")


@dataclasses.dataclass
class Provider:
    name: str
    vpn_port: int
    vpn_subnet: ipaddress.IPv4Network
    vpn_proto: str
    networks: list
    files: str       # absolute path of the tree copied onto the VM, or ""
    commands: list   # absolute paths of scripts run on the VM, in order
    vm_to_vm: bool   # may this provider's VMs reach each other
    bridge_pool: tuple = None   # bridged mode: (first, last) LAN addresses, as ints
    instances: int = 1          # OpenVPN servers (vpn_instances), each with a slice of vpn_subnet

    @property
    def vpns(self):
        """The provider's OpenVPN servers: vpn_subnet cut in as many equal
        slices as the next power of two, the first ones used."""
        bits = (self.instances - 1).bit_length()
        slices = self.vpn_subnet.subnets(prefixlen_diff=bits)
        return [VPN(self, index, subnet) for index, subnet in zip(range(self.instances), slices)]

    def vpn_of(self, address):
        """The server a host belongs to: the one whose slice holds its address
        (bridged mode's LAN addresses: the only one)."""
        vpns = self.vpns
        address = ipaddress.IPv4Address(address)
        return next((vpn for vpn in vpns if address in vpn.subnet), vpns[0])


@dataclasses.dataclass(frozen=True)
class VPN:
    """One OpenVPN server of a provider. The first has the provider's own
    names (vpn aruba, df-aruba, port vpn_port); the next are aruba-1 (df-aruba-1,
    vpn_port + 1), ... Each has its own client-config entries, status and
    management socket; the tls-crypt key is the provider's."""
    provider: Provider
    index: int
    subnet: ipaddress.IPv4Network

    @property
    def name(self):
        return self.provider.name + (f"-{self.index}" if self.index else "")

    @property
    def port(self):
        return self.provider.vpn_port + self.index

    @property
    def interface(self):
        return f"df-{self.name}"

    @property
    def server_address(self):
        return next(self.subnet.hosts())


@dataclasses.dataclass
class Link:
    name: str
    address: ipaddress.IPv4Address
    encap: str
    index: int       # position in the configuration: picks its link subnet and VXLAN id

    @property
    def device(self):
        return f"dl-{self.name}"


class StateDir:
    """Every path the site keeps under [site] state_dir, named once:

      dynfarm.db              hosts and tokens (sqlite, WAL)                 0600
      events.db               the audit log: enrollments, refusals, revokes  0600
      pki/ca.crt, ca.key      the site CA                                    key 0600
      pki/server.crt, .key    the certificate of the enrollment and VPN servers
      pki/crl.pem             the revoked hosts (OpenVPN's crl-verify)
      pki/*.cnf, index.txt    openssl's working files
      openvpn/S.conf          OpenVPN server S's configuration (init writes it); S is a
                              provider P's first server, named P, or its next ones, P-1, ...
      openvpn/P.tlscrypt      provider P's tls-crypt key (all its servers')   0600
      ccd/S/HOST              a host's client-config entry at its server: its static address
      run/S.mgmt, S.status    the running OpenVPN server's management socket and status
      run/links.json          what 'links up' did, each step with its undo
      run/known_hosts.*       one per remote_control run, while it runs
    """

    def __init__(self, root):
        self.root = root
        self.database = os.path.join(root, "dynfarm.db")
        self.events = os.path.join(root, "events.db")
        self.pki = os.path.join(root, "pki")
        in_pki = functools.partial(os.path.join, self.pki)
        self.ca_cert = in_pki("ca.crt")
        self.ca_key = in_pki("ca.key")
        self.server_cert = in_pki("server.crt")
        self.server_key = in_pki("server.key")
        self.crl = in_pki("crl.pem")
        self.req_config = in_pki("req.cnf")       # openssl's working files
        self.ca_config = in_pki("ca.cnf")
        self.crl_index = in_pki("index.txt")
        self.crl_lock = in_pki("crl.lock")
        self.openvpn = os.path.join(root, "openvpn")
        self.ccd = os.path.join(root, "ccd")
        self.run = os.path.join(root, "run")
        self.links_record = os.path.join(self.run, "links.json")

    def relative(self, path):
        """How messages name a path of the state: pki/ca.crt."""
        return os.path.relpath(path, self.root)

    def vpn_config(self, vpn_name):
        return os.path.join(self.openvpn, vpn_name + ".conf")

    def tls_crypt_key(self, provider_name):
        return os.path.join(self.openvpn, provider_name + ".tlscrypt")

    def ccd_dir(self, vpn_name):
        return os.path.join(self.ccd, vpn_name)

    def ccd_entry(self, vpn_name, host_name):
        return os.path.join(self.ccd, vpn_name, host_name)

    def management_socket(self, vpn_name):
        return os.path.join(self.run, vpn_name + ".mgmt")

    def vpn_status(self, vpn_name):
        return os.path.join(self.run, vpn_name + ".status")


@dataclasses.dataclass
class Config:
    path: str
    state: StateDir
    listen_host: str
    listen_port: int
    public_address: str
    ssh_keys: list
    ssh_identity: str
    mode: str
    bridge: str
    request_timeout: float
    providers: dict
    links: dict
    batch: dict      # [batch] drain, idle, remove; empty without the section

    def provider(self, name):
        if name not in self.providers:
            known = ", ".join(sorted(self.providers)) or "none"
            raise UsageError(f"{self.path}: no provider '{name}' (configured: {known})")
        return self.providers[name]

    @property
    def vpns(self):
        """Every provider's every OpenVPN server."""
        return [vpn for provider in self.providers.values() for vpn in provider.vpns]

    def vpn(self, name):
        """A provider's OpenVPN server by its name: aruba, aruba-1, ..."""
        for vpn in self.vpns:
            if vpn.name == name:
                return vpn
        known = ", ".join(v.name for v in self.vpns) or "none"
        raise UsageError(f"{self.path}: no VPN server '{name}' (configured: {known})")


def load_config(path):
    """Read and validate the site configuration; UsageError names the culprit."""
    parser = configparser.ConfigParser(inline_comment_prefixes=(";", "#"), interpolation=None)
    try:
        with open(path, encoding="utf-8") as f:
            parser.read_file(f)
    except FileNotFoundError:
        raise UsageError(f"{path}: no such configuration file (give one with -c FILE; see site.conf.example)")
    except (configparser.Error, UnicodeDecodeError) as e:
        raise UsageError(f"{path}: cannot parse: {str(e).splitlines()[0]}")
    if parser.defaults():
        raise UsageError(f"{path}: [DEFAULT] is not used by dynfarm; put keys in [site] or a provider")
    if not parser.has_section("site"):
        raise UsageError(f"{path}: missing [site] section")
    base = os.path.dirname(os.path.abspath(path))
    site = section_values(parser, "site", SITE_KEYS, path)
    providers, links = {}, {}
    for section in parser.sections():
        kind, _, name = section.partition(":")
        if section in ("site", "batch"):
            continue
        if kind == "provider" and name in TOKEN_ACTIONS:
            raise UsageError(f"{path}: [{section}]: '{name}' is reserved ('dynfarm.py token {name}'); "
                             "choose another provider name")
        if kind == "provider" and PROVIDER_RE.fullmatch(name):
            providers[name] = parse_provider(name, section_values(parser, section, PROVIDER_KEYS, path), base, path,
                                             os.path.join(base, site["state_dir"]))
        elif kind == "link" and LINK_RE.fullmatch(name):
            links[name] = parse_link(name, section_values(parser, section, LINK_KEYS, path), len(links), path)
        elif kind in ("provider", "link"):
            raise UsageError(f"{path}: [{section}]: bad name '{name}' (provider: lowercase letters and digits, "
                              f"at most 12, no dash; link: lowercase, digits and dashes, at most 12)")
        else:
            raise UsageError(f"{path}: unknown section [{section}] "
                             "(expected [site], [provider:NAME], [link:NAME], [batch])")
    if not providers:
        raise UsageError(f"{path}: no [provider:NAME] section; add one per cloud provider")
    check_no_overlap(providers, path)
    host, port = parse_listen(site["listen"], path)
    check_ports_free(providers, port, links, path)
    if site["mode"] not in MODES:
        raise UsageError(f"{path}: [site] mode = {site['mode']}: expected one of {', '.join(MODES)}")
    if site["mode"] == "bridged":
        check_bridged(site, providers, path)
    return Config(
        path=path,
        state=StateDir(os.path.join(base, site["state_dir"])),
        listen_host=host,
        listen_port=port,
        public_address=site["public_address"],
        ssh_keys=[os.path.join(base, p) for p in site["ssh_keys"].split()],
        ssh_identity=os.path.join(base, site["ssh_identity"]) if site["ssh_identity"] else "",
        mode=site["mode"],
        bridge=site["bridge"],
        request_timeout=parse_number(site["request_timeout"], "[site] request_timeout", path),
        providers=providers,
        links=links,
        batch=section_values(parser, "batch", BATCH_KEYS, path) if parser.has_section("batch") else {},
    )


def section_values(parser, section, known, path):
    values = dict(parser.items(section))
    for key in values:
        if key not in known:
            raise UsageError(f"{path}: [{section}] unknown key '{key}' (known: {', '.join(known)})")
    for key, default in known.items():
        if key not in values:
            if default is None:
                raise UsageError(f"{path}: [{section}] missing required key '{key}'")
            values[key] = default
    return values


def parse_number(text, what, path):
    try:
        value = float(text)
    except ValueError:
        raise UsageError(f"{path}: {what} = {text}: not a number")
    if value <= 0:
        raise UsageError(f"{path}: {what} = {text}: must be positive")
    return value


def parse_listen(text, path):
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:   # 0: any free port (tests)
        raise UsageError(f"{path}: [site] listen = {text}: expected ADDRESS:PORT, e.g. 0.0.0.0:8443")
    return host.strip("[]") or "0.0.0.0", int(port)


def parse_provider(name, values, base, path, state_dir):
    where = f"{path}: [provider:{name}]"
    try:
        port = int(values["vpn_port"])
        assert 0 < port < 65536
    except (ValueError, AssertionError):
        raise UsageError(f"{where} vpn_port = {values['vpn_port']}: expected a port number")
    try:
        subnet = ipaddress.IPv4Network(values["vpn_subnet"], strict=True)
    except ValueError as e:
        raise UsageError(f"{where} vpn_subnet = {values['vpn_subnet']}: {e}")
    if subnet.prefixlen > 29:
        raise UsageError(f"{where} vpn_subnet = {subnet}: too small, use /29 or larger")
    if values["vpn_proto"] not in ("udp", "tcp"):
        raise UsageError(f"{where} vpn_proto = {values['vpn_proto']}: expected udp or tcp")
    try:
        networks = [ipaddress.IPv4Network(n, strict=False) for n in values["networks"].replace(",", " ").split()]
    except ValueError as e:
        raise UsageError(f"{where} networks: {e}")
    files = customization_path(values["files"], base, where, "files", state_dir) if values["files"] else ""
    if files and not os.path.isdir(files):
        raise UsageError(f"{where} files = {values['files']}: not a directory")
    commands = [customization_path(c, base, where, "commands", state_dir) for c in values["commands"].split()]
    for command in commands:
        if not os.path.isfile(command):
            raise UsageError(f"{where} commands: {command}: no such file")
    if values["vm_to_vm"] not in ("yes", "no"):
        raise UsageError(f"{where} vm_to_vm = {values['vm_to_vm']}: expected yes or no")
    instances = parse_instances(values["vpn_instances"], name, port, subnet, where)
    return Provider(name, port, subnet, values["vpn_proto"], networks, files, commands, values["vm_to_vm"] == "yes",
                    parse_pool(values["bridge_pool"], where) if values["bridge_pool"] else None, instances)


def parse_instances(text, name, port, subnet, where):
    """vpn_instances: a count, or auto for this machine's cores. Each server
    needs a device name of 15 bytes at most, a port, and a slice of the
    subnet with room for itself and at least one host."""
    try:
        instances = (os.cpu_count() or 1) if text == "auto" else int(text)
    except ValueError:
        instances = 0
    if instances < 1:
        raise UsageError(f"{where} vpn_instances = {text}: expected a count of 1 or more, or auto")
    if len(f"df-{name}-{instances - 1}") > 15 and instances > 1:
        raise UsageError(f"{where} vpn_instances = {instances}: device df-{name}-{instances - 1} would be over "
                         "15 bytes; use a shorter provider name or fewer instances")
    if port + instances - 1 > 65535:
        raise UsageError(f"{where} vpn_instances = {instances}: ports {port}-{port + instances - 1} do not exist")
    if subnet.prefixlen + (instances - 1).bit_length() > 30:
        raise UsageError(f"{where} vpn_instances = {instances}: {subnet} cut in {instances} leaves no room for "
                         "hosts; use a larger vpn_subnet")
    return instances


def parse_pool(text, where):
    """'10.10.0.100-10.10.0.149' -> (first, last) as ints."""
    try:
        first, last = (int(ipaddress.IPv4Address(a.strip())) for a in text.split("-"))
    except ValueError:
        raise UsageError(f"{where} bridge_pool = {text}: expected FIRST-LAST, e.g. 10.10.0.100-10.10.0.149")
    if first > last:
        raise UsageError(f"{where} bridge_pool = {text}: the first address is after the last")
    return first, last


def check_bridged(site, providers, path):
    if not site["bridge"]:
        raise UsageError(f"{path}: mode = bridged needs [site] bridge = the LAN bridge of the VPN server")
    seen = []
    for p in providers.values():
        if p.bridge_pool is None:
            raise UsageError(f"{path}: mode = bridged needs bridge_pool in [provider:{p.name}]")
        if p.instances > 1:
            raise UsageError(f"{path}: [provider:{p.name}] vpn_instances = {p.instances}: bridged mode runs one "
                             "OpenVPN server per provider (its tap in the bridge); use gre or routed mode")
        for other in seen:
            if p.bridge_pool[0] <= other.bridge_pool[1] and other.bridge_pool[0] <= p.bridge_pool[1]:
                raise UsageError(f"{path}: bridge_pool of '{p.name}' overlaps that of '{other.name}'")
        seen.append(p)


def customization_path(given, base, where, key, state_dir):
    """Resolve a customization path (absolute, or relative to site.conf's
    directory). Whatever it names goes to every VM of the provider, so it
    must not be, hold, or lie in the state directory with the site's
    secrets, nor be the whole file system."""
    resolved = os.path.realpath(os.path.join(base, given))
    state = os.path.realpath(state_dir)
    if resolved == "/":
        raise UsageError(f"{where} {key} = {given}: the whole file system would go to every VM")
    if os.path.commonpath([resolved, state]) in (resolved, state):
        raise UsageError(f"{where} {key} = {given}: would send the state directory {state} (the CA key, "
                         "the database) to every VM; keep customization elsewhere")
    return resolved


def parse_link(name, values, index, path):
    where = f"{path}: [link:{name}]"
    try:
        address = ipaddress.IPv4Address(values["address"])
    except ValueError:
        raise UsageError(f"{where} address = {values['address']}: not an IPv4 address")
    if values["encap"] not in ENCAPS:
        raise UsageError(f"{where} encap = {values['encap']}: expected one of {', '.join(ENCAPS)}")
    return Link(name, address, values["encap"], index)


def check_no_overlap(providers, path):
    seen = []
    for p in providers.values():
        for other in seen:
            if p.vpn_subnet.overlaps(other.vpn_subnet):
                raise UsageError(f"{path}: vpn_subnet {p.vpn_subnet} of '{p.name}' overlaps "
                                  f"{other.vpn_subnet} of '{other.name}'")
            shared = {v.port for v in p.vpns} & {v.port for v in other.vpns}
            if shared and p.vpn_proto == other.vpn_proto:
                raise UsageError(f"{path}: '{p.name}' and '{other.name}' both use {p.vpn_proto} port {min(shared)}")
        seen.append(p)


def check_ports_free(providers, listen_port, links, path):
    """A VPN server's port must not be the enrollment server's (tcp) or the
    vxlan links' (udp, 4789) on the same host: one of them would not start."""
    taken = {("tcp", listen_port): "the enrollment server's ([site] listen)"}
    if any(link.encap == "vxlan" for link in links.values()):
        taken[("udp", VXLAN_PORT)] = "the vxlan links'"
    for provider in providers.values():
        for vpn in provider.vpns:
            if (provider.vpn_proto, vpn.port) in taken:
                raise UsageError(f"{path}: [provider:{provider.name}] its server {vpn.name} would use "
                                 f"{provider.vpn_proto} port {vpn.port}, {taken[(provider.vpn_proto, vpn.port)]}")


def parse_duration(text):
    """'90s', '30m', '24h', '7d' or plain seconds -> seconds (at most ten years)."""
    match = re.fullmatch(r"(\d{1,9})([smhd]?)", text.strip())
    seconds = int(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)] if match else 0
    if not 0 < seconds <= 3650 * 86400:
        raise UsageError(f"bad duration '{text}': use e.g. 30m, 24h, 7d (at most 3650d)")
    return seconds


def format_duration(seconds):
    """The shortest form parse_duration reads back: 3600 -> '1h'."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def positive_int(text):
    """argparse type: an integer of at least 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, not '{text}'")
    return value


def seconds(text):
    """argparse type: a number of seconds, 0 or more."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < math.inf:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, 0 or more, not '{text}'")
    return value


# === Store: all SQL lives here ===

SCHEMA = """
CREATE TABLE IF NOT EXISTS hosts (
    name TEXT PRIMARY KEY,
    provider TEXT NOT NULL,
    seq INTEGER NOT NULL,
    address TEXT NOT NULL UNIQUE,
    pubkey_sha256 TEXT NOT NULL UNIQUE,
    machine_id TEXT NOT NULL,
    hostname TEXT NOT NULL,
    serial TEXT,
    host_keys TEXT NOT NULL DEFAULT '[]',
    facts TEXT NOT NULL DEFAULT '{}',
    client_version TEXT,
    enrolled_at REAL,
    last_seen REAL,
    report TEXT,
    revoked_at REAL,
    UNIQUE (provider, seq)
);
CREATE TABLE IF NOT EXISTS tokens (
    id TEXT PRIMARY KEY,
    provider TEXT NOT NULL,
    secret_sha256 TEXT NOT NULL,
    expires_at REAL NOT NULL,
    uses_left INTEGER NOT NULL,
    created_at REAL NOT NULL
);
-- Every certificate handed out, by the key it certifies: a retired host's
-- name goes to another machine, so all of its certificates go on the CRL.
CREATE TABLE IF NOT EXISTS certificates (
    serial TEXT PRIMARY KEY,
    pubkey_sha256 TEXT NOT NULL,
    name TEXT NOT NULL,
    issued_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS certificates_by_key ON certificates (pubkey_sha256);
-- Hosts retired: their name and address are free again, their key refused.
CREATE TABLE IF NOT EXISTS retired (
    pubkey_sha256 TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    provider TEXT NOT NULL,
    address TEXT NOT NULL,
    serial TEXT,
    machine_id TEXT NOT NULL,
    hostname TEXT NOT NULL,
    enrolled_at REAL,
    last_seen REAL,
    retired_at REAL NOT NULL
);
"""


class Store:
    """The site database (sqlite, WAL): one connection per thread, made on
    its first use (the server's workers are long-lived threads)."""

    schema = SCHEMA

    def __init__(self, path):
        self.path = path
        self.local = threading.local()
        # Writers of this process queue here rather than in sqlite's busy
        # handler, which sleeps up to 100 ms between tries while the lock
        # sits free; busy_timeout remains for other processes (token, revoke).
        self.write_lock = threading.Lock()

    @property
    def db(self):
        conn = getattr(self.local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA busy_timeout = 30000")
            # WAL with synchronous=NORMAL: still consistent after a crash; a
            # power cut may lose the last enrollments, which clients redo.
            conn.execute("PRAGMA synchronous = NORMAL")
            self.local.conn = conn
        return conn

    def create(self):
        """Make the database, or add the tables a newer version has; True if it is new."""
        try:   # 0600 from its first byte: another process may check its mode meanwhile (check_secrets)
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            created = True
        except FileExistsError:
            created = False
        self.db.execute("PRAGMA journal_mode = WAL")
        self.db.executescript(self.schema)
        return created

    def transaction(self):
        return Transaction(self.db, self.write_lock)

    def close(self):
        """Close this thread's connection (the last one out checkpoints the WAL)."""
        conn = getattr(self.local, "conn", None)
        if conn is not None:
            conn.close()
            self.local.conn = None

    # tokens
    def add_token(self, token_id, provider, secret_sha256, expires_at, uses):
        self.db.execute("INSERT INTO tokens VALUES (?, ?, ?, ?, ?, ?)",
                        (token_id, provider, secret_sha256, expires_at, uses, time.time()))

    def token(self, token_id):
        return self.db.execute("SELECT * FROM tokens WHERE id = ?", (token_id,)).fetchone()

    def tokens(self):
        return self.db.execute("SELECT * FROM tokens ORDER BY created_at").fetchall()

    def delete_token(self, token_id):
        return self.db.execute("DELETE FROM tokens WHERE id = ?", (token_id,)).rowcount == 1

    def spend_token(self, token_id, now):
        """Take one use if the token is still valid; False if it is not."""
        return self.db.execute("UPDATE tokens SET uses_left = uses_left - 1 "
                               "WHERE id = ? AND uses_left > 0 AND expires_at > ?", (token_id, now)).rowcount == 1

    # hosts
    def host(self, name):
        return self.db.execute("SELECT * FROM hosts WHERE name = ?", (name,)).fetchone()

    def host_by_key(self, pubkey_sha256):
        return self.db.execute("SELECT * FROM hosts WHERE pubkey_sha256 = ?", (pubkey_sha256,)).fetchone()

    def hosts(self, providers=None):
        rows = self.db.execute("SELECT * FROM hosts ORDER BY provider, seq").fetchall()
        return [r for r in rows if not providers or r["provider"] in providers]

    def address_taken(self, address):
        return self.db.execute("SELECT 1 FROM hosts WHERE address = ?", (address,)).fetchone() is not None

    def next_seq(self, provider, above=0):
        """The lowest number above `above` no host of the provider has: a retired host's name is free again."""
        row = self.db.execute(
            "SELECT CASE WHEN NOT EXISTS (SELECT 1 FROM hosts WHERE provider = ?1 AND seq = ?2 + 1) THEN ?2 + 1 "
            "ELSE (SELECT MIN(seq) + 1 FROM hosts AS h WHERE provider = ?1 AND seq > ?2 AND NOT EXISTS "
            "(SELECT 1 FROM hosts WHERE provider = ?1 AND seq = h.seq + 1)) END", (provider, above)).fetchone()
        return row[0]

    def add_host(self, name, provider, seq, address, pubkey_sha256, enrollment):
        """A new host, its enrollment (see enrollment_record) recorded at once."""
        self.db.execute("INSERT INTO hosts (name, provider, seq, address, pubkey_sha256, serial, machine_id, "
                        "hostname, host_keys, facts, client_version, enrolled_at, last_seen) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (name, provider, seq, address, pubkey_sha256) + enrollment)

    def record_enrollment(self, name, pubkey_sha256, enrollment):
        """False if the host is revoked, or gone (its name maybe another
        machine's since): then nothing is recorded."""
        return self.db.execute(
            "UPDATE hosts SET serial = ?, machine_id = ?, hostname = ?, host_keys = ?, facts = ?, "
            "client_version = ?, enrolled_at = ?, last_seen = ? "
            "WHERE name = ? AND pubkey_sha256 = ? AND revoked_at IS NULL",
            enrollment + (name, pubkey_sha256)).rowcount == 1

    def record_report(self, name, report):
        self.db.execute("UPDATE hosts SET report = ?, last_seen = ? WHERE name = ?",
                        (json.dumps(report), time.time(), name))

    def revoke(self, name, pubkey_sha256):
        """False if there is no such host (any more: its name may be another machine's since)."""
        return self.db.execute("UPDATE hosts SET revoked_at = ? WHERE name = ? AND pubkey_sha256 = ?",
                               (time.time(), name, pubkey_sha256)).rowcount == 1

    def record_certificate(self, serial, pubkey_sha256, name):
        self.db.execute("INSERT INTO certificates VALUES (?, ?, ?, ?)", (serial, pubkey_sha256, name, time.time()))

    def revoked_certificates(self):
        """{serial: (name, when)} of every certificate of a revoked or retired
        host (a host's last serial too: certificates began after some were issued)."""
        rows = self.db.execute(
            "SELECT c.serial, h.name, h.revoked_at FROM certificates AS c "
            "JOIN hosts AS h ON h.pubkey_sha256 = c.pubkey_sha256 WHERE h.revoked_at IS NOT NULL "
            "UNION ALL SELECT serial, name, revoked_at FROM hosts WHERE revoked_at IS NOT NULL AND serial IS NOT NULL "
            "UNION ALL SELECT c.serial, r.name, r.retired_at FROM certificates AS c "
            "JOIN retired AS r ON r.pubkey_sha256 = c.pubkey_sha256 "
            "UNION ALL SELECT serial, name, retired_at FROM retired WHERE serial IS NOT NULL").fetchall()
        return {serial: (name, when) for serial, name, when in rows}

    def retire(self, name, pubkey_sha256):
        """Move a host to the retired: its name and address are free again. False if it is gone."""
        moved = self.db.execute(
            "INSERT INTO retired SELECT pubkey_sha256, name, provider, address, serial, machine_id, hostname, "
            "enrolled_at, last_seen, ? FROM hosts WHERE name = ? AND pubkey_sha256 = ?",
            (time.time(), name, pubkey_sha256)).rowcount == 1
        if moved:
            self.db.execute("DELETE FROM hosts WHERE name = ? AND pubkey_sha256 = ?", (name, pubkey_sha256))
        return moved

    def retired(self, providers=None):
        rows = self.db.execute("SELECT * FROM retired ORDER BY provider, retired_at").fetchall()
        return [r for r in rows if not providers or r["provider"] in providers]

    def retired_after(self, rowid):
        """(rowid, provider, address) of the hosts retired after that row, oldest first."""
        return self.db.execute("SELECT rowid, provider, address FROM retired WHERE rowid > ? ORDER BY rowid",
                               (rowid,)).fetchall()

    def retired_key(self, pubkey_sha256):
        return self.db.execute("SELECT * FROM retired WHERE pubkey_sha256 = ?", (pubkey_sha256,)).fetchone()

    def retired_name(self, name):
        """The last host retired under this name, if any."""
        return self.db.execute("SELECT * FROM retired WHERE name = ? ORDER BY retired_at DESC LIMIT 1",
                               (name,)).fetchone()


# The columns an enrollment sets, in the order Store's statements take them.
Enrollment = collections.namedtuple("Enrollment", "serial machine_id hostname host_keys facts client_version "
                                                  "enrolled_at last_seen")


def enrollment_record(serial, machine_id, hostname, host_keys, facts, version):
    now = time.time()
    return Enrollment(serial, machine_id, hostname, json.dumps(host_keys), json.dumps(facts), version, now, now)


EVENTS_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY,
    at REAL NOT NULL,
    kind TEXT NOT NULL,         -- enrolled, re-enrolled, host-keys-changed, refused, revoked, retired,
                                -- token-made, token-revoked
    provider TEXT,
    host TEXT,
    source TEXT,                -- the peer's address, for what came over the network
    detail TEXT NOT NULL DEFAULT '',
    count INTEGER NOT NULL DEFAULT 1
);
CREATE INDEX IF NOT EXISTS events_at ON events (at);
"""


class EventLog(Store):
    """The audit log, events.db beside the site database: what was enrolled,
    refused, revoked, retired, and which tokens were made or revoked, with
    time, provider and source; never a secret. A file of its own, so that
    writing it never waits on an enrollment's lock, and a flood of bad
    requests fills no more than MAX_EVENTS rows of refusals (and never
    pushes out the other events). Refusals are counted
    in memory and written within FLUSH_SECONDS, one row per source and
    reason: a flood costs a counter per request, not a write."""

    schema = EVENTS_SCHEMA
    MAX_EVENTS = 100000
    FLUSH_SECONDS = 1.0

    def __init__(self, path):
        super().__init__(path)
        self.refusals = {}          # (source, reason) -> [count, first at]
        self.refusals_lock = threading.Lock()
        self.timer = None

    def record(self, kind, provider=None, host=None, source=None, detail=""):
        with self.transaction():
            self.db.execute("INSERT INTO events (at, kind, provider, host, source, detail) VALUES (?, ?, ?, ?, ?, ?)",
                            (time.time(), kind, provider, host, source, detail))

    def refused(self, source, reason):
        with self.refusals_lock:
            entry = self.refusals.setdefault((source, reason[:200]), [0, time.time()])
            entry[0] += 1
            if self.timer is None:
                self.timer = threading.Timer(self.FLUSH_SECONDS, self.flush)
                self.timer.daemon = True
                self.timer.start()

    def flush(self):
        """Write the refusals counted so far (the timer does, once a second; so does the server at its end)."""
        with self.refusals_lock:
            refusals, self.refusals, self.timer = self.refusals, {}, None
        if not refusals:
            return
        try:
            self.write_refusals(refusals)
        except (OSError, sqlite3.OperationalError) as e:    # a full disk: the count is lost, not the server
            log(f"audit log: cannot record {sum(c for c, _ in refusals.values())} refusals: {e}")

    def write_refusals(self, refusals):
        with self.transaction():
            self.db.executemany(
                "INSERT INTO events (at, kind, source, detail, count) VALUES (?, 'refused', ?, ?, ?)",
                [(at, source, reason, count) for (source, reason), (count, at) in refusals.items()])
            # Refusals make room among themselves: a flood of them must not
            # push out the record of what was enrolled, revoked or made.
            self.db.execute("DELETE FROM events WHERE kind = 'refused' AND id <= (SELECT id FROM events "
                            "WHERE kind = 'refused' ORDER BY id DESC LIMIT 1 OFFSET ?)", (self.MAX_EVENTS,))

    def events(self, since=0.0, host=None):
        rows = self.db.execute("SELECT * FROM events WHERE at >= ? AND (? IS NULL OR host = ?) ORDER BY at, id",
                               (since, host, host)).fetchall()
        return [dict(row) for row in rows]

    def host_keys_changed(self):
        """{host: when its ssh host keys last changed at a re-enrollment}."""
        return dict(self.db.execute(
            "SELECT host, MAX(at) FROM events WHERE kind = 'host-keys-changed' GROUP BY host").fetchall())


def key_fingerprints(host_keys):
    """'ssh-ed25519 SHA256:abc..., ...' for a list of 'TYPE BASE64' keys, as ssh-keygen -l shows them."""
    prints = []
    for key in host_keys:
        kind, _, blob = key.partition(" ")
        try:
            digest = hashlib.sha256(base64.b64decode(blob.split()[0])).digest()
        except (ValueError, IndexError):
            digest = b""
        prints.append(f"{kind} SHA256:{base64.b64encode(digest).decode().rstrip('=')}")
    return ", ".join(prints) or "none"


def open_events(config):
    """The audit log, made if missing (a site older than it has none yet)."""
    log_ = EventLog(config.state.events)
    log_.create()
    return log_


class Transaction:
    """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on any exception.

    IMMEDIATE takes the write lock up front, so two enrollments can never
    read the same free address and both claim it.
    """

    def __init__(self, db, lock):
        self.db = db
        self.lock = lock

    def __enter__(self):
        self.lock.acquire()
        try:
            self.db.execute("BEGIN IMMEDIATE")
        except BaseException:
            self.lock.release()
            raise
        return self.db

    def __exit__(self, kind, value, tb):
        try:
            self.db.execute("COMMIT" if kind is None else "ROLLBACK")
        finally:
            self.lock.release()
        return False


def open_store(config):
    path = config.state.database
    if not os.path.exists(path):
        raise UsageError(f"{path}: no site database; run 'dynfarm.py -c {config.path} init' first")
    store = Store(path)
    store.create()      # a site made by an older version lacks the newer tables
    return store


# === Tokens ===

TOKEN_ACTIONS = ("list", "revoke")     # 'token list', 'token revoke ID': no provider may be so named


def new_token(store, provider, uses, ttl):
    """Make a token; only its hash is stored. Returns (token, expires_at)."""
    token_id = secrets.token_hex(6)
    secret = secrets.token_urlsafe(24)
    expires_at = time.time() + ttl
    store.add_token(token_id, provider, hash_secret(secret), expires_at, uses)
    return f"{token_id}.{secret}", expires_at


def token_rows(store, now=None):
    """Every token, never its secret: id, provider, uses left, expiry, creation, state."""
    now = now or time.time()
    rows = []
    for row in store.tokens():
        state = "expired" if row["expires_at"] <= now else "used up" if row["uses_left"] <= 0 else "valid"
        rows.append({"id": row["id"], "provider": row["provider"], "uses_left": row["uses_left"],
                     "expires_at": row["expires_at"], "created_at": row["created_at"], "state": state})
    return rows


def revoke_token(store, token_id):
    """Delete a token: whatever holds it enrolls nothing more, from now on."""
    with store.transaction():
        if not store.delete_token(token_id):
            raise UsageError(f"no token {token_id!r} (see 'dynfarm.py token list')")
    return f"token {token_id} revoked: it enrolls no machine from now on (hosts it enrolled stay)"


def hash_secret(secret):
    return hashlib.sha256(secret.encode()).hexdigest()


def check_token(store, token, now=None):
    """The token's row if it may enroll now; RequestError(401) otherwise.

    Tokens are random, so a plain sha256 is enough; the comparison is
    constant-time so the stored hash cannot be probed byte by byte.
    """
    token_id, _, secret = token.partition(".")
    row = store.token(token_id) if token_id and secret else None
    if row is None or not hmac.compare_digest(row["secret_sha256"], hash_secret(secret)):
        raise RequestError(401, "invalid enrollment token")
    if row["expires_at"] <= (now or time.time()):
        raise RequestError(401, "enrollment token expired; make a new one with 'dynfarm.py token PROVIDER'")
    if row["uses_left"] <= 0:
        raise RequestError(401, "enrollment token used up; make a new one with 'dynfarm.py token PROVIDER'")
    return row


# === Addresses and names ===

@dataclasses.dataclass
class Segment:
    """Where a provider's VMs live: their address range, netmask, and the
    VPN server's address there (their gateway and tunnel probe target)."""
    first: int
    last: int
    netmask: str
    server: str

    def describe(self):
        return f"{ipaddress.IPv4Address(self.first)}-{ipaddress.IPv4Address(self.last)}"


def segment(config, vpn):
    """The addresses one OpenVPN server gives out: its slice of the provider's
    subnet (bridged mode: the provider's pool on the LAN)."""
    if config.mode == "bridged":
        lan = bridge_interface(config.bridge)
        pool = vpn.provider.bridge_pool
        return Segment(pool[0], pool[1], str(lan.netmask), str(lan.ip))
    net = vpn.subnet
    return Segment(int(net.network_address) + 2, int(net.broadcast_address) - 1, str(net.netmask),
                   str(vpn.server_address))


# Cached: every enrollment asks, and asking the kernel is a process of its own.
@functools.lru_cache(maxsize=None)
def bridge_interface(bridge):
    """The LAN bridge's IPv4 address and prefix, from the kernel."""
    out = run(["ip", "-o", "-4", "addr", "show", "dev", bridge], check=False)
    fields = out.stdout.decode().split()
    if out.returncode != 0 or "inet" not in fields:
        raise UsageError(f"bridge {bridge}: no such device with an IPv4 address on this host")
    return ipaddress.IPv4Interface(fields[fields.index("inet") + 1])


def allocate_address(seg, taken, start=0):
    """The first free address of a segment from address number start on,
    else the lowest free one, else None; taken(address) says if one is in use."""
    start = min(max(start, seg.first), seg.last)
    for number in itertools.chain(range(start, seg.last + 1), range(seg.first, start)):
        address = str(ipaddress.IPv4Address(number))
        if not taken(address):
            return address
    return None


def host_name(provider, seq):
    return f"{provider}-{seq:04d}"


# === PKI ===

BASE64_TEXT = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/= \t\r\n")


def pem_to_der(text, label):
    """The DER inside one PEM block. Plain string operations, linear in the
    input: a regular expression here once backtracked for minutes on a
    header followed by spaces, holding the interpreter lock."""
    begin, end = f"-----BEGIN {label}-----", f"-----END {label}-----"
    body = text.strip()
    if not (body.startswith(begin) and body.endswith(end)) or len(body) < len(begin) + len(end):
        raise ValueError(f"not a PEM {label.lower()}")
    inner = body[len(begin):len(body) - len(end)]
    if not set(inner) <= BASE64_TEXT:
        raise ValueError(f"not a PEM {label.lower()}")
    try:
        return base64.b64decode("".join(inner.split()), validate=True)
    except ValueError:      # binascii.Error: bad padding
        raise ValueError(f"not a PEM {label.lower()}: bad base64")


def der_element(buf, pos):
    """(tag, start of contents, end of contents) of the DER element at pos."""
    if pos + 2 > len(buf):
        raise ValueError("truncated DER")
    tag, length = buf[pos], buf[pos + 1]
    pos += 2
    if length & 0x80:
        count = length & 0x7F
        if not 0 < count <= 3:
            raise ValueError("bad DER length")
        length = int.from_bytes(buf[pos:pos + count], "big")
        pos += count
    if pos + length > len(buf):
        raise ValueError("truncated DER")
    return tag, pos, pos + length


def der_check(buf, start, end, depth=0):
    """Raise ValueError unless buf[start:end] is DER elements all the way down:
    single-byte tags, minimal lengths, every constructed one well formed too.
    Depth is bounded: a request is 8 KiB at most, its nesting a handful."""
    if depth > 12:
        raise ValueError("DER nested too deep")
    while start < end:
        tag = buf[start]
        if tag & 0x1F == 0x1F:
            raise ValueError("multi-byte DER tag")
        if start + 1 < end and buf[start + 1] & 0x80:
            count = buf[start + 1] & 0x7F
            first = buf[start + 2] if start + 2 < end else 0
            if first == 0 or (count == 1 and first < 0x80):
                raise ValueError("DER length not minimal")
        _, body, after = der_element(buf, start)
        if after > end:
            raise ValueError("truncated DER")
        if tag & 0x20:
            der_check(buf, body, after, depth + 1)
        start = after


def der_children(buf, start, end):
    """The (tag, start, end) of each element between start and end."""
    children = []
    while start < end:
        tag, body, after = der_element(buf, start)
        children.append((tag, start, after))
        start = after
    return children


def csr_public_key(csr_pem):
    """The DER SubjectPublicKeyInfo of a CSR: it identifies the machine."""
    return public_key_of(pem_to_der(csr_pem, "CERTIFICATE REQUEST"), 2)


def cert_public_key(cert_der):
    """The DER SubjectPublicKeyInfo of a certificate."""
    return public_key_of(cert_der, 6)


def public_key_of(der, index):
    """SPKI at position index in the first inner SEQUENCE (CSR info or TBSCertificate)."""
    tag, start, end = der_element(der, 0)
    if tag != 0x30 or end != len(der):
        raise ValueError("not DER")
    tag, info, info_end = der_element(der, start)
    fields = der_children(der, info, info_end)
    if tag != 0x30 or len(fields) <= index or fields[index][0] != 0x30:
        raise ValueError("no public key where one belongs")
    return der[fields[index][1]:fields[index][2]]


# The keys and signatures the CA certifies. OIDs as their DER (06 len bytes).
OID_RSA = bytes.fromhex("06092a864886f70d010101")
OID_EC = bytes.fromhex("06072a8648ce3d0201")
OID_ED25519 = bytes.fromhex("06032b6570")
CURVES = {   # named curve OID: (name, field prime p, b of y^2 = x^3 - 3x + b, bytes per coordinate)
    bytes.fromhex("06082a8648ce3d030107"): ("P-256",
        0xffffffff00000001000000000000000000000000ffffffffffffffffffffffff,
        0x5ac635d8aa3a93e7b3ebbd55769886bc651d06b0cc53b0f63bce3c3e27d2604b, 32),
    bytes.fromhex("06052b81040022"): ("P-384",
        2**384 - 2**128 - 2**96 + 2**32 - 1,
        0xb3312fa7e23ee7e4988e056be3f82d19181d9c6efe8141120314088f5013875ac656398d8a2ed19d2a85c8edd3ec2aef, 48),
    bytes.fromhex("06052b81040023"): ("P-521", 2**521 - 1,
        0x051953eb9618e1c9a1f929a21a0b68540eea2da725b99b315f3b8b489918ef109e156193951ec7e937b1652c0bd3bb1bf073573df883d2c34f1ef451fd46b503f00, 66),
}
SIGNATURES = {   # signature algorithm OID: the key type it goes with (no MD5, no SHA-1)
    bytes.fromhex("06092a864886f70d01010b"): OID_RSA,      # sha256WithRSAEncryption
    bytes.fromhex("06092a864886f70d01010c"): OID_RSA,      # sha384WithRSAEncryption
    bytes.fromhex("06092a864886f70d01010d"): OID_RSA,      # sha512WithRSAEncryption
    bytes.fromhex("06082a8648ce3d040302"): OID_EC,         # ecdsa-with-SHA256
    bytes.fromhex("06082a8648ce3d040303"): OID_EC,         # ecdsa-with-SHA384
    bytes.fromhex("06082a8648ce3d040304"): OID_EC,         # ecdsa-with-SHA512
    OID_ED25519: OID_ED25519,
}
ED25519_P = 2**255 - 19
ED25519_D = 37095705934669439343138083508754565189542113879843219016388785533085940283555
KEY_POLICY = "RSA of 2048 bits or more, EC on P-256, P-384 or P-521, or Ed25519"
SUBJECT_STRINGS = {0x0C, 0x13, 0x16}     # UTF8String, PrintableString, IA5String


def check_csr(csr_pem):
    """The key_id of a CSR that openssl can read and the CA may sign: strict
    DER, a subject of readable strings, a key of the policy (KEY_POLICY,
    points on their curve), a signature algorithm of that key with a
    signature of the right shape. ValueError says what is wrong. Whether
    the signature verifies is openssl's check, when it signs."""
    der = pem_to_der(csr_pem, "CERTIFICATE REQUEST")
    tag, start, end = der_element(der, 0)
    if tag != 0x30 or end != len(der):
        raise ValueError("not a DER certificate request")
    der_check(der, start, end)
    parts = der_children(der, start, end)
    if [t for t, _, _ in parts] != [0x30, 0x30, 0x03]:
        raise ValueError("not a certificate request (info, algorithm, signature)")
    info = inner(der, parts[0])
    if [t for t, _, _ in info] != [0x02, 0x30, 0x30, 0xA0] or der[info[0][1]:info[0][2]] != b"\x02\x01\x00":
        raise ValueError("not a version 1 certificate request")
    check_subject(der, info[1])
    spki = der[info[2][1]:info[2][2]]
    key_type = check_public_key(spki)
    algorithm = inner(der, parts[1])
    oid = der[algorithm[0][1]:algorithm[0][2]] if algorithm else b""
    if SIGNATURES.get(oid) != key_type:
        raise ValueError("signature algorithm not accepted for this key (SHA-256 or better, of the key's type)")
    check_signature_shape(der, parts[2], key_type, spki)
    return key_id(spki)


def inner(der, element):
    """The children of a constructed (tag, start, end) element."""
    return der_children(der, der_element(der, element[1])[1], element[2])


def element_value(der, element):
    """The contents of a (tag, start, end) element."""
    _, body, end = der_element(der, element[1])
    return der[body:end]


OID_COMMON_NAME = bytes.fromhex("0603550403")
NONCE_PREFIX = "nonce:"    # CN holds 64 characters at most: this and 44 of nonce


def csr_common_name(csr_pem):
    """The CN of a CSR's subject ('' if none); only for a CSR check_csr passed."""
    der = pem_to_der(csr_pem, "CERTIFICATE REQUEST")
    _, start, end = der_element(der, 0)
    info = der_children(der, start, end)[0]
    name = inner(der, info)[1]
    for rdn in inner(der, name):
        for attribute in inner(der, rdn):
            oid, value = inner(der, attribute)
            if der[oid[1]:oid[2]] == OID_COMMON_NAME:
                return element_value(der, value).decode("utf-8")
    return ""


def check_subject(der, name):
    for rdn in inner(der, name):
        for attribute in inner(der, rdn):
            pair = inner(der, attribute)
            if len(pair) != 2 or pair[0][0] != 0x06 or pair[1][0] not in SUBJECT_STRINGS:
                raise ValueError("subject: expected OID = UTF8String, PrintableString or IA5String")
            value = element_value(der, pair[1])
            try:
                value.decode("utf-8" if pair[1][0] == 0x0C else "ascii")
            except UnicodeDecodeError:
                raise ValueError("subject: a string that is not what its type says")


def bit_string_bytes(der, element):
    value = element_value(der, element)
    if element[0] != 0x03 or not value or value[0] != 0:
        raise ValueError("bad BIT STRING")
    return value[1:]


def check_public_key(spki):
    """The key's algorithm OID, if the key is one the policy accepts."""
    top = inner(spki, (0x30, 0, len(spki)))
    if len(top) != 2 or top[0][0] != 0x30:
        raise ValueError("bad public key")
    algorithm = inner(spki, top[0])
    oid = spki[algorithm[0][1]:algorithm[0][2]] if algorithm else b""
    params = spki[algorithm[1][1]:algorithm[1][2]] if len(algorithm) > 1 else None
    key = bit_string_bytes(spki, top[1])
    if oid == OID_RSA and params == b"\x05\x00":
        n, e = rsa_numbers(key)
        if not (2048 <= n.bit_length() <= 16384 and n % 2 and 3 <= e <= 2**32 and e % 2):
            raise ValueError(f"RSA key of {max(n.bit_length(), 0)} bits or an exponent not odd from 3 to 2^32; "
                             f"{KEY_POLICY} accepted")
    elif oid == OID_EC and params in CURVES:
        check_ec_point(key, *CURVES[params])
    elif oid == OID_ED25519 and params is None:
        check_ed25519_point(key)
    else:
        raise ValueError(f"key type not accepted; {KEY_POLICY} accepted")
    return oid


def rsa_numbers(key):
    """(n, e) of a DER RSAPublicKey that fills its BIT STRING, in minimal INTEGERs:
    one key, one encoding, so one key_id (and what openssl re-encodes is what was sent)."""
    der_check(key, 0, len(key))
    tag, start, end = der_element(key, 0)
    numbers = der_children(key, start, end) if tag == 0x30 and end == len(key) else []
    if [t for t, _, _ in numbers] != [0x02, 0x02]:
        raise ValueError("bad RSA key")
    values = []
    for number in numbers:
        raw = element_value(key, number)
        if not raw or raw[0] & 0x80 or (len(raw) > 1 and raw[0] == 0 and not raw[1] & 0x80):
            raise ValueError("RSA key: an INTEGER negative or not in its shortest form")
        values.append(int.from_bytes(raw, "big"))
    return values


def check_ec_point(point, name, p, b, size):
    """An uncompressed point on the curve. Compressed points are refused: the
    key_id is the hash of the key as sent, and one key must have one id."""
    if point[:1] in (b"\x02", b"\x03"):
        raise ValueError("EC public key: send the point uncompressed (openssl's default)")
    if point[:1] == b"\x04" and len(point) == 1 + 2 * size:
        x, y = int.from_bytes(point[1:1 + size], "big"), int.from_bytes(point[1 + size:], "big")
        if x < p and y < p and (y * y - (x * x * x - 3 * x + b)) % p == 0:
            return
    raise ValueError(f"EC public key: not a point on {name}")


def check_ed25519_point(key):
    """32 bytes that decode to a point: y < p and (y^2 - 1) / (d y^2 + 1) a square."""
    if len(key) == 32:
        y = int.from_bytes(key, "little") & ((1 << 255) - 1)
        sign = key[31] >> 7
        p = ED25519_P
        if y < p:
            x2 = (y * y - 1) * pow(ED25519_D * y * y + 1, p - 2, p) % p
            if (x2 == 0 and not sign) or (x2 and pow(x2, (p - 1) // 2, p) == 1):
                return
    raise ValueError("Ed25519 public key: not a point")


def check_signature_shape(der, signature, key_type, spki):
    """A signature of the size the key makes: truncated ones are refused here."""
    value = bit_string_bytes(der, signature)
    if key_type == OID_ED25519:
        ok = len(value) == 64
    elif key_type == OID_RSA:
        n, _ = rsa_numbers(bit_string_bytes(spki, inner(spki, (0x30, 0, len(spki)))[1]))
        ok = len(value) == (n.bit_length() + 7) // 8
    else:
        pair = der_children(value, der_element(value, 0)[1], len(value)) if value[:1] == b"\x30" else []
        ok = der_element(value, 0)[2] == len(value) and [t for t, _, _ in pair] == [0x02, 0x02] \
            and all(int.from_bytes(element_value(value, x), "big", signed=True) > 0 for x in pair)
    if not ok:
        raise ValueError("signature of the wrong size or shape for its key")


def cert_expires(cert_pem):
    """notAfter of a PEM certificate, as a Unix time."""
    der = pem_to_der(cert_pem, "CERTIFICATE")
    _, start, _ = der_element(der, 0)
    _, info, info_end = der_element(der, start)
    validity = der_children(der, info, info_end)[4]           # TBSCertificate's 5th field
    _, vstart, vend = der_element(der, validity[1])
    tag, at, _ = der_children(der, vstart, vend)[1]            # notAfter
    _, tstart, tend = der_element(der, at)
    layout = "%y%m%d%H%M%SZ" if tag == 0x17 else "%Y%m%d%H%M%SZ"      # UTCTime or GeneralizedTime
    when = datetime.datetime.strptime(der[tstart:tend].decode(), layout)
    return when.replace(tzinfo=datetime.timezone.utc).timestamp()


def key_id(spki_der):
    return hashlib.sha256(spki_der).hexdigest()


class PKI:
    """The site CA, via the openssl CLI; its files are the StateDir's pki/."""

    def __init__(self, state):
        self.state = state
        self.lock = threading.Lock()

    def ensure(self, public_address):
        """Create what is missing; return the names of what was added."""
        added = []
        os.makedirs(self.state.pki, mode=0o700, exist_ok=True)
        if not os.path.exists(self.state.req_config):
            # Our own minimal openssl config: the distribution's would add its
            # own extensions (v3_ca) to what we sign.
            write_file(self.state.req_config, "[req]\ndistinguished_name = dn\n[dn]\n", 0o600)
        if not os.path.exists(self.state.ca_cert):
            make_key(self.state.ca_key)
            run(["openssl", "req", "-config", self.state.req_config, "-x509", "-new", "-key", self.state.ca_key,
                 "-subj", "/CN=dynfarm site CA", "-days", str(CA_DAYS), "-sha256", "-out", self.state.ca_cert,
                 "-addext", "basicConstraints=critical,CA:TRUE",
                 "-addext", "keyUsage=critical,keyCertSign,cRLSign"])
            added.append(f"site CA ({self.state.relative(self.state.ca_cert)})")
        if not os.path.exists(self.state.server_cert):
            self.make_server_cert(public_address)
            added.append(f"server certificate for {public_address} ({self.state.relative(self.state.server_cert)})")
        elif cert_expires(read_text(self.state.server_cert)) < time.time() + RENEW_BEFORE:
            # Clients pin the CA, not this certificate: a new one is seamless,
            # an expired one stops every VM's VPN and enrollment.
            self.make_server_cert(public_address)
            added.append(f"renewed server certificate for {public_address}, close to expiry "
                         f"({self.state.relative(self.state.server_cert)})")
        if not os.path.exists(self.state.crl):
            self.write_crl()
            added.append(f"empty revocation list ({self.state.relative(self.state.crl)})")
        return added

    def make_server_cert(self, public_address):
        make_key(self.state.server_key)
        csr = make_csr(self.state.server_key, SERVER_CN)
        try:
            ipaddress.ip_address(public_address)
            san = f"IP:{public_address}"
        except ValueError:
            san = f"DNS:{public_address}"
        certificate = self.sign(csr, SERVER_CN, new_serial(), [
            "basicConstraints=critical,CA:FALSE", "keyUsage=critical,digitalSignature,keyAgreement",
            "extendedKeyUsage=serverAuth", f"subjectAltName={san}"])
        write_file(self.state.server_cert, certificate, 0o644)

    def sign(self, csr_pem, common_name, serial, extensions):
        """Check a CSR's self-signature and sign it with CN forced to common_name.

        One 'openssl req -x509 -CA' call does both: about 7 ms, where
        'openssl x509 -req' costs 28 ms here. It reports a bad self-signature
        on stderr only (exit status 0), so that line is what we check.
        """
        argv = ["openssl", "req", "-config", self.state.req_config, "-in", "/dev/stdin", "-verify", "-x509",
                "-CA", self.state.ca_cert, "-CAkey", self.state.ca_key, "-set_serial", "0x" + serial,
                "-days", str(CERT_DAYS), "-sha256", "-subj", f"/CN={common_name}"]
        for extension in extensions:
            argv += ["-addext", extension]
        done = run(argv, input=csr_pem.encode(), check=False)
        if done.returncode != 0:
            detail = done.stderr.decode(errors="replace").strip().splitlines()
            detail = detail[-1] if detail else f"exit {done.returncode}"
            # check_csr lets through only what openssl should read; if it
            # cannot, the request is at fault (400), else the CA is (500).
            if run(["openssl", "req", "-in", "/dev/stdin", "-noout", "-pubkey"], input=csr_pem.encode(),
                   check=False).returncode:
                raise CSRRejected(f"certificate request rejected: openssl cannot read it ({detail})")
            raise Fatal(f"openssl could not sign (dynfarm needs OpenSSL 3.0 or newer): {detail}")
        if b"verify OK" not in done.stderr:
            raise CSRRejected("certificate request rejected: its signature does not verify")
        certificate = done.stdout.decode()
        # Without a request to read, 'req -x509' would make a key of its own:
        # make sure what we signed is the key that was sent.
        if cert_public_key(pem_to_der(certificate, "CERTIFICATE")) != csr_public_key(csr_pem):
            raise Fatal("openssl signed a key other than the request's; refusing its certificate")
        return certificate

    def sign_client(self, csr_pem, name, serial):
        return self.sign(csr_pem, name, serial, [
            "basicConstraints=critical,CA:FALSE", "keyUsage=critical,digitalSignature,keyAgreement",
            "extendedKeyUsage=clientAuth"])

    def write_crl(self, store=None):
        """Regenerate crl.pem from the store's revoked hosts (openssl ca's index format).

        Under a file lock: two 'revoke' runs at once must not each write a
        list that lacks the other's host.
        """
        with self.lock, open(self.state.crl_lock, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            lines = []
            # Read under the lock: a revoke that commits meanwhile writes after us.
            for serial, (name, revoked_at) in (store.revoked_certificates() if store else {}).items():
                when = datetime.datetime.utcfromtimestamp(revoked_at).strftime("%y%m%d%H%M%SZ")
                lines.append(f"R\t991231235959Z\t{when}\t{serial.upper()}\tunknown\t/CN={name}\n")
            write_file(self.state.crl_index, "".join(lines), 0o600)
            write_file(self.state.ca_config,
                       "[ca]\ndefault_ca = dynfarm\n[dynfarm]\n"
                       f"database = {self.state.crl_index}\ncertificate = {self.state.ca_cert}\n"
                       f"private_key = {self.state.ca_key}\ndefault_md = sha256\n"
                       f"default_crl_days = {CRL_DAYS}\n", 0o600)
            run(["openssl", "ca", "-gencrl", "-batch", "-config", self.state.ca_config,
                 "-out", self.state.crl])
            os.chmod(self.state.crl, 0o644)


def new_serial():
    """A random positive serial in lowercase hex without leading zeros: the form
    in which it is stored, put in the CRL and compared with a peer's."""
    return format(secrets.randbits(127) | 1 << 126, "x")


def make_key(path):
    """An EC P-256 private key, 0600 from the first byte."""
    key = run(["openssl", "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"]).stdout
    write_file(path, key, 0o600)


def make_csr(key_path, common_name):
    return run(["openssl", "req", "-new", "-key", key_path, "-subj", f"/CN={common_name}"]).stdout.decode()


# === Network: OpenVPN ===

VPN_SOCKET_BUFFER = 1 << 20     # bytes, each way, at both ends: tunnel_tuning
VPN_TXQUEUELEN = 1000           # packets in the tun device's queue
SOCKET_LIMITS = ("net/core/rmem_max", "net/core/wmem_max")

def openvpn_server_config(config, vpn):
    """One of the provider's OpenVPN servers: static addresses only, split tunnel.

    No address pool: every host gets its static address from its ccd entry,
    and ccd-exclusive refuses certificates that have none (a host of another
    of the provider's servers has its entry there, not here).
    """
    provider = vpn.provider
    lines = [
        f"# {vpn.name}: generated by dynfarm from {config.path}; edits are overwritten",
        "mode server",
        "tls-server",
        f"proto {provider.vpn_proto}4" + ("-server" if provider.vpn_proto == "tcp" else ""),
        f"port {vpn.port}",
        f"dev {vpn.interface}",
    ]
    if config.mode == "bridged":
        # The tap is made and bridged by 'links up' (persistent, so it stays
        # in the bridge when OpenVPN restarts); VMs are on the LAN itself.
        lines += ["dev-type tap", f'push "route-gateway {segment(config, vpn).server}"']
    else:
        lines += [
            "dev-type tun",
            "topology subnet",
            f"ifconfig {vpn.server_address} {vpn.subnet.netmask}",
            'push "topology subnet"',
            f'push "route-gateway {vpn.server_address}"',
        ]
        # Split tunnel: only the linked site hosts are routed through the VPN,
        # and the provider's other slices (its VMs on its other servers).
        lines += [f'push "route {link.address} 255.255.255.255"' for link in config.links.values()]
        if provider.instances > 1 and provider.vm_to_vm:
            lines.append(f'push "route {provider.vpn_subnet.network_address} {provider.vpn_subnet.netmask}"')
    lines += [
        f"client-config-dir {config.state.ccd_dir(vpn.name)}",
        "ccd-exclusive",
        f"ca {config.state.ca_cert}",
        f"cert {config.state.server_cert}",
        f"key {config.state.server_key}",
        "dh none",
        f"crl-verify {config.state.crl}",
        f"tls-crypt {config.state.tls_crypt_key(provider.name)}",
        "tls-version-min 1.2",
        "remote-cert-tls client",
        "keepalive 10 60",
    ] + tunnel_tuning(provider) + ([
        # Stopped or restarted, the server tells its clients to reconnect at
        # once; else each would wait out its ping-restart (60 s). Killed, it
        # cannot: then they do wait.
        "explicit-exit-notify 1",
    ] if provider.vpn_proto == "udp" else []) + [
        "persist-key",
        "persist-tun",
        f"status {config.state.vpn_status(vpn.name)} 5",
        "status-version 2",
        f"management {config.state.management_socket(vpn.name)} unix",
        "verb 3",
    ]
    return "\n".join(lines) + "\n"


def tunnel_tuning(provider):
    """Both ends' settings for bulk transfer, chosen with bench/links.py.

    Untuned, the receiving OpenVPN's socket buffer overflowed and the tun
    queue (100 packets) dropped, so TCP kept backing off: 10-17 thousand
    retransmits per 200 MB. A 1000-packet queue removes the drops, 1 MiB
    socket buffers the overflows (2 MiB did no better), and fast-io (UDP
    only) saves a poll per packet: a tenth less CPU per MB. The kernel caps
    the buffers at net.core.rmem_max/wmem_max: 'links up' and the client
    raise those (socket_buffer_steps, raise_kernel_limits).
    """
    lines = [f"sndbuf {VPN_SOCKET_BUFFER}", f"rcvbuf {VPN_SOCKET_BUFFER}", f"txqueuelen {VPN_TXQUEUELEN}"]
    return lines + (["fast-io"] if provider.vpn_proto == "udp" else [])


def openvpn_client_config(config, vpn, certificate):
    """What the VM runs, to its server; the client adds its own 'key' line (the key never travels)."""
    provider = vpn.provider
    ca = read_text(config.state.ca_cert).strip()
    tls_crypt = read_text(config.state.tls_crypt_key(provider.name)).strip()
    return "\n".join([
        "client",
        "dev tap" if config.mode == "bridged" else "dev tun",
        f"proto {provider.vpn_proto}4",
        f"remote {config.public_address} {vpn.port}",
        "nobind",
        "remote-cert-tls server",
        f"verify-x509-name {SERVER_CN} name",
        # Split tunnel, whatever the server pushes: the VM keeps its own default route.
        'pull-filter ignore "redirect-gateway"',
    ] + ([
        # Over UDP the server would notice a client gone only at its ping
        # timeout; tell it on exit, so 'list' and 'run' see it at once.
        "explicit-exit-notify 1",
    ] if provider.vpn_proto == "udp" else []) + [
        "tls-version-min 1.2",
    ] + tunnel_tuning(provider) + [
        "persist-key",
        "persist-tun",
        "verb 3",
        f"<ca>\n{ca}\n</ca>",
        f"<cert>\n{certificate.strip()}\n</cert>",
        f"<tls-crypt>\n{tls_crypt}\n</tls-crypt>",
    ]) + "\n"


def write_ccd(config, provider, name, address):
    """The host's entry: its static address.

    A new entry is written in place, which costs a third of a temp file and
    a rename: OpenVPN reads it only when the host connects, and the host has
    no certificate to connect with until its enrollment answer (a crash
    meanwhile is mended by reconcile_state). A changed entry is replaced
    atomically; an unchanged one (every reboot) is left be. True if written.
    """
    vpn = provider.vpn_of(address)
    path = config.state.ccd_entry(vpn.name, name)
    entry = f"ifconfig-push {address} {segment(config, vpn).netmask}\n"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        if read_text(path) == entry:
            return False
        write_file(path, entry, 0o644)
        return True
    try:
        os.fchmod(fd, 0o644)
        os.write(fd, entry.encode())
    finally:
        os.close(fd)
    return True


def check_slices(config, store):
    """Refuse to serve hosts whose address no server of their provider gives
    out: vpn_instances changed after they enrolled (auto: the cores did),
    and a host's address may now be a server's own."""
    if config.mode == "bridged":
        return
    astray = []
    for host in store.hosts():
        provider = config.providers.get(host["provider"])
        if provider is None or host["revoked_at"] is not None:
            continue
        seg = segment(config, provider.vpn_of(host["address"]))
        if not seg.first <= int(ipaddress.IPv4Address(host["address"])) <= seg.last:
            astray.append(f"{host['name']} ({host['address']})")
    if astray:
        raise UsageError(f"{len(astray)} enrolled host(s) outside the address ranges of their provider's servers: "
                         f"{', '.join(astray[:5])}{', ...' if len(astray) > 5 else ''}; vpn_instances changed "
                         "after they enrolled: set it back, or retire them")


def reconcile_state(config, store):
    """Make the state directory agree with the database, as a crash may have
    left it: every enrolled host's client-config entry whole, no entry of a
    host that is not (a crash between writing it and the host's row), no
    temp file of write_file's. Returns one line per kind of fix, for the log."""
    fixed = collections.defaultdict(list)
    live = {(config.providers[h["provider"]].vpn_of(h["address"]).name, h["name"]): h for h in store.hosts()
            if h["revoked_at"] is None and h["provider"] in config.providers}
    for vpn in config.vpns:
        directory = config.state.ccd_dir(vpn.name)
        os.makedirs(directory, mode=0o755, exist_ok=True)    # a server added since init
        for name in sorted(os.listdir(directory)):
            if not name.startswith(".dynfarm-") and (vpn.name, name) not in live:
                os.unlink(os.path.join(directory, name))
                fixed["removed the client-config entries of hosts not enrolled"].append(name)
    for host in live.values():
        if write_ccd(config, config.providers[host["provider"]], host["name"], host["address"]):
            fixed["wrote missing or partial client-config entries"].append(host["name"])
    for root, _, names in os.walk(config.state.root):
        for name in names:
            if name.startswith(".dynfarm-"):
                os.unlink(os.path.join(root, name))
                fixed["removed temp files of interrupted writes"].append(config.state.relative(os.path.join(root, name)))
    return [f"{what}: {', '.join(items)}" for what, items in fixed.items()]


def remove_ccd(config, provider, name):
    """The host's client-config entry gone, whichever of the provider's servers has it."""
    for vpn in provider.vpns:
        try:
            os.unlink(config.state.ccd_entry(vpn.name, name))
        except FileNotFoundError:
            pass


def write_server_config(config, vpn):
    """Regenerate an OpenVPN server's configuration if it is missing or stale."""
    path = config.state.vpn_config(vpn.name)
    text = openvpn_server_config(config, vpn)
    try:
        if read_text(path) == text:
            return []
        what = "updated"
    except FileNotFoundError:
        what = "added"
    write_file(path, text, 0o600)
    return [f"OpenVPN server configuration for {vpn.name} ({what}: {config.state.relative(path)})"]


def exec_vpn_server(config, vpn):
    """Become one of a provider's OpenVPN servers (its configuration brought up to date first)."""
    if not os.path.exists(config.state.tls_crypt_key(vpn.provider.name)):
        raise UsageError(f"no VPN state for {vpn.provider.name}; run 'dynfarm.py -c {config.path} init' first")
    if config.mode == "bridged" and not os.path.exists(f"/sys/class/net/{vpn.interface}"):
        raise UsageError(f"bridged mode: no tap {vpn.interface} yet; run 'dynfarm.py links up' first")
    os.makedirs(config.state.ccd_dir(vpn.name), mode=0o755, exist_ok=True)
    write_server_config(config, vpn)
    # The CRL has a next update; written anew at each start, it cannot lapse under a running site.
    PKI(config.state).write_crl(open_store(config))
    argv = ["openvpn", "--config", config.state.vpn_config(vpn.name)]
    if ECHO_COMMANDS:
        log("[#] " + " ".join(shlex.quote(a) for a in argv))
    sys.stdout.flush()
    try:
        os.execvp("openvpn", argv)
    except FileNotFoundError:
        raise Fatal("openvpn: command not found; install the openvpn package")


def management_command(config, vpn_name, command, timeout=2.0):
    """Send one command to a running OpenVPN server; its answer, or None if none runs."""
    path = config.state.management_socket(vpn_name)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(path)
            reader = sock.makefile("rb")
            reader.readline()                       # >INFO greeting
            sock.sendall(command.encode() + b"\n")
            lines = []
            for raw in reader:
                line = raw.decode(errors="replace").rstrip("\r\n")
                if line == "END" or line.startswith(("SUCCESS:", "ERROR:")):
                    lines.append(line)
                    break
                lines.append(line)
            sock.sendall(b"quit\n")
            return lines
    except OSError:
        return None


def connected_clients(config, vpn_name):
    """{common name: real address} from the live server, or None if it is not running."""
    lines = management_command(config, vpn_name, "status 2")
    if lines is None:
        return None
    clients = {}
    for line in lines:
        fields = line.split(",")
        if fields[0] == "CLIENT_LIST" and len(fields) > 2:
            clients[fields[1]] = fields[2]
    return clients


# === Network: links (gre | vxlan), policy routing, firewall ===
#
# In gre mode the VPN server is a router with a wall: packets coming in from
# a provider's tun device are looked up in their own routing table, which
# holds a route to each linked host (through its link) and 'unreachable' for
# everything else. An iptables chain repeats the same rule as a second wall.
# Each linked host runs the other end of its link (links peer NAME) and routes
# the VPN subnets back through it, so the VMs see the linked hosts at their
# real site addresses and nothing else of the site.

LINK_TABLE = 4200                                   # routing table and rule priority
LINK_NET = ipaddress.IPv4Network("169.254.64.0/18")  # a /30 per link, by its index
VXLAN_PORT = 4789
PEER_DEVICE = "dl-dynfarm"                          # the link device on the linked host
FORWARD_CHAIN = "DYNFARM-FWD"
INPUT_CHAIN = "DYNFARM-IN"
MSS_CHAIN = "DYNFARM-MSS"
# What each encapsulation adds to a packet over IPv4: the link device's MTU is
# the way's own less this, so the kernel and the MSS clamp know what fits.
ENCAP_OVERHEAD = {"gre": 20 + 4, "vxlan": 20 + 8 + 8 + 14}

# How a linked host is reached from here: our address on the way, the
# interface it leaves by, and that interface's MTU (link_routes).
Route = collections.namedtuple("Route", "source interface mtu")


def link_addresses(link):
    """(our end, their end) of the link's /30, as strings."""
    base = int(LINK_NET.network_address) + 4 * link.index
    return str(ipaddress.IPv4Address(base + 1)), str(ipaddress.IPv4Address(base + 2))


def link_device_argv(device, link, local, remote):
    """ip(8) argv creating one end of a link; the same for both ends but local/remote."""
    if link.encap == "gre":
        return ["ip", "link", "add", device, "type", "gre", "local", local, "remote", remote, "ttl", "64"]
    return ["ip", "link", "add", device, "type", "vxlan", "id", str(LINK_TABLE + link.index),
            "local", local, "remote", remote, "dstport", str(VXLAN_PORT)]


def step(do, undo=None, previous=None):
    """One action of a plan: its argv, the argv that undoes it, and for a
    sysctl the /proc file whose value the undo restores ({previous})."""
    return {"do": do, "undo": undo, "previous": previous}


def sysctl_step(key, value, may_be_absent=False):
    """key with slashes (net/ipv4/conf/eth0.100/forwarding): interface names
    may hold dots. may_be_absent: a device's key, which sysctl -e skips while
    the device is not there."""
    sysctl = ["sysctl", "-qw"] + (["-e"] if may_be_absent else [])
    return step(sysctl + [f"{key}={value}"], sysctl + [f"{key}={{previous}}"], "/proc/sys/" + key)


def links_plan(config, routes):
    """Every action 'links up' takes, as data; routes maps link name -> Route
    (our address toward that host, the interface the way leaves by, its MTU): link_routes()."""
    if config.mode == "bridged":
        return bridge_steps(config) + socket_buffer_steps()
    plan = forwarding_steps(config, routes)
    if config.mode == "gre":
        plan += link_device_steps(config, routes) + policy_routing_steps(config)
    plan += firewall_steps(config, routes)
    return plan + socket_buffer_steps()


def socket_buffer_steps():
    """The kernel's caps on socket buffers, raised to what OpenVPN asks for
    (tunnel_tuning), never lowered; the undo puts back the value they had
    if they still have ours. Neither touches a cap that is already right, nor
    one this network namespace may read but not write (the host's applies)."""
    plan = []
    for key in SOCKET_LIMITS:
        path = "/proc/sys/" + key
        unless = f'[ ! -w {path} ] || [ "$(cat {path})"'
        plan.append(step(["sh", "-c", f"{unless} -ge {VPN_SOCKET_BUFFER} ] || sysctl -qw {key}={VPN_SOCKET_BUFFER}"],
                         ["sh", "-c", f"{unless} != {VPN_SOCKET_BUFFER} ] || sysctl -qw {key}={{previous}}"], path))
    return plan


def forwarding_steps(config, routes):
    """IPv4 forwarding on the interfaces dynfarm's traffic comes in by, only.

    net.ipv4.ip_forward would switch it on for every interface (and reset
    their own switches and accept_redirects): a server with an outside and a
    LAN side would route one into the other. The kernel asks the interface a
    packet comes in by. OpenVPN makes its tun device anew at each start, so
    new interfaces forward (the default); a tun device already there is
    switched itself (-e: it may not be there). Link devices are made after
    the default changed. In routed mode, the linked hosts' answers come in
    by the interface they live behind.
    """
    plan = [sysctl_step("net/ipv4/conf/default/forwarding", 1)]
    plan += [sysctl_step(f"net/ipv4/conf/{vpn.interface}/forwarding", 1, may_be_absent=True)
             for vpn in config.vpns]
    if config.mode == "routed":
        plan += [sysctl_step(f"net/ipv4/conf/{lan}/forwarding", 1) for lan in link_interfaces(routes)]
    return plan


def link_interfaces(routes):
    """The interfaces the ways to the linked hosts leave by, each once."""
    return sorted({route.interface for route in routes.values()})


def bridge_steps(config):
    """bridged mode: a persistent tap per provider, in the LAN bridge.

    The VMs are then on the site LAN (the paper's second way): they see it
    all, and each other; use gre mode to keep them to chosen hosts.
    """
    plan = []
    for provider in config.providers.values():
        tap = provider.vpns[0].interface
        plan += [step(["ip", "tuntap", "add", "dev", tap, "mode", "tap"], ["ip", "link", "del", tap]),
                 step(["ip", "link", "set", tap, "master", config.bridge]),
                 step(["ip", "link", "set", tap, "up"])]
    return plan


def link_device_steps(config, routes):
    plan = []
    for link in config.links.values():
        ours, theirs = link_addresses(link)
        dev = link.device
        route = routes[link.name]
        plan += [
            step(link_device_argv(dev, link, route.source, str(link.address)), ["ip", "link", "del", dev]),
            step(["ip", "link", "set", dev, "mtu", str(route.mtu - ENCAP_OVERHEAD[link.encap])]),
            step(["ip", "addr", "add", ours + "/30", "dev", dev]),
            # Replies from the linked host come in on the link, not on the LAN
            # where its address lives: loose reverse-path checking only.
            step(["sysctl", "-qw", f"net.ipv4.conf.{dev}.rp_filter=2"]),
            step(["ip", "link", "set", dev, "up"]),
        ]
    return plan


def policy_routing_steps(config):
    table = str(LINK_TABLE)
    plan = []
    for link in config.links.values():
        route = [f"{link.address}/32", "via", link_addresses(link)[1], "dev", link.device, "table", table]
        plan.append(step(["ip", "route", "add"] + route, ["ip", "route", "del"] + route))
    plan.append(step(["ip", "route", "add", "unreachable", "default", "table", table],
                     ["ip", "route", "del", "unreachable", "default", "table", table]))
    for provider in config.providers.values():
        for vpn in provider.vpns:
            if provider.vm_to_vm:       # the provider's whole subnet: its VMs on all its servers
                rule = ["iif", vpn.interface, "to", str(provider.vpn_subnet), "lookup", "main",
                        "pref", str(LINK_TABLE - 1)]
                plan.append(step(["ip", "rule", "add"] + rule, ["ip", "rule", "del"] + rule))
            rule = ["iif", vpn.interface, "lookup", table, "pref", table]
            plan.append(step(["ip", "rule", "add"] + rule, ["ip", "rule", "del"] + rule))
    return plan


def firewall_steps(config, routes):
    """The second wall (filter FORWARD) and MSS clamping (mangle FORWARD)."""
    vpn = "df-+"
    rules = []
    for link in config.links.values():
        if config.mode == "gre":
            rules += [["-i", vpn, "-o", link.device, "-d", str(link.address), "-j", "ACCEPT"],
                      ["-i", link.device, "-s", str(link.address), "-o", vpn, "-j", "ACCEPT"]]
        else:
            # routed: the site's own routing carries the way to and from the
            # linked hosts, and only theirs is let through, on the interface
            # that way takes. Accepting all traffic to the VMs would also let
            # in whatever reaches this host from outside the site (another
            # provider's VMs, through their NAT, included).
            lan = routes[link.name].interface
            rules += [["-i", vpn, "-o", lan, "-d", str(link.address), "-j", "ACCEPT"],
                      ["-i", lan, "-s", str(link.address), "-o", vpn, "-j", "ACCEPT"]]
    if config.mode == "routed":
        # The site's routers on the way say "fragmentation needed" or
        # "unreachable" from their own addresses: let those through for the
        # connections above (and only from the site's side: a VM could forge
        # one about another provider's connection), or path MTU discovery
        # and quick failures break.
        rules += [["-i", lan, "-o", vpn, "-p", "icmp", "-m", "conntrack", "--ctstate", "RELATED", "-j", "ACCEPT"]
                  for lan in link_interfaces(routes)]
    for provider in config.providers.values():
        if provider.vm_to_vm:
            # to the provider's subnet: routed only to its own servers' devices
            rules += [["-i", vpn.interface, "-o", "df-+", "-d", str(provider.vpn_subnet), "-j", "ACCEPT"]
                      for vpn in provider.vpns]
    rules += [["-i", vpn, "-j", "DROP"], ["-o", vpn, "-j", "DROP"]]
    plan = chain_steps("filter", FORWARD_CHAIN, rules)
    # The VPN server is a site host too: from the VMs it answers only the
    # enrollment port (the client's tunnel probe, re-enrollment) and ping, and
    # what answers connections the site opened (remote_control's ssh).
    plan += chain_steps("filter", INPUT_CHAIN, [
        ["-i", vpn, "-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT"],
        ["-i", vpn, "-p", "tcp", "--dport", str(config.listen_port), "-j", "ACCEPT"],
        ["-i", vpn, "-p", "icmp", "--icmp-type", "echo-request", "-j", "ACCEPT"],
        ["-i", vpn, "-j", "DROP"]], hook="INPUT")
    # Tunnels inside tunnels: clamp TCP's MSS to the path MTU of the way out,
    # so bulk transfers never depend on ICMP 'fragmentation needed' getting back.
    clamp = ["-p", "tcp", "--tcp-flags", "SYN,RST", "SYN", "-j", "TCPMSS", "--clamp-mss-to-pmtu"]
    plan += chain_steps("mangle", MSS_CHAIN, [["-o", vpn] + clamp, ["-i", vpn] + clamp])
    return plan


def chain_steps(table, chain, rules, hook="FORWARD"):
    """A chain of ours, filled, then jumped to first from the built-in hook."""
    ipt = ["iptables", "-w", "-t", table]
    plan = [step(ipt + ["-N", chain], ipt + ["-X", chain])]
    plan += [step(ipt + ["-A", chain] + rule, ipt + ["-D", chain] + rule) for rule in rules]
    plan.append(step(ipt + ["-I", hook, "1", "-j", chain], ipt + ["-D", hook, "-j", chain]))
    return plan


def link_routes(config):
    """{link name: Route} to each linked host, as the kernel would route it."""
    routes = {}
    for link in config.links.values():
        route = run(["ip", "-o", "route", "get", str(link.address)]).stdout.decode().split()
        if "src" not in route or "dev" not in route:
            raise UsageError(f"link {link.name}: no route to {link.address} from this host")
        interface = route[route.index("dev") + 1]
        mtu = int(read_text(f"/sys/class/net/{interface}/mtu"))
        routes[link.name] = Route(route[route.index("src") + 1], interface, mtu)
    return routes


def apply_plan(plan, record_path):
    """Run each step; record what was done (with its undo) as we go.

    On a failure, undo what this run did, newest first, and raise: a half-made
    network is worse than none.
    """
    done = []
    try:
        for action in plan:
            undo = action["undo"]
            if action["previous"]:
                undo = [a.replace("{previous}", previous_value(action["previous"])) for a in undo]
            # Recorded before it runs: interrupted mid-step, the step is undone
            # all the same (an undo of what did not happen fails harmlessly).
            done.append({"do": action["do"], "undo": undo})
            write_file(record_path, json.dumps({"boot": boot_id(), "steps": done}, indent=1), 0o600)
            try:
                run(action["do"])
            except Fatal:
                done.pop()
                raise
    except BaseException:
        undo_steps(done)
        remove_file(record_path)
        raise
    return done


def previous_value(path):
    """A sysctl's value before we set it; off for a device not there yet."""
    try:
        return read_text(path).strip()
    except FileNotFoundError:
        return "0"


def boot_id():
    """This boot's id: a record of links made before a reboot describes nothing."""
    try:
        return read_text("/proc/sys/kernel/random/boot_id").strip()
    except OSError:
        return ""


def undo_steps(done):
    """Undo recorded steps, newest first; go on past failures, and report them."""
    failures = []
    for action in reversed(done):
        if action["undo"]:
            result = run(action["undo"], check=False)
            if result.returncode != 0:
                failures.append(" ".join(action["undo"]))
    return failures


def remove_file(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def peer_script(config, link, route, down=False):
    """POSIX sh for the linked host's end: its link device and the routes back.
    route: ours toward that host (Route), whose source is the far end's remote."""
    ours, theirs = link_addresses(link)
    outer = route.source
    create = " ".join(shlex.quote(a) for a in link_device_argv(PEER_DEVICE, link, str(link.address), outer))
    overhead = ENCAP_OVERHEAD[link.encap]
    lines = [
        "#!/bin/sh",
        f"# dynfarm link '{link.name}': the linked host's end ({link.address}), {link.encap} to the VPN server "
        f"{outer}.",
        f"# Run as root on {link.address}:  dynfarm.py links peer {link.name}"
        + (" --down" if down else "") + f" | ssh root@{link.address} sh",
        "set -eu",
        "",
        "main() {",
    ]
    if down:
        lines += [f"    if ip link show {PEER_DEVICE} >/dev/null 2>&1; then ip link del {PEER_DEVICE}; fi"]
    else:
        lines += [
            # The smaller of both ways' MTUs, less the encapsulation (our end knows only its own way).
            f"    dev=$(ip -o route get {outer} | sed -n 's/.* dev \\([^ ]*\\).*/\\1/p')",
            f'    [ -n "$dev" ] || {{ echo "no route to the VPN server {outer}" >&2; exit 1; }}',
            f"    mtu=$(( $(cat /sys/class/net/$dev/mtu) - {overhead} ))",
            f"    if [ \"$mtu\" -gt {route.mtu - overhead} ]; then mtu={route.mtu - overhead}; fi",
            f"    ip link show {PEER_DEVICE} >/dev/null 2>&1 || {create}",
            f"    ip link set {PEER_DEVICE} mtu \"$mtu\"",
            f"    ip addr replace {theirs}/30 dev {PEER_DEVICE}",
            f"    echo 2 > /proc/sys/net/ipv4/conf/{PEER_DEVICE}/rp_filter",
            f"    ip link set {PEER_DEVICE} up",
        ]
        for provider in config.providers.values():
            lines.append(f"    ip route replace {provider.vpn_subnet} via {ours} dev {PEER_DEVICE} src {link.address}")
    lines += ["}", "", 'main "$@"', ""]
    return "\n".join(lines)


def peer_answers(link, timeout=1.0):
    """Does the far end of the link answer? Any TCP answer (even a refusal) counts."""
    with socket.socket() as sock:
        sock.settimeout(timeout)
        try:
            sock.connect((link_addresses(link)[1], 22))
        except ConnectionRefusedError:
            pass
        except OSError:
            return False
        return True


def links_up(config, dry_run=False):
    """Apply the links plan (or print it), recorded with its undo; a changed plan replaces the old."""
    record = config.state.links_record
    plan = links_plan(config, link_routes(config) if config.mode != "bridged" else {})
    if dry_run:
        for action in plan:
            print("[#] " + " ".join(shlex.quote(a) for a in action["do"]))
        return 0
    recorded = read_record(record)
    if recorded is not None:
        if [a["do"] for a in recorded] == [a["do"] for a in plan]:
            print("links already up; nothing changed")
            return 0
        print("configuration changed: taking the old links down first")
        undo_steps(recorded)
        remove_file(record)
    os.makedirs(os.path.dirname(record), mode=0o700, exist_ok=True)
    apply_plan(plan, record)
    print(f"links up ({config.mode} mode): {len(plan)} actions, recorded in {record}; "
          "'dynfarm.py links down' undoes exactly these")
    return 0


def read_record(record):
    """What the last 'links up' did, if it still stands (the kernel forgets at reboot)."""
    try:
        recorded = json.loads(read_text(record))
    except (OSError, ValueError):
        return None
    if recorded.get("boot") != boot_id():
        remove_file(record)     # stale: made before a reboot
        return None
    return recorded["steps"]


def links_down(config):
    """Undo exactly what the last 'links up' recorded."""
    record = config.state.links_record
    recorded = read_record(record)
    if recorded is None:
        print("links are not up; nothing to do")
        return 0
    failures = undo_steps(recorded)
    remove_file(record)
    for failure in failures:
        sys.stderr.write(f"dynfarm: could not undo: {failure}\n")
    print(f"links down: {len(recorded) - len(failures)} of {len(recorded)} actions undone")
    return 1 if failures else 0


def links_status(config):
    """Print the PKI's dates (a warning well before one lapses), then each
    link's state and whether its peer answers; 1 if links are up and a peer
    is silent, or a date is near."""
    near = False
    for line, warn in pki_dates(config):
        print(("WARNING: " if warn else "") + line)
        near = near or warn
    for vpn in config.vpns:
        where = data_channel(vpn.interface)
        print(f"vpn {vpn.name}: " + (f"{vpn.interface}, data channel {where}" if where else "not running"))
    up = read_record(config.state.links_record) is not None
    print(f"mode {config.mode}; links {'up' if up else 'down'}")
    if config.mode == "bridged":
        for provider in config.providers.values():
            vpn = provider.vpns[0]
            bridged = os.path.exists(f"/sys/class/net/{vpn.interface}/brport")
            print(f"  {vpn.interface}: " + ("in bridge " + config.bridge if bridged else "not bridged")
                  + f", pool {segment(config, vpn).describe()}")
        return 0
    if config.mode == "routed":
        subnets = ", ".join(str(p.vpn_subnet) for p in config.providers.values())
        print(f"the site's routers must route {subnets} to this host, e.g.:")
        for provider in config.providers.values():
            print(f"  ip route add {provider.vpn_subnet} via ADDRESS-OF-THIS-HOST")
        return 0
    rows = []
    for link in config.links.values():
        present = os.path.exists(f"/sys/class/net/{link.device}")
        answers = present and peer_answers(link)
        rows.append({"link": link.name, "encap": link.encap, "address": str(link.address),
                     "device": link.device, "state": "up" if present else "absent",
                     "peer": "answers" if answers else "silent"})
    if rows:
        print(format_table(rows, ["link", "encap", "address", "device", "state", "peer"]))
    else:
        print("no [link:NAME] sections: VMs reach only the VPN server")
    return 0 if (all(r["peer"] == "answers" for r in rows) or not up) and not near else 1


WARN_BEFORE = 60 * 86400        # how early `links status` warns of a date: two months


def data_channel(interface):
    """Where a VPN server's data channel runs, told by its device's kind:
    OpenVPN makes an ovpn-dco (2.6) or ovpn (2.7) device when the kernel
    offloads it (DCO), a tun (or bridged mode's tap) otherwise; None if the
    device is not there (its server is not running; bridged mode's tap stays)."""
    out = run(["ip", "-d", "-o", "link", "show", "dev", interface], check=False)
    if out.returncode != 0:
        return None
    words = out.stdout.decode().split()
    if "ovpn-dco" in words or "ovpn" in words:
        return "in the kernel (DCO)"
    return "in user space (" + ("tap: DCO takes tun only" if "tap" in words else "tun") + ")"


def pki_dates(config, now=None):
    """(line, near) for the CA's and the server certificate's expiry and the
    CRL's next update. Past its next update OpenVPN refuses every client, so
    it must never lapse: `vpn` and each revoke regenerate it."""
    now = now or time.time()
    dates = [("site CA expires", cert_expires(read_text(config.state.ca_cert)),
              "make a new CA: every VM must then be enrolled again (see README, Operations)"),
             ("server certificate expires", cert_expires(read_text(config.state.server_cert)),
              "run 'dynfarm.py init', which renews it"),
             ("revocation list (CRL) must be renewed by", crl_next_update(config.state.crl),
              "restart each 'dynfarm.py vpn' server, or revoke a host: either writes it anew")]
    lines = []
    for what, when, fix in dates:
        left = when - now
        days = f"in {int(left // 86400)} days" if left > 0 else "passed"
        line = f"{what} {time.strftime('%Y-%m-%d', time.gmtime(when))} ({days})"
        lines.append((f"{line}; {fix}" if left < WARN_BEFORE else line, left < WARN_BEFORE))
    return lines


def crl_next_update(path):
    """nextUpdate of the CRL, as a Unix time."""
    text = run(["openssl", "crl", "-in", path, "-noout", "-nextupdate"]).stdout.decode()
    stamp = text.strip().split("=", 1)[1]
    return calendar.timegm(time.strptime(stamp, "%b %d %H:%M:%S %Y GMT"))


def links_peer(config, name, down=False):
    """Print the linked host's script (POSIX sh) for its end of link NAME."""
    if name not in config.links:
        known = ", ".join(config.links) or "none"
        raise UsageError(f"no link named '{name}' (configured: {known})")
    link = config.links[name]
    print(peer_script(config, link, link_routes(config)[link.name], down=down), end="")
    return 0


# === Site: init, backup and restore, revoke, retire ===

def check_secrets(config):
    """Refuse to run on secrets that others could read: the state directory
    (0700), the CA and server keys, the tls-crypt keys and the databases
    (0600), all owned by whoever runs dynfarm. What is missing is init's."""
    secrets_ = [config.state.root, config.state.ca_key, config.state.server_key, config.state.database,
                config.state.events] + [config.state.tls_crypt_key(p) for p in config.providers]
    for path in secrets_:
        try:
            st = os.stat(path)
        except FileNotFoundError:
            continue
        if st.st_uid != os.geteuid():
            raise UsageError(f"{path} belongs to uid {st.st_uid}, not to uid {os.geteuid()} that runs dynfarm: "
                             f"run dynfarm as its owner, or chown {os.geteuid()} {path}")
        if st.st_mode & 0o077:
            wanted = "700" if stat.S_ISDIR(st.st_mode) else "600"
            raise UsageError(f"{path} is mode {stat.S_IMODE(st.st_mode):04o}, open to others: chmod {wanted} {path}")


def init_site(config):
    """Create what the site state lacks; the list of what was added (empty: it was complete)."""
    added = []
    os.makedirs(config.state.root, mode=0o700, exist_ok=True)
    for directory in (config.state.run, config.state.openvpn):
        os.makedirs(directory, mode=0o700, exist_ok=True)
    added += PKI(config.state).ensure(config.public_address)
    store = Store(config.state.database)
    if store.create():
        added.append(f"site database ({config.state.relative(config.state.database)})")
    store.close()
    for provider in config.providers.values():
        key = config.state.tls_crypt_key(provider.name)
        if not os.path.exists(key):
            run(["openvpn", "--genkey", "secret", key])
            os.chmod(key, 0o600)
            added.append(f"tls-crypt key for {provider.name}")
        for vpn in provider.vpns:
            os.makedirs(config.state.ccd_dir(vpn.name), mode=0o755, exist_ok=True)
            added += write_server_config(config, vpn)
    return added



# --- backup and restore ---

BACKUP_MANIFEST = "dynfarm-backup.json"
BACKUP_FORMAT = 1


def site_identity(config):
    """What the enrolled VMs know of the site, so what a restored site must
    keep: where they enroll and connect, in which mode and subnets."""
    return {
        "public_address": config.public_address,
        "enrollment_port": config.listen_port,
        "mode": config.mode,
        "providers": {p.name: {"vpn_port": p.vpn_port, "vpn_proto": p.vpn_proto, "vpn_subnet": str(p.vpn_subnet),
                               "vpn_instances": p.instances,
                               "bridge_pool": [str(ipaddress.IPv4Address(a)) for a in p.bridge_pool or ()]}
                      for p in config.providers.values()},
    }


def backup_names(config):
    """{archive name: mode} of what a backup holds: the state that cannot be
    made again. The CRL, the client-config entries and the OpenVPN server
    configurations follow from the database and site.conf (and carry the
    state directory's paths, which may differ on the new machine): restore
    writes them anew. site.conf is there for the admin; restore reads its own."""
    state = config.state
    names = {state.relative(path): 0o600 for path in (state.database, state.events, state.ca_key, state.server_key)}
    names.update({state.relative(path): 0o644 for path in (state.ca_cert, state.server_cert)})
    names.update({state.relative(state.tls_crypt_key(p)): 0o600 for p in config.providers})
    names["site.conf"] = 0o600
    return names


def backup_site(config, path):
    """Write a backup archive of the site, running or not, to path; a one-line summary."""
    state = config.state
    if not os.path.exists(state.database):
        raise UsageError(f"{state.database}: no site database; nothing to back up")
    events = open_events(config)        # a site older than the audit log gets one to back up
    files = {}
    with tempfile.TemporaryDirectory(prefix="dynfarm-backup-") as tmp:    # 0700: the copies hold token hashes
        for database in (state.database, state.events):
            if os.path.exists(database):
                copy = os.path.join(tmp, os.path.basename(database))
                sqlite_snapshot(database, copy)
                files[state.relative(database)] = read_bytes(copy)
        snapshot = Store(os.path.join(tmp, os.path.basename(state.database)))
        hosts = len(snapshot.hosts())
        snapshot.close()
    names = backup_names(config)
    for name in names.keys() - files.keys():
        source = config.path if name == "site.conf" else os.path.join(state.root, name)
        try:
            files[name] = read_bytes(source)
        except OSError as e:
            raise UsageError(f"backup: cannot read {source}: {e.strerror}"
                             + ("; run 'dynfarm.py init' first" if e.errno == errno.ENOENT else ""))
    for cert, key in ((state.ca_cert, state.ca_key), (state.server_cert, state.server_key)):
        check_key_pair(files[state.relative(cert)], files[state.relative(key)], state.relative(cert))
    taken = time.time()
    manifest = {"format": BACKUP_FORMAT, "taken_at": taken, "hosts": hosts, "site": site_identity(config),
                "files": {name: hashlib.sha256(data).hexdigest() for name, data in sorted(files.items())}}
    files[BACKUP_MANIFEST] = json.dumps(manifest, indent=1).encode()
    try:
        write_file(path, tar_gz(files, taken), 0o600, sync=True)
    except OSError as e:
        raise UsageError(f"backup: cannot write {path}: {e.strerror}")
    events.record("backup", detail=f"to {os.path.abspath(path)}, {hosts} host(s)")
    return (f"wrote {path}: {hosts} host(s), taken {time.strftime('%Y-%m-%d %H:%M:%S %Z', time.localtime(taken))}; "
            "it holds the site CA's key: keep it as secret as the state directory")


def sqlite_snapshot(path, copy):
    """A consistent copy of a live database: sqlite's online backup, in one
    step (one read transaction), which writers in WAL mode do not wait for."""
    source, target = sqlite3.connect(path, timeout=30), sqlite3.connect(copy)
    try:
        source.backup(target)
    finally:
        target.close()
        source.close()


def check_key_pair(cert_pem, key_pem, what):
    """A certificate read with another key (init renewing it between the two
    writes) would restore a server nobody can connect to."""
    key = run(["openssl", "pkey", "-pubout", "-outform", "DER"], input=key_pem).stdout
    if cert_public_key(pem_to_der(cert_pem.decode(), "CERTIFICATE")) != key:
        raise Fatal(f"{what} and its key do not match (being renewed?); run the backup again")


def tar_gz(files, mtime):
    """A gzipped tar of {name: bytes}, every member 0600 and root's: it holds secrets."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in sorted(files.items()):
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o600, int(mtime)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def restore_site(config, path):
    """Make a fresh state directory the site of a backup archive; lines saying what was done."""
    manifest, files = read_backup(path, config)
    state = config.state
    if any(os.path.exists(p) for p in (state.database, state.ca_key)):
        raise UsageError(f"{state.root} already holds a site; restore makes a fresh one: "
                         f"move {state.root} aside (or set another state_dir) first")
    differences = identity_differences(manifest["site"], site_identity(config))
    if differences:
        raise UsageError(f"{path} is of a site its VMs know otherwise than {config.path} says: "
                         + "; ".join(differences) + ". Make site.conf agree (the backup's own: "
                         f"tar -xzOf {path} site.conf)")
    run(["openvpn", "--version"], check=False)   # init_site needs it: fail before a half restore
    for directory in (state.root, state.pki, state.openvpn):
        os.makedirs(directory, mode=0o700, exist_ok=True)
    names = backup_names(config)
    for name, data in sorted(files.items()):
        if name != "site.conf":
            write_file(os.path.join(state.root, name), data, names.get(name, 0o600))
    done = [f"restored {manifest['hosts']} host(s) and the site CA into {state.root}"]
    store = open_store(config)
    PKI(state).write_crl(store)         # before init_site, which would write an empty one
    done += init_site(config)
    done += reconcile_state(config, store)
    taken = time.strftime('%Y-%m-%d %H:%M:%S %Z', time.localtime(manifest["taken_at"]))
    open_events(config).record("restored", detail=f"from {os.path.abspath(path)}, taken {taken}")
    return done + [f"the site is as it was at {taken}; a VM enrolled after that is unknown here: "
                   "terminate it at its provider"]


def read_backup(path, config):
    """(manifest, {name: bytes}) of a backup archive: only the files a backup
    writes, each exactly as it was taken. Never extracted by tarfile: we write
    each file ourselves, where it belongs."""
    expected = backup_names(config)
    files = {}
    try:
        with tarfile.open(path, "r:gz") as tar:
            for info in tar:
                if info.name in files or not info.isfile() or not backup_member(info.name, expected):
                    raise UsageError(f"{path}: unexpected member {info.name!r}; not a dynfarm backup")
                files[info.name] = tar.extractfile(info).read()
        manifest = json.loads(files.pop(BACKUP_MANIFEST))
    except (OSError, EOFError, tarfile.TarError, zlib.error, KeyError, ValueError) as e:
        raise UsageError(f"{path}: not a readable dynfarm backup ({e})")
    if not manifest_shaped(manifest):
        raise UsageError(f"{path}: its manifest ({BACKUP_MANIFEST}) is not a dynfarm backup's")
    if manifest["format"] != BACKUP_FORMAT:
        raise UsageError(f"{path}: a backup of format {manifest['format']}; this dynfarm.py reads format "
                         f"{BACKUP_FORMAT}")
    listed = manifest["files"]
    damaged = sorted(name for name in listed.keys() | files.keys()
                     if name not in files or hashlib.sha256(files[name]).hexdigest() != listed.get(name))
    if damaged:
        raise UsageError(f"{path}: damaged: {', '.join(damaged)} missing or not as it was taken")
    return manifest, files


def manifest_shaped(manifest):
    """Has the manifest the fields, types and ranges that restore reads?"""
    def has(value, shape):
        return isinstance(value, dict) and all(isinstance(value.get(k), t) for k, t in shape.items())
    if not has(manifest, {"format": int, "taken_at": (int, float), "hosts": int, "site": dict, "files": dict}):
        return False
    site = manifest["site"]
    return (0 <= manifest["taken_at"] < 1e11
            and has(site, {"public_address": str, "enrollment_port": int, "mode": str, "providers": dict})
            and all(isinstance(values, dict) for values in site["providers"].values()))


def backup_member(name, expected):
    """A name a backup may hold: the manifest, backup_names, or the tls-crypt
    key of a provider that site.conf lacks (which restore then names)."""
    provider = name[len("openvpn/"):-len(".tlscrypt")]
    return (name == BACKUP_MANIFEST or name in expected
            or name == f"openvpn/{provider}.tlscrypt" and PROVIDER_RE.match(provider) is not None)


def identity_differences(backup, here):
    """What the VMs of the backup's site would find changed in this one."""
    differences = [f"{key} {backup[key]} in the backup, {here[key]} here"
                   for key in ("public_address", "enrollment_port", "mode") if backup[key] != here[key]]
    for name, values in sorted(backup["providers"].items()):
        if name not in here["providers"]:
            differences.append(f"provider {name} is not configured here")
            continue
        differences += [f"provider {name}'s {key} {value} in the backup, {here['providers'][name].get(key)} here"
                        for key, value in values.items() if here["providers"][name].get(key) != value]
    return differences



def systemd_units(config):
    """{file name: text}: the site as systemd services. The links come up
    first (bridged mode needs its taps before OpenVPN opens them) and go down
    at stop; each OpenVPN server (PROVIDER, PROVIDER-1, ...) from a template; the enrollment
    server. Each restarts on failure, with what hardening it tolerates: the
    state directory is all it writes."""
    command = f"{shlex.quote(sys.executable)} {shlex.quote(os.path.realpath(__file__))} " \
              f"-c {shlex.quote(os.path.abspath(config.path))}"
    state = shlex.quote(config.state.root)
    hardening = ("NoNewPrivileges=yes\nProtectHome=read-only\nPrivateTmp=yes\n")
    return {
        "dynfarm-links.service": (
            "[Unit]\nDescription=dynfarm: links to the site hosts, policy routing, firewall\n"
            "After=network-online.target\nWants=network-online.target\n\n"
            f"[Service]\nType=oneshot\nRemainAfterExit=yes\nExecStart={command} links up\n"
            f"ExecStop={command} links down\n{hardening}\n"
            "[Install]\nWantedBy=multi-user.target\n"),
        "dynfarm-vpn@.service": (
            "[Unit]\nDescription=dynfarm: the OpenVPN server %i\n"
            "After=network-online.target dynfarm-links.service\nWants=network-online.target dynfarm-links.service\n\n"
            f"[Service]\nExecStart={command} vpn %i\nRestart=on-failure\nRestartSec=2\n"
            f"ProtectSystem=full\nReadWritePaths={state}\n{hardening}\n"
            "[Install]\nWantedBy=multi-user.target\n"),
        "dynfarm-server.service": (
            "[Unit]\nDescription=dynfarm: the enrollment server\n"
            "After=network-online.target\nWants=network-online.target\n\n"
            f"[Service]\nExecStart={command} server\nRestart=on-failure\nRestartSec=2\n"
            # a full house of connections, and the files of its workers
            f"LimitNOFILE={TLSServer.max_connections + 64 + 16 * TLSServer.worker_count()}\n"
            f"ProtectSystem=strict\nReadWritePaths={state}\n{hardening}\n"
            "[Install]\nWantedBy=multi-user.target\n"),
    }


def install_units(config, directory):
    """Write the units into directory; the commands that start them, as lines."""
    units = systemd_units(config)
    for name, text in units.items():
        write_file(os.path.join(directory, name), text, 0o644)
    vpns = " ".join(f"dynfarm-vpn@{v.name}.service" for v in config.vpns)
    return [f"installed {len(units)} units in {directory}; start them with:",
            "  systemctl daemon-reload",
            f"  systemctl enable --now dynfarm-links.service {vpns} dynfarm-server.service"]


def revoke_host(config, name):
    """Revoke a host: refused at re-enrollment, on the CRL, its ccd entry gone, its VPN session ended.

    Returns what was done, as one line.
    """
    store = open_store(config)
    host = store.host(name)
    if host is None:
        raise UsageError(f"no host named {name} (see 'remote_control list')")
    done = revoke(config, store, host)
    open_events(config).record("revoked", host["provider"], host["name"], detail=f"address {host['address']}")
    return done


def revoke(config, store, host):
    with store.transaction():
        # Gone since the read? (retired meanwhile)
        if not store.revoke(host["name"], host["pubkey_sha256"]):
            raise UsageError(f"no host named {host['name']} (see 'remote_control list')")
    provider = config.providers.get(host["provider"])
    if provider is not None:
        remove_ccd(config, provider, host["name"])
    PKI(config.state).write_crl(store)
    vpn = provider.vpn_of(host["address"]) if provider else None     # none runs for a provider dropped
    kicked = vpn and management_command(config, vpn.name, f"kill {host['name']}")
    ended = kicked and any(line.startswith("SUCCESS") for line in kicked)
    return f"revoked {host['name']}" + ("; its VPN session was ended" if ended else "")


RETIRE_POLL = 2.0      # seconds between asks whether a draining node is idle yet


def retire_hosts(config, names, timeout, dry_run=False):
    """Retire hosts: drain each in the batch system, wait until it is idle
    (timeout seconds at most), remove it there, then revoke it and free its
    name and address. Every host is checked before anything is done, and a
    host is revoked only once the batch system has let go of it. The exit
    code: 1 if a host was left enrolled."""
    store = open_store(config)
    hosts = [host_to_retire(store, name) for name in dict.fromkeys(names)]
    if dry_run:
        for host in hosts:
            print(f"would retire {host['name']} ({host['address']}, last seen {ago(host['last_seen'])}): "
                  + ("drain, wait until idle (at most " + format_duration(timeout) + "), remove from the batch "
                     "system, " if config.batch else "no [batch] section: ")
                  + "revoke, free its name and address")
        return 0
    left = 0
    draining = []
    for host in hosts:
        if config.batch:
            done, output = batch_hook(config, "drain", host)
            if not done:
                sys.stderr.write(f"dynfarm: {host['name']}: drain failed ({output}); nothing done\n")
                left += 1
                continue
            print(f"{host['name']}: draining")
        draining.append(host)
    deadline = time.monotonic() + timeout
    while draining:
        for host in list(draining):
            state = node_state(config, host)
            if state == "busy":
                continue
            draining.remove(host)
            if state == "idle":
                left += not release_host(config, store, host)
            else:
                sys.stderr.write(f"dynfarm: {host['name']}: idle check failed ({state}); left drained and enrolled\n")
                left += 1
        if draining and time.monotonic() >= deadline:
            for host in draining:
                sys.stderr.write(f"dynfarm: {host['name']}: still running jobs after {format_duration(timeout)}; "
                                 "left drained and enrolled (retire it again later)\n")
            return 1
        if draining:
            time.sleep(RETIRE_POLL)
    return 1 if left else 0


def host_to_retire(store, name):
    host = store.host(name)
    if host is not None:
        return host
    retired = store.retired_name(name)
    if retired is not None:
        raise UsageError(f"{name} was retired {ago(retired['retired_at'])}; nothing to do")
    raise UsageError(f"no host named {name} (see 'remote_control list')")


def node_state(config, host):
    """'idle', 'busy', or why the [batch] idle command failed (exit 0: idle, 1: busy)."""
    if not config.batch:
        return "idle"
    done = run(["/bin/sh", "-c", config.batch["idle"]], check=False, env=batch_environment(host))
    if done.returncode in (0, 1):
        return ("idle", "busy")[done.returncode]
    return hook_output(done)


def release_host(config, store, host):
    """Remove a drained, idle node from the batch system, revoke it, free its name and address."""
    if config.batch:
        done, output = batch_hook(config, "remove", host)
        if not done:
            sys.stderr.write(f"dynfarm: {host['name']}: remove failed ({output}); left drained and enrolled\n")
            return False
    revoked = revoke(config, store, host)
    with store.transaction():
        store.retire(host["name"], host["pubkey_sha256"])
    open_events(config).record("retired", host["provider"], host["name"],
                               detail=f"address {host['address']} free again")
    print(f"retired {host['name']}: {revoked.partition('; ')[2] or 'revoked'}; "
          f"its name and {host['address']} are free again")
    return True


def batch_hook(config, which, host):
    """Run the [batch] command `which` for host: (succeeded, its last line of output)."""
    done = run(["/bin/sh", "-c", config.batch[which]], check=False, env=batch_environment(host))
    return done.returncode == 0, hook_output(done)


def hook_output(done):
    lines = (done.stdout + done.stderr).decode(errors="replace").strip().splitlines()
    return lines[-1] if lines else f"exit {done.returncode}"


def batch_environment(host):
    """What a [batch] command knows of its node, beside this process's environment."""
    return dict(os.environ, DYNFARM_HOST=host["name"], DYNFARM_PROVIDER=host["provider"],
                DYNFARM_ADDRESS=host["address"], DYNFARM_HOSTNAME=host["hostname"])


def stale_hosts(config, age):
    """Names of the hosts the VPN shows disconnected (or revoked) that have not
    enrolled nor reported (a VM does both at every boot) for age seconds."""
    names, unknown, now = [], set(), time.time()
    for row in host_rows(config, open_store(config), set()):
        if row["state"] == "vpn-down":
            provider = config.providers.get(row["provider"])
            unknown.add(provider.vpn_of(row["address"]).name if provider else row["provider"])
        elif row["state"] in ("disconnected", "revoked") and (row["last_seen"] or 0) < now - age:
            names.append(row["name"])
    for vpn in sorted(unknown):
        sys.stderr.write(f"dynfarm: the hosts of {vpn} are left alone: its VPN server does not run, so "
                         "which are connected is unknown\n")
    return names


# === Enrollment service ===
#
# The enrollment API (see the module docstring) as a plain callable:
# App(request) -> (status, body, headers). It owns its store and its CA; the
# HTTPS transport below parses requests and writes answers, nothing more.

@dataclasses.dataclass
class Request:
    method: str
    path: str
    body: bytes
    peer_ip: str
    peer_cn: str    # CN of a verified client certificate, or ""
    peer_key: str   # key_id of that certificate's public key


# What an enrollment holds while it is signed: the serial it signs with, and
# for a new host (created) its number and the token whose use it will spend
# (seq and token_id are None for a host already enrolled).
Reservation = collections.namedtuple("Reservation", "provider name seq address serial token_id created")


class Holds:
    """What the enrollments being signed hold, in this process: the new
    hosts' names and addresses, the keys of their machines, their token
    uses. Only the server enrolls, so these and the database together say
    what is taken."""

    def __init__(self):
        self.changed = threading.Condition()
        self.names, self.addresses, self.keys = set(), set(), set()
        self.uses = collections.Counter()

    def take(self, held, pubkey):
        self.names.add(held.name)
        self.addresses.add(held.address)
        self.keys.add(pubkey)
        self.uses[held.token_id] += 1

    def spent(self, held):
        """The use is in the database now; under self.changed with the write
        that spent it, so that reserve never counts it twice."""
        self.uses[held.token_id] -= 1
        if not self.uses[held.token_id]:
            del self.uses[held.token_id]

    def let_go(self, held, pubkey, spent):
        with self.changed:
            self.names.discard(held.name)
            self.addresses.discard(held.address)
            self.keys.discard(pubkey)
            if not spent:
                self.spent(held)
            self.changed.notify_all()


class Guesses:
    """Failed token attempts per source (source_key): a bucket of BURST that
    refills one every REFILL seconds. Empty, the source's requests that
    carry a token get 429 before the token is looked at, so a guesser gets
    about one try in REFILL; VMs with good tokens never empty it. The table
    is bounded: full buckets are dropped, and past MAX_SOURCES the oldest."""

    BURST, REFILL, MAX_SOURCES = 20, 6.0, 100000

    def __init__(self):
        self.buckets = collections.OrderedDict()    # source -> (tokens, when counted)
        self.lock = threading.Lock()

    def level(self, source, now):
        tokens, then = self.buckets.get(source, (self.BURST, now))
        return min(self.BURST, tokens + (now - then) / self.REFILL)

    def wait(self, source):
        """Seconds until this source may try a token again (0: now)."""
        now = time.monotonic()
        with self.lock:
            level = self.level(source, now)
        return 0 if level >= 1 else math.ceil((1 - level) * self.REFILL)

    def failed(self, source):
        now = time.monotonic()
        with self.lock:
            level = self.level(source, now) - 1
            self.buckets.pop(source, None)
            self.buckets[source] = (level, now)
            while len(self.buckets) > self.MAX_SOURCES:
                self.buckets.popitem(last=False)
            for old in [s for s, (t, at) in itertools.islice(self.buckets.items(), 64)
                        if t + (now - at) / self.REFILL >= self.BURST]:
                del self.buckets[old]


def out_of_space(error):
    """Is this the state directory refusing writes (full, over quota, read-only)?"""
    if isinstance(error, sqlite3.OperationalError):
        return any(words in str(error) for words in ("disk is full", "readonly database", "disk I/O error"))
    return error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


class Nonces:
    """Fresh proofs of possession: a machine already enrolled that comes
    without its certificate must send a CSR naming a nonce the server gave
    out, once, within NONCE_TTL. A nonce is the time, a random part and
    their HMAC under a key this process made, so handing one out stores
    nothing; a spent one is kept until it would have expired anyway."""

    TTL = 300

    def __init__(self):
        self.key = secrets.token_bytes(32)
        self.spent = {}        # nonce -> when it expires
        self.expiries = collections.deque()     # (when, nonce) in the order spent, so by expiry too
        self.lock = threading.Lock()

    def new(self):
        text = f"{int(time.time())}.{secrets.token_hex(4)}"
        return f"{text}.{self.mac(text)}"

    def mac(self, text):
        return hmac.new(self.key, text.encode(), "sha256").hexdigest()[:24]

    def spend(self, nonce):
        """True once for a nonce of ours that has not expired."""
        if not NONCE_RE.fullmatch(nonce):
            return False
        stamp, random_part, mac = nonce.split(".")
        if not hmac.compare_digest(mac, self.mac(f"{stamp}.{random_part}")):
            return False
        now = time.time()
        expires = int(stamp) + self.TTL
        with self.lock:
            while self.expiries and self.expiries[0][0] < now:     # oldest first: no scan
                del self.spent[self.expiries.popleft()[1]]
            if expires < now or nonce in self.spent:
                return False
            self.spent[nonce] = expires
            self.expiries.append((expires, nonce))
        return True


class App:
    """The enrollment service: a callable Request -> (status, body, headers).

    Enrollments overlap: each certificate is signed outside any lock (a
    few ms of openssl). One invariant makes that safe:

        a certificate leaves only if, after signing, its host's row holds
        its serial, unrevoked.

    A new machine's name, address and token use are held in memory (Holds)
    while it is signed; its row is written after, by the transaction that
    spends the token use. So a request refused at signing, or a crash,
    leaves nothing in the database, and a host in it always has a
    certificate. A second request of that machine waits for the first. A
    known host's row takes its new serial after signing, by a write that
    finds it unrevoked, so a revoke meanwhile lists the certificate it
    uses. An enrollment's life, and its answer:

        held        a new machine: name, address and a token    (signing)
                    use held in memory, nothing written
        stands      signed; the row written (a new host, its     200, the certificate
                    token use spent) or updated (a known one)
        refused     the request or its signing failed, or the    4xx; nothing changed
                    token lapsed meanwhile: the holds let go
        revoked     'revoke' of a known host while it signed     403; its ccd entry goes
        overtaken   a newer enrollment of the same machine       409: the newer answer
                    recorded its own serial                      stands
        retired     'retire' took the known host's row away      409
    """

    def __init__(self, config):
        self.config = config
        self.store = open_store(config)
        self.pki = PKI(config.state)
        self.sources = SourceCache()
        self.source = read_own_source()
        self.version = hashlib.sha256(self.source).hexdigest()
        self.free_from = {}    # OpenVPN server name -> lowest address number that may be free
        self.holds = Holds()
        self.nonces = Nonces()
        self.guesses = Guesses()
        self.events = open_events(config)
        check_slices(config, self.store)
        for fix in reconcile_state(config, self.store):
            log(f"state reconciled with the database: {fix}")
        self.retired_seen = 0  # the last retired row whose address free_from took into account
        self.routes = {
            ("POST", "/v1/enroll"): self.enroll,
            ("GET", "/v1/client"): self.client_download,
            ("POST", "/v1/report"): self.report,
            ("GET", "/v1/health"): self.health,
        }

    def __call__(self, request):
        route = self.routes.get((request.method, request.path))
        if route is None:
            if any(path == request.path for _, path in self.routes):
                return self.refuse(request, RequestError(405, f"{request.method} not allowed on {request.path}"))
            return self.refuse(request, RequestError(404, f"no such endpoint {request.path}"))
        try:
            return route(request)
        except RequestError as e:
            return self.refuse(request, e)
        except CSRRejected as e:
            return self.refuse(request, RequestError(400, str(e)))
        except (OSError, sqlite3.OperationalError) as e:
            if not out_of_space(e):
                raise
            log(f"{request.peer_ip}: {request.method} {request.path}: the state directory cannot be written ({e}); "
                "answered 503, nothing recorded")
            return 503, {"error": "the site cannot record anything now (its disk is full or read-only); "
                                  "try again later"}, {"Retry-After": "60"}

    def record_event(self, *event):
        """An audit event; one that cannot be written (a full disk) must not undo what it records."""
        try:
            self.events.record(*event)
        except (OSError, sqlite3.OperationalError) as e:
            log(f"audit log: cannot record {event[0]} of {event[2]}: {e}")

    def refuse(self, request, error):
        """The answer to a refused request, counted in the audit log (its message holds no secret)."""
        self.events.refused(request.peer_ip, f"{request.method} {request.path}: {error.status} {error}")
        return error.status, error.answer(), error.headers

    def health(self, request):
        return 200, {"ok": True, "version": self.version}, {}

    def client_download(self, request):
        return 200, self.source, {"Content-Type": "text/x-python", "X-Dynfarm-Sha256": self.version}

    def enroll(self, request):
        fields = parse_json(request.body)
        version = fields.get("version")
        if not isinstance(version, str) or not HEX64_RE.fullmatch(version):
            raise RequestError(400, "field 'version' must be the sha256 hex of the client's source")
        if version != self.version:
            # Authenticate before answering, but change nothing: the updated
            # client comes back with the same token.
            self.identify(request, validate_update_request(fields), None)
            return 200, {"status": "update", "sha256": self.version, "url": "/v1/client"}, {}
        fields = validate_enroll_request(fields)
        pubkey = csr_key_id(fields["csr"])
        enrollment = enrollment_record(new_serial(), fields["machine_id"], fields["hostname"],
                                       fields["host_keys"], fields["facts"], version)
        held = self.reserve(request, fields, pubkey, enrollment.serial)
        if held.created:
            return self.enroll_new_host(request, fields, held, pubkey, enrollment)
        row = self.store.host(held.name)
        if row is None:                 # retired since it was found
            raise RequestError(409, f"host {held.name} was retired while this request was read")
        before = json.loads(row["host_keys"])
        certificate = self.pki.sign_client(fields["csr"], held.name, held.serial)
        write_ccd(self.config, held.provider, held.name, held.address)
        if not self.enrollment_stands(held, pubkey, enrollment):
            raise self.overtaken(held, pubkey)
        log(f"{request.peer_ip}: enrolled {held.name} at {held.address} (again)")
        self.record_event("re-enrolled", held.provider.name, held.name, request.peer_ip,
                          "with its certificate" if request.peer_cn else "with a signed nonce")
        if sorted(before) != sorted(fields["host_keys"]):
            self.record_event("host-keys-changed", held.provider.name, held.name, request.peer_ip,
                              f"{key_fingerprints(before)} -> {key_fingerprints(fields['host_keys'])}")
        return 200, self.enrollment_answer(held, certificate), {}

    def enroll_new_host(self, request, fields, held, pubkey, enrollment):
        """Sign, then write the row and spend the token use; whatever fails, let the holds go."""
        written = False
        try:
            certificate = self.pki.sign_client(fields["csr"], held.name, held.serial)
            write_ccd(self.config, held.provider, held.name, held.address)
            with self.holds.changed:
                written = self.record_new_host(held, pubkey, enrollment)
                if written:
                    self.holds.spent(held)
            if not written:
                check_token(self.store, fields["token"])    # raises, saying why
                raise RequestError(401, "invalid enrollment token")
        finally:
            if not written:
                remove_ccd(self.config, held.provider, held.name)
                self.address_freed(held.provider.vpn_of(held.address), held.address)
            self.holds.let_go(held, pubkey, written)
        log(f"{request.peer_ip}: enrolled {held.name} at {held.address}")
        self.record_event("enrolled", held.provider.name, held.name, request.peer_ip, f"address {held.address}")
        return 200, self.enrollment_answer(held, certificate), {}

    def reserve(self, request, fields, pubkey, serial, wait=30.0):
        """The Reservation: a known host's, or a new host's name, address and token use held."""
        with self.holds.changed:
            # The same machine's other request is being signed: its outcome decides what this one is.
            if not self.holds.changed.wait_for(lambda: pubkey not in self.holds.keys, wait):
                raise RequestError(409, "another enrollment of this machine is still being signed; retry")
            provider, known, token = self.identify(request, fields, pubkey)
            if known is not None:
                return Reservation(provider, known["name"], None, known["address"], serial, None, False)
            if token["uses_left"] <= self.holds.uses[token["id"]]:
                raise RequestError(401, "enrollment token used up by the enrollments being signed; "
                                        "make a new one with 'dynfarm.py token PROVIDER'")
            seq, address = self.free_host(provider)
            held = Reservation(provider, host_name(provider.name, seq), seq, address, serial, token["id"], True)
            self.holds.take(held, pubkey)
            return held

    def record_new_host(self, held, pubkey, enrollment):
        """Write a signed new host's row and spend its token use; False if the token lapsed meanwhile."""
        with self.store.transaction():
            if not self.store.spend_token(held.token_id, time.time()):
                return False
            self.store.add_host(held.name, held.provider.name, held.seq, held.address, pubkey, enrollment)
            self.store.record_certificate(held.serial, pubkey, held.name)
            return True

    def enrollment_stands(self, held, pubkey, enrollment):
        """The invariant, checked: a known host's row takes the signed serial if it still may."""
        with self.store.transaction():
            if not self.store.record_enrollment(held.name, pubkey, enrollment):
                return False
            self.store.record_certificate(held.serial, pubkey, held.name)
            return True

    def overtaken(self, held, pubkey):
        """The error for a known host's signed enrollment whose row changed meanwhile (revoked, retired, overtaken)."""
        row = self.store.host(held.name)
        ours = row is not None and row["pubkey_sha256"] == pubkey
        if ours and row["revoked_at"] is None:
            return RequestError(409, f"host {held.name} enrolled again while this request was signed; "
                                     "the newer answer stands")
        if row is None or ours:
            # The retire (or revoke) removed the ccd entry, maybe before our
            # write; a name given to another machine since has its entry now.
            remove_ccd(self.config, held.provider, held.name)
        if ours:
            return RequestError(403, f"host {held.name} is revoked")
        return RequestError(409, f"host {held.name} was retired while this request was signed")

    def identify(self, request, fields, pubkey):
        """(provider, enrolled host or None, token row or None); refuses whoever may not enroll.

        An enrolled host is known by its key: from its client certificate
        (later boots), or from its CSR naming a nonce of ours (check_fresh_proof;
        the signing step verifies its self-signature). Otherwise the token
        names the provider. Source networks are checked either way.
        """
        if request.peer_cn:
            known = self.certified_host(request)
            if pubkey is not None and known["pubkey_sha256"] != pubkey:
                raise RequestError(403, "certificate request key differs from the enrolled key")
        else:
            known = self.store.host_by_key(pubkey) if pubkey else None
            if pubkey and known is None:
                self.refuse_retired(pubkey)
            if known is not None:
                self.check_fresh_proof(fields["csr"])
        if known is not None:
            if known["revoked_at"] is not None:
                raise RequestError(403, f"host {known['name']} is revoked")
            provider_name, token = known["provider"], None
        elif isinstance(fields.get("token"), str) and fields["token"]:
            token = self.checked_token(request, fields["token"])
            provider_name = token["provider"]
        else:
            raise RequestError(401, "missing enrollment token")
        if provider_name not in self.config.providers:
            raise RequestError(403, f"provider {provider_name} is no longer configured")
        provider = self.config.providers[provider_name]
        wanted = fields.get("provider")
        if wanted and wanted != provider.name:
            owner = "token belongs to" if known is None else "machine is enrolled with"
            raise RequestError(403, f"this {owner} provider {provider.name}, not {wanted}")
        source = ipaddress.ip_address(request.peer_ip)
        if source.version == 6 and source.ipv4_mapped:    # an IPv4 client of a [::] listener
            source = source.ipv4_mapped
        if not any(source in net for net in provider.networks):
            raise RequestError(403, f"source address {source} is not in provider {provider.name}'s networks")
        return provider, known, token

    def checked_token(self, request, token):
        """check_token, for a source that has not been guessing (Guesses)."""
        source = source_key(request.peer_ip)
        wait = self.guesses.wait(source)
        if wait:
            raise RequestError(429, f"too many failed token attempts from {source}; try again in {wait} s",
                               retry_after=wait)
        try:
            return check_token(self.store, token)
        except RequestError:
            self.guesses.failed(source)
            raise

    def check_fresh_proof(self, csr_pem):
        """A CSR is no proof by itself (it can be replayed): an enrolled
        machine without its certificate must sign a nonce of ours."""
        name = csr_common_name(csr_pem)
        if not (name.startswith(NONCE_PREFIX) and self.nonces.spend(name[len(NONCE_PREFIX):])):
            raise RequestError(401, "this machine is enrolled: prove it holds its key with a certificate "
                                    f"request whose subject is CN={NONCE_PREFIX}NONCE", nonce=self.nonces.new())

    def refuse_retired(self, pubkey):
        """403 if this key belonged to a host that was retired."""
        retired = self.store.retired_key(pubkey)
        if retired is not None:
            raise RequestError(403, f"this machine was retired (as {retired['name']}); it cannot enroll again")

    def certified_host(self, request):
        """The host whose certificate the peer presented (CA-verified by TLS)."""
        host = self.store.host(request.peer_cn)
        if host is None or host["pubkey_sha256"] != request.peer_key:
            self.refuse_retired(request.peer_key)
            raise RequestError(403, "client certificate does not belong to an enrolled host")
        if host["revoked_at"] is not None:
            raise RequestError(403, f"host {host['name']} is revoked")
        return host

    def free_host(self, provider):
        """(number, address) for a new host: free in the database and not held.
        The provider's servers take new hosts in turn, by number (the next
        one if that one is full)."""
        seq = self.store.next_seq(provider.name)
        while host_name(provider.name, seq) in self.holds.names:
            seq = self.store.next_seq(provider.name, above=seq)
        # Addresses below free_from are taken (this process gave them out,
        # and 'retire' in another process frees them), so the search starts
        # there: one lookup per enrollment, not a scan.
        for rowid, provider_name, freed in self.store.retired_after(self.retired_seen):
            if provider_name in self.config.providers:
                self.address_freed(self.config.providers[provider_name].vpn_of(freed), freed)
            self.retired_seen = rowid
        vpns = provider.vpns
        turn = (seq - 1) % len(vpns)
        for vpn in vpns[turn:] + vpns[:turn]:
            address = allocate_address(segment(self.config, vpn),
                                       lambda a: a in self.holds.addresses or self.store.address_taken(a),
                                       self.free_from.get(vpn.name, 0))
            if address is not None:
                self.free_from[vpn.name] = int(ipaddress.IPv4Address(address)) + 1
                return seq, address
        ranges = ", ".join(segment(self.config, vpn).describe() for vpn in vpns)
        raise RequestError(503, f"provider {provider.name}: no free address left in {ranges}")

    def address_freed(self, vpn, address):
        number = int(ipaddress.IPv4Address(address))
        self.free_from[vpn.name] = min(self.free_from.get(vpn.name, number), number)

    def enrollment_answer(self, held, certificate):
        provider = held.provider
        vpn = provider.vpn_of(held.address)
        seg = segment(self.config, vpn)
        return {
            "status": "enrolled",
            "name": held.name,
            "provider": provider.name,
            "address": held.address,
            "netmask": seg.netmask,
            "vpn_server": seg.server,
            "probe_port": self.config.listen_port,
            "links": {link.name: str(link.address) for link in self.config.links.values()},
            "certificate": certificate,
            "openvpn_config": openvpn_client_config(self.config, vpn, certificate),
            "customization": self.customization(provider),
        }

    def customization(self, provider):
        """The provider's customization as data: the site's ssh keys, files (with modes), commands."""
        keys = []
        for path in self.config.ssh_keys:
            try:
                keys += [line.strip() for line in self.sources.read(path).decode().splitlines() if line.strip()]
            except OSError as e:
                raise RequestError(503, f"site ssh key {path} unreadable: {e.strerror}")
        return {
            "ssh_keys": keys,
            "files": self.sources.tree(provider.files) if provider.files else [],
            "commands": [{"name": os.path.basename(p), "script": self.sources.read(p).decode()}
                         for p in provider.commands],
        }

    def report(self, request):
        if not request.peer_cn:
            raise RequestError(401, "reports need the host's client certificate")
        host = self.certified_host(request)
        report = validate_report(parse_json(request.body))
        self.store.record_report(host["name"], report)
        log(f"{host['name']}: report {'ok' if report['ok'] else 'FAILED'}"
            f" (ready in {report['ready_seconds']:.2f}s)")
        return 200, {"ok": True}, {}


class SourceCache:
    """The files every enrollment sends (the site's ssh keys, a provider's
    tree and commands), read again only when they change.

    Contract: every lookup stats what it serves, so that an admin's edit
    reaches the next enrollment, but reads a file, or builds a tree's
    entries, again only when a stat changed. A stat's key holds ctime too:
    a writer can set mtime back (cp -p, rsync -t, touch -r), not ctime.
    Workers may look up at once: each entry is replaced whole, so the worst
    a race costs is a second read. Measured on a 26-entry tree: 0.18 ms a
    lookup, against 0.56 ms reading it afresh, of 16 ms per enrollment.
    """

    def __init__(self):
        self.files = {}    # path -> (stat key, bytes)
        self.trees = {}    # root -> (every entry's path and stat key, the entries as served)

    @staticmethod
    def stat_key(st):
        return st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns

    def read(self, path, st=None):
        """A file's content."""
        key = self.stat_key(st or os.stat(path))
        cached = self.files.get(path)
        if cached is not None and cached[0] == key:
            return cached[1]
        with open(path, "rb") as f:
            data = f.read()
        self.files[path] = (key, data)
        return data

    def tree(self, root):
        """Every directory and regular file under root, as it should be on the VM (path from /, mode, data)."""
        found = []
        for directory, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for name in sorted(dirnames) + sorted(filenames):
                path = os.path.join(directory, name)
                st = os.lstat(path)
                if stat.S_ISLNK(st.st_mode):
                    if os.path.commonpath([os.path.realpath(path), root]) != root:
                        raise RequestError(503, f"customization {path} links outside its tree")
                    st = os.stat(path)
                found.append((path, st))
        signature = [(path, st.st_mode) + self.stat_key(st) for path, st in found]
        cached = self.trees.get(root)
        if cached is None or cached[0] != signature:
            cached = self.trees[root] = (signature, [self.tree_entry(root, path, st) for path, st in found
                                                     if stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode)])
        return cached[1]

    def tree_entry(self, root, path, st):
        entry = {"path": "/" + os.path.relpath(path, root), "mode": stat.S_IMODE(st.st_mode)}
        if stat.S_ISDIR(st.st_mode):
            entry["type"] = "dir"
        else:
            entry["type"] = "file"
            entry["data"] = base64.b64encode(self.read(path, st)).decode()
        return entry


MAX_JSON_DEPTH = 8


def parse_json(body):
    """A request body: a JSON object of finite numbers and real strings (no
    lone surrogates), nested MAX_JSON_DEPTH deep at most."""
    try:
        value = json.loads(body, parse_constant=refuse_constant)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise RequestError(400, "body is not valid JSON")
    if not isinstance(value, dict):
        raise RequestError(400, "body must be a JSON object")
    check_json_values(value)
    return value


def refuse_constant(name):
    raise ValueError(f"{name} is not a number")


def check_json_values(value):
    """Walk the parsed body (iteratively: no recursion for a client to exhaust)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise RequestError(400, f"body nested deeper than {MAX_JSON_DEPTH} levels")
        if isinstance(item, dict):
            for key, inner in item.items():
                check_json_string(key)
                stack.append((inner, depth + 1))
        elif isinstance(item, list):
            stack.extend((inner, depth + 1) for inner in item)
        elif isinstance(item, str):
            check_json_string(item)
        elif isinstance(item, float) and not math.isfinite(item):
            raise RequestError(400, "numbers must be finite")


def check_json_string(text):
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise RequestError(400, "strings must be Unicode text (a lone surrogate is not)")


# What a machine can have: values past these are not facts.
FACT_RANGES = {"cores": (1, 65536), "memory_mb": (1, 2**32)}

ENROLL_FIELDS = {
    # name: (type, required, max length)
    "version": (str, True, 64),
    "token": (str, False, 128),
    "provider": (str, False, 12),
    "machine_id": (str, True, 64),
    "hostname": (str, True, 253),
    "csr": (str, True, 8192),
    "host_keys": (list, True, 8),
    "facts": (dict, True, 32),
}


def validate_fields(fields, schema):
    for key in fields:
        if key not in schema:
            raise RequestError(400, f"unknown field '{key}'")
    for key, (kind, required, limit) in schema.items():
        if key not in fields:
            if required:
                raise RequestError(400, f"missing field '{key}'")
            continue
        value = fields[key]
        if not isinstance(value, kind) or isinstance(value, bool) != (kind is bool):
            raise RequestError(400, f"field '{key}' must be a {kind.__name__}")
        if kind in (str, list, dict) and len(value) > limit:
            raise RequestError(400, f"field '{key}' is too long (at most {limit})")
    return fields


def validate_update_request(fields):
    """Only what authentication needs: an old client may send other fields."""
    for key in ("token", "provider"):
        if key in fields and not isinstance(fields[key], str):
            raise RequestError(400, f"field '{key}' must be a str")
    return fields


def validate_enroll_request(fields):
    validate_fields(fields, ENROLL_FIELDS)
    if not MACHINE_ID_RE.fullmatch(fields["machine_id"]):
        raise RequestError(400, "field 'machine_id' has characters outside [A-Za-z0-9_.-]")
    if not HOSTNAME_RE.fullmatch(fields["hostname"]):
        raise RequestError(400, "field 'hostname' is not a host name")
    for name, (low, high) in FACT_RANGES.items():
        value = fields["facts"].get(name, low)
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            raise RequestError(400, f"fact '{name}' must be an integer from {low} to {high}")
    if "provider" in fields and not PROVIDER_RE.fullmatch(fields["provider"]):
        raise RequestError(400, "field 'provider' is not a provider name")
    for key in fields["host_keys"]:
        if not isinstance(key, str) or len(key) > 2048 or not HOST_KEY_RE.fullmatch(key):
            raise RequestError(400, "field 'host_keys' must hold 'TYPE BASE64' ssh public keys")
    for name, value in fields["facts"].items():
        if len(name) > 32 or not printable(name) or not isinstance(value, (str, int, float)) \
                or isinstance(value, bool) or (isinstance(value, int) and abs(value) > 2**53) \
                or (isinstance(value, str) and (len(value) > 256 or not printable(value))):
            raise RequestError(400, "field 'facts' must map short names to short printable values")
    return fields


def printable(text):
    """No control characters: facts end up in the admin's terminal."""
    return text.isprintable()


def csr_key_id(csr_pem):
    """key_id of a request's CSR, checked (check_csr) before anything is spent on it."""
    try:
        return check_csr(csr_pem)
    except (ValueError, IndexError) as e:
        raise RequestError(400, f"field 'csr': {e}" if isinstance(e, ValueError) else "field 'csr': malformed")


REPORT_FIELDS = {"ok": (bool, True, 0), "steps": (list, True, 256), "ready_seconds": (float, True, 0)}


def validate_report(fields):
    seconds = fields.get("ready_seconds")
    if isinstance(seconds, int) and not isinstance(seconds, bool) and abs(seconds) <= 2**53:
        fields["ready_seconds"] = float(seconds)
    validate_fields(fields, REPORT_FIELDS)
    if not 0 <= fields["ready_seconds"] <= 86400:
        raise RequestError(400, "field 'ready_seconds' must be from 0 to 86400")
    for step in fields["steps"]:
        if not isinstance(step, dict) or len(json.dumps(step)) > 1024:
            raise RequestError(400, "field 'steps' must hold small objects")
    return fields


# === HTTPS transport ===
#
# TLS and HTTP/1.x for the enrollment service: one thread runs every
# connection without blocking, a few workers call the app. It knows the app
# only as a callable Request -> (status, body, headers).

MAX_HEAD = 16 * 1024        # request line and headers
# TLS records one connection may read per turn of the loop: a peer sending
# one-byte records must not keep the loop from everyone else.
READS_PER_TURN = 16
HEAD_END = re.compile(rb"\r?\n\r?\n")    # a bare LF ends lines too (RFC 9112, 2.2)


class Connection:
    """One client connection: TLS handshake, request, answer, then close.

    The server's loop drives it without ever blocking: each step does what
    the socket allows and returns the event it waits for next, or None when
    its part is done. TLS raises SSLWantRead/WriteError where it must wait.
    """

    def __init__(self, sock, peer, deadline):
        self.sock = sock
        self.peer = peer
        self.deadline = deadline
        self.identity = ("", "")    # (CN, key id) of a verified client certificate
        self.received = bytearray()
        self.searched = 0           # where the search for the end of the head goes on from
        self.head = None            # (method, path, body length) once the head is in
        self.dropped = 0            # bytes of a body over MAX_BODY, read and let go
        self.outgoing = None
        self.step = self.handshake

    def handshake(self):
        self.sock.do_handshake()
        self.identity = peer_identity(self.sock)
        self.step = self.read
        return self.read()

    def read(self):
        """None once the whole request is in; RequestError if it is unusable."""
        for turn in itertools.count(1):
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("the peer closed before its request was complete")
            self.received += chunk
            if (self.head is not None or self.take_head()) and self.body_complete():
                return None
            # The rest waits for the loop's next turn: it is in the kernel's
            # buffer, where the selector sees it, unless OpenSSL holds some.
            if turn >= READS_PER_TURN and not self.sock.pending():
                return selectors.EVENT_READ

    def take_head(self):
        """Parse the request head once it is all in; False until then."""
        end = HEAD_END.search(self.received, self.searched, MAX_HEAD + 4)
        if end is None:
            if len(self.received) >= MAX_HEAD + 4:
                raise RequestError(400, f"request head over {MAX_HEAD} bytes")
            self.searched = max(0, len(self.received) - 3)     # not from the start again
            return False
        self.head = parse_head(bytes(self.received[:end.start()]))
        del self.received[:end.end()]
        return True

    def body_complete(self):
        """Is the body all in? One over MAX_BODY is read to its end (up to
        16 x MAX_BODY: parse_head) and dropped, then refused: closing with
        unread data would reset the connection before the client reads why."""
        if self.head[2] > MAX_BODY:
            self.dropped += len(self.received)
            self.received.clear()
            if self.dropped >= self.head[2]:
                raise RequestError(413, f"body over {MAX_BODY} bytes")
            return False
        return len(self.received) >= self.head[2]

    def body(self):
        return bytes(self.received[:self.head[2]])

    def write(self):
        while self.outgoing:
            self.outgoing = self.outgoing[self.sock.send(self.outgoing):]
        return None


def parse_head(head):
    """(method, path, body length) of a request head; RequestError if unusable."""
    try:
        # Empty lines before the request line are ignored (RFC 9112, 2.2).
        lines = re.split(r"\r?\n", head.decode("latin-1").strip("\r\n"))
        method, target, version = lines[0].split(" ")
    except ValueError:
        raise RequestError(400, "malformed request line")
    if version not in ("HTTP/1.0", "HTTP/1.1"):
        raise RequestError(400, "only HTTP/1.0 and HTTP/1.1 are spoken here")
    if not method.isascii() or not method.isalpha() or not method.isupper():
        raise RequestError(400, "malformed request method")
    if not target.startswith("/") or not target.isascii() or not target.isprintable():
        raise RequestError(400, "malformed request target")
    if not all(line.replace("\t", " ").isprintable() for line in lines[1:]):
        raise RequestError(400, "control characters in a header")
    path = target.split("?")[0]
    lengths = [line.split(":", 1)[1].strip() for line in lines[1:] if line[:15].lower() == "content-length:"]
    if not lengths and method != "POST":
        return method, path, 0
    if len(lengths) != 1 or not (lengths[0].isascii() and lengths[0].isdigit() and len(lengths[0]) <= 12):
        raise RequestError(411, "Content-Length required")
    length = int(lengths[0])
    if length > 16 * MAX_BODY:
        raise RequestError(413, f"body over {MAX_BODY} bytes")
    return method, path, length


def http_answer(status, body, headers):
    """The bytes of an HTTP/1.0 answer; a dict body goes out as JSON."""
    if isinstance(body, dict):
        body = json.dumps(body).encode()
        headers = dict(headers, **{"Content-Type": "application/json"})
    lines = [f"HTTP/1.0 {status} {http.HTTPStatus(status).phrase}", "Server: dynfarm", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def peer_identity(tls_socket):
    """(CN, key id) of a verified client certificate, or ("", "")."""
    cert = tls_socket.getpeercert()
    if not cert:
        return "", ""
    cn = next((v for rdn in cert.get("subject", ()) for k, v in rdn if k == "commonName"), "")
    return cn, key_id(cert_public_key(tls_socket.getpeercert(binary_form=True)))


class TLSServer:
    """The HTTPS server: one thread runs every connection's TLS and HTTP
    without blocking, a few workers call the app.

    A thread per connection cost a thread start, a fresh stack and a fight
    for the interpreter lock per VM of a boot storm; here 500 VMs booting at
    once are 500 sockets in one selector, and their work (openssl, sqlite)
    runs two per core while the rest queue. A connection has
    request_timeout for its handshake and request, and again for taking
    its answer: past either it is closed, so a slow client holds nothing
    but its socket. Its wait for a worker does not count: in a boot storm
    the queue is the server's slowness, not the client's. One source
    address (an IPv6 /64) holds max_per_source of them at most: enough for
    a NAT's VMs booting at once (those turned away retry), too few to hold
    the door; at the global cap, the largest holder's oldest connection
    that has not sent its request makes room (room_for_one).
    """

    max_connections = 1024
    max_per_source = 128
    sweep_seconds = 0.25        # how often deadlines are checked

    @staticmethod
    def worker_count():
        return 2 * (os.cpu_count() or 1)

    def __init__(self, address, app, tls, timeout):
        self.app = app
        self.tls = tls
        self.request_timeout = timeout
        self.socket = socket.socket(socket.AF_INET6 if ":" in address[0] else socket.AF_INET)
        try:
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.socket.bind(address)
            self.socket.listen(1024)
        except OSError as e:
            self.socket.close()
            raise Fatal(f"cannot listen on {address[0]}:{address[1]}: {e.strerror}")
        self.socket.setblocking(False)
        self.server_address = self.socket.getsockname()
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.socket, selectors.EVENT_READ)
        # Workers hand answers back through a queue, and wake the loop with
        # a byte on this pair.
        self.wake_in, self.wake_out = socket.socketpair()
        for sock in (self.wake_in, self.wake_out):
            sock.setblocking(False)
        self.selector.register(self.wake_in, selectors.EVENT_READ)
        self.requests = queue.SimpleQueue()
        self.answers = queue.SimpleQueue()
        self.connections = set()     # touched by the loop's thread only
        self.per_source = collections.Counter()
        self.stopping = threading.Event()
        self.stopped = threading.Event()
        self.workers = [threading.Thread(target=self.work, daemon=True, name="dynfarm-worker")
                        for _ in range(self.worker_count())]
        for worker in self.workers:
            worker.start()

    def serve_forever(self):
        self.stopped.clear()
        sweep = time.monotonic()
        try:
            while not self.stopping.is_set():
                for key, _ in self.selector.select(self.sweep_seconds):
                    if key.fileobj is self.socket:
                        self.accept()
                    elif key.fileobj is self.wake_in:
                        self.take_answers()
                    elif key.data in self.connections:
                        try:
                            self.advance(key.data)
                        except Exception as e:   # a bug: keep serving the others, say so in the log
                            log(f"internal error on a connection from {key.data.peer[0]}: {e!r}")
                            self.close(key.data)
                if time.monotonic() >= sweep:
                    self.close_late()
                    if self.socket not in self.selector.get_map():     # resting: see accept()
                        self.selector.register(self.socket, selectors.EVENT_READ)
                    sweep = time.monotonic() + self.sweep_seconds
        finally:
            self.stopped.set()

    def shutdown(self):
        """Stop serve_forever (running in another thread) and wait for it."""
        self.stopping.set()
        self.wake()
        self.stopped.wait()

    def server_close(self):
        for conn in list(self.connections):
            self.close(conn)
        for _ in self.workers:
            self.requests.put(None)
        self.selector.close()
        for sock in (self.socket, self.wake_in, self.wake_out):
            sock.close()

    def accept(self):
        while True:
            try:
                sock, peer = self.socket.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                # Out of file descriptors, say: the listener would stay
                # readable and spin the loop, so it rests until the next sweep.
                log(f"accept: {e.strerror}; not accepting for a moment")
                self.selector.unregister(self.socket)
                return
            source = source_key(peer[0])
            if self.per_source[source] >= self.max_per_source or not self.room_for_one():
                sock.close()           # at a cap: at once, rather than time out unseen
                continue
            sock.setblocking(False)
            try:
                tls = self.tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
            except OSError:            # reset before we got to it
                sock.close()
                continue
            conn = Connection(tls, peer, time.monotonic() + self.request_timeout)
            self.connections.add(conn)
            self.per_source[source] += 1
            self.selector.register(conn.sock, selectors.EVENT_READ, conn)

    def room_for_one(self):
        """At the global cap, make room by closing the oldest connection of the
        source that holds the most, if it has not yet sent its request: a few
        addresses of idle connections (each at its per-source cap) must not
        hold the door. A client that was only slow retries, as from any cap."""
        if len(self.connections) < self.max_connections:
            return True
        if not self.per_source:
            return False
        (largest, _), = self.per_source.most_common(1)
        idle = [c for c in self.connections if c.head is None and source_key(c.peer[0]) == largest]
        if not idle:
            return False
        self.close(min(idle, key=lambda c: c.deadline or 0))
        return True

    def advance(self, conn):
        try:
            wanted = conn.step()
        except ssl.SSLWantReadError:
            wanted = selectors.EVENT_READ
        except ssl.SSLWantWriteError:
            wanted = selectors.EVENT_WRITE
        except RequestError as e:
            return self.answer(conn, http_answer(e.status, {"error": str(e)}, {}))
        except (OSError, ValueError):    # the peer went away, or spoke no TLS
            return self.close(conn)
        if wanted is not None:
            self.selector.modify(conn.sock, wanted, conn)
        elif conn.step == conn.read:     # the request is in: to a worker
            self.selector.unregister(conn.sock)
            conn.deadline = None         # waiting for us is not the client's slowness
            self.requests.put(conn)
        else:
            self.close(conn)

    def work(self):
        while True:
            conn = self.requests.get()
            if conn is None:
                return
            try:
                data = self.dispatch(conn)
            except Exception as e:   # a bug: answer 500, keep this worker, say so in the log
                log(f"internal error on {conn.head[1]}: {e!r}")
                data = http_answer(500, {"error": "internal server error; see the server log"}, {})
            self.answers.put((conn, data))
            self.wake()

    def dispatch(self, conn):
        method, path, _ = conn.head
        request = Request(method, path, conn.body(), conn.peer[0], *conn.identity)
        started = time.monotonic()
        status, answer, headers = self.app(request)
        if status >= 400:
            log(f"{request.peer_ip}: {request.method} {request.path} -> {status} {answer.get('error', '')} "
                f"({(time.monotonic() - started) * 1000:.0f} ms)")
        return http_answer(status, answer, headers)

    def wake(self):
        try:
            self.wake_out.send(b".")
        except OSError:
            pass    # wake-ups are pending already, or the server is closing

    def take_answers(self):
        try:
            while self.wake_in.recv(4096):
                pass
        except BlockingIOError:
            pass
        while True:
            try:
                conn, data = self.answers.get_nowait()
            except queue.Empty:
                return
            if conn in self.connections:
                conn.deadline = time.monotonic() + self.request_timeout
                self.selector.register(conn.sock, selectors.EVENT_WRITE, conn)
                self.answer(conn, data)

    def answer(self, conn, data):
        conn.outgoing = memoryview(data)
        conn.step = conn.write
        self.advance(conn)

    def close_late(self):
        now = time.monotonic()
        for conn in [c for c in self.connections if c.deadline is not None and c.deadline < now]:
            self.close(conn)

    def close(self, conn):
        if conn in self.connections:
            self.connections.discard(conn)
            source = source_key(conn.peer[0])
            self.per_source[source] -= 1
            if not self.per_source[source]:
                del self.per_source[source]
        try:
            self.selector.unregister(conn.sock)
        except KeyError:
            pass
        conn.sock.close()


def source_key(address):
    """Who a peer is, for limits: its IPv4 address, or its IPv6 /64 (one
    machine gets a whole /64 as easily as one address)."""
    ip = ipaddress.ip_address(address.split("%")[0])
    if ip.version == 6 and ip.ipv4_mapped:
        return str(ip.ipv4_mapped)
    return str(ipaddress.ip_network(f"{ip}/64", strict=False)) if ip.version == 6 else str(ip)


def server_tls_context(config):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(config.state.server_cert, config.state.server_key)
    ctx.load_verify_locations(config.state.ca_cert)
    ctx.verify_mode = ssl.CERT_OPTIONAL     # hosts already enrolled present their certificate
    # No client resumes a session (each boot makes one or two requests), so
    # the two TLS 1.3 tickets per connection would be made and parsed for
    # nothing: 0.13 ms of server and as much of client CPU per handshake.
    ctx.num_tickets = 0
    # A client asking to renegotiate makes the server redo a handshake's work.
    ctx.options |= ssl.OP_NO_RENEGOTIATION
    return ctx


def serve(config):
    # Each worker holds a few more at times (openssl's pipes, sqlite's files).
    raise_open_files_limit(TLSServer.max_connections + 64 + 16 * TLSServer.worker_count())
    app = App(config)
    server = TLSServer((config.listen_host, config.listen_port), app, server_tls_context(config),
                       config.request_timeout)
    log(f"enrollment service on https://{config.listen_host}:{server.server_address[1]} "
        f"(client version {app.version[:12]})")
    try:
        server.serve_forever()
    finally:
        server.server_close()
        app.events.flush()


def raise_open_files_limit(wanted):
    """Raise this process's soft limit on open files toward wanted, as far
    as the hard limit allows: systemd starts services with 1024, fewer than
    a full house of connections plus the files the server keeps open."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted if hard == resource.RLIM_INFINITY
                                                    else min(wanted, hard), hard))


# === Bootstrap: what a fresh VM runs ===

def bootstrap_script(config, provider, token, expires):
    """The POSIX sh that installs the boot hook on a fresh VM and enrolls it now."""
    hook = os.path.join(os.path.dirname(os.path.realpath(__file__)), "dynfarm-client.sh")
    try:
        hook_text = read_text(hook)
    except OSError:
        raise Fatal(f"{hook}: missing; bootstrap ships it to the VM, keep it beside dynfarm.py")
    ca = read_text(config.state.ca_cert)
    url = f"https://{config.public_address}:{config.listen_port}"
    settings = (f"DYNFARM_SERVER={url}\nDYNFARM_CA=/etc/dynfarm/site-ca.pem\n"
                f"DYNFARM_TOKEN={token}\nDYNFARM_PROVIDER={provider.name}\n")
    for text in (hook_text, ca, settings):
        if "\nDYNFARM_EOF\n" in "\n" + text:
            raise Fatal("bootstrap: an embedded file contains the here-document marker DYNFARM_EOF")
    until = time.strftime("%Y-%m-%d %H:%M %Z", time.localtime(expires))
    return f"""#!/bin/sh
# dynfarm bootstrap for provider {provider.name}: run as root on a fresh VM.
# Installs the boot hook and enrolls this machine now. Token valid until {until}.
set -eu

install_files() {{
    umask 077
    mkdir -p /etc/dynfarm /usr/local/sbin
    cat > /etc/dynfarm/site-ca.pem <<'DYNFARM_EOF'
{ca.strip()}
DYNFARM_EOF
    cat > /etc/dynfarm/client.conf <<'DYNFARM_EOF'
{settings.strip()}
DYNFARM_EOF
    cat > /usr/local/sbin/dynfarm-client.sh.new <<'DYNFARM_EOF'
{hook_text.rstrip()}
DYNFARM_EOF
    chmod 0755 /usr/local/sbin/dynfarm-client.sh.new
    mv /usr/local/sbin/dynfarm-client.sh.new /usr/local/sbin/dynfarm-client.sh
}}

install_hook() {{
    if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
        umask 022
        cat > /etc/systemd/system/dynfarm-client.service <<'DYNFARM_EOF'
[Unit]
Description=dynfarm: join the site (VPN, customization)
Wants=network-online.target
After=network-online.target

[Service]
Type=oneshot
ExecStart=/usr/local/sbin/dynfarm-client.sh
RemainAfterExit=yes

[Install]
WantedBy=multi-user.target
DYNFARM_EOF
        systemctl daemon-reload
        systemctl enable dynfarm-client.service
    elif [ -d /etc/cron.d ]; then
        # cron's own PATH lacks the sbin directories where openvpn lives
        printf 'PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\\n%s\\n' \\
            '@reboot root /usr/local/sbin/dynfarm-client.sh' > /etc/cron.d/dynfarm
        chmod 0644 /etc/cron.d/dynfarm
    else
        [ -f /etc/rc.local ] || printf '#!/bin/sh\\n' > /etc/rc.local
        grep -q dynfarm-client.sh /etc/rc.local || printf '/usr/local/sbin/dynfarm-client.sh &\\n' >> /etc/rc.local
        chmod 0755 /etc/rc.local
    fi
}}

main() {{
    install_files
    install_hook
    exec /usr/local/sbin/dynfarm-client.sh
}}

main "$@"
"""


def cloud_init(script):
    """The bootstrap script as cloud-config user-data. Compressed (cloud-init
    inflates write_files content itself): EC2 takes 16 KB of user-data at
    most, and the script with its boot hook is over 25 KB."""
    encoded = base64.b64encode(gzip.compress(script.encode(), 9, mtime=0)).decode()
    return ("#cloud-config\n"
            "write_files:\n"
            "  - path: /run/dynfarm-bootstrap.sh\n"
            "    permissions: '0700'\n"
            "    encoding: gz+b64\n"
            f"    content: {encoded}\n"
            "runcmd:\n"
            "  - [sh, /run/dynfarm-bootstrap.sh]\n")


# === Client ===

class Client:
    """The VM side: enroll (or reuse what is stored), VPN up, customize, report.

    Everything it keeps lives in state_dir; the private key is made there and
    never leaves the machine.
    """

    def __init__(self, server, ca, token, provider, state_dir, home, timeout, wait=0):
        self.server = server.rstrip("/")
        self.ca = ca
        self.token = token
        self.provider = provider
        self.dir = state_dir
        self.home = home
        self.timeout = timeout
        self.wait = wait            # how long a first enrollment keeps trying an unreachable server
        self.steps = []
        # What the client keeps in its state directory (0700):
        at = functools.partial(os.path.join, state_dir)
        self.key_path = at("client.key")            # made here, never sent anywhere
        self.cert_path = at("client.crt")
        self.enrollment_path = at("enrollment.json")  # the last answer: a later boot needs no server
        self.vpn_config_path = at("openvpn.conf")
        self.vpn_pid_path = at("openvpn.pid")
        self.vpn_log_path = at("openvpn.log")
        self.site_keys_path = at("ssh_keys.json")    # the site's keys we put in root's authorized_keys
        self.commands_dir = at("commands")           # the provider's commands, as last run

    def main(self):
        started = time.monotonic()
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        os.chmod(self.dir, 0o700)
        self.ensure_key()
        answer = self.enroll_or_stored()
        self.write_vpn_config(answer)
        self.ensure_tunnel(answer)
        failed = self.apply_customization(answer["customization"], command_environment(answer))
        ready = time.monotonic() - started
        say(f"{answer['name']} ready at {answer['address']} in {ready:.2f}s"
            + (f"; {failed} step(s) failed" if failed else ""))
        self.send_report(not failed, ready)
        return 1 if failed else 0

    def ensure_key(self):
        if not os.path.exists(self.key_path):
            make_key(self.key_path)
            say("made this machine's key")
        os.chmod(self.key_path, 0o600)

    # enrollment

    def enroll_or_stored(self):
        deadline = time.monotonic() + self.wait      # the first try counts
        try:
            answer = self.enroll()
        except ServerUnreachable as e:
            stored = self.stored_answer()
            if stored is not None:
                say(f"enrollment server unreachable ({e}); using the configuration stored at the last enrollment")
                return stored
            answer = self.enroll_when_answered(e, deadline)
        write_file(self.cert_path, answer["certificate"], 0o644)
        write_file(self.enrollment_path, json.dumps(answer, indent=1), 0o600)
        say(f"enrolled as {answer['name']} ({answer['provider']}) at {answer['address']}")
        return answer

    def enroll_when_answered(self, error, deadline):
        """A first enrollment: try again (RETRY_STEPS) until the deadline."""
        pauses = retry_pauses()
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise Fatal(f"enrollment server unreachable ({error}) and nothing stored from an earlier boot"
                            + (f" (kept trying for {self.wait:.0f}s)" if self.wait else ""))
            pause = min(left, next(pauses))
            say(f"enrollment server unreachable ({error}); trying again in {pause:.0f}s")
            time.sleep(pause)
            try:
                return self.enroll()
            except ServerUnreachable as e:
                error = e

    def stored_answer(self):
        try:
            return json.loads(read_text(self.enrollment_path))
        except (OSError, ValueError):
            return None

    def enroll(self):
        request = {
            "version": hashlib.sha256(read_own_source()).hexdigest(),
            "machine_id": machine_id(),
            "hostname": socket.gethostname(),
            "csr": make_csr(self.key_path, "dynfarm-client"),   # the server sets the name
            "host_keys": ssh_host_keys(),
            "facts": machine_facts(),
        }
        if self.token:
            request["token"] = self.token
        if self.provider:
            request["provider"] = self.provider
        try:
            answer = self.call("POST", "/v1/enroll", request)
        except Challenged as e:
            # Enrolled already (an answer lost on the way): prove it holds its key.
            request["csr"] = make_csr(self.key_path, NONCE_PREFIX + e.nonce)
            answer = self.call("POST", "/v1/enroll", request)
        except Overtaken as e:
            say(f"{e}; enrolling again")        # the race is lost once, not twice in a row
            answer = self.call("POST", "/v1/enroll", request)
        if answer.get("status") == "update":
            self.update_self(answer["sha256"])   # does not return
        if answer.get("status") != "enrolled":
            raise Fatal(f"unexpected answer from {self.server}: {answer.get('status')!r}")
        return answer

    def tls_context(self):
        ctx = ssl.create_default_context(cafile=self.ca)   # the site CA only: pinned
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if self.certificate_usable():
            ctx.load_cert_chain(self.cert_path, self.key_path)
        return ctx

    def certificate_usable(self):
        """Present our certificate only while it is valid: an expired one would
        make the server refuse the handshake, where the token still works."""
        try:
            return cert_expires(read_text(self.cert_path)) > time.time() + 60
        except (OSError, ValueError):
            return False

    def call(self, method, path, body=None):
        """JSON over HTTPS; ServerUnreachable when nobody answers, Fatal when refused."""
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.server + path, data=data, method=method,
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout, context=self.tls_context()) as r:
                raw = r.read()
                return raw if path == "/v1/client" else json.loads(raw)
        except urllib.error.HTTPError as e:
            try:
                answer = json.loads(e.read())
            except ValueError:
                answer = {}
            message = f"{self.server} refused {path}: {e.code} {answer.get('error') or e.reason}"
            if e.code == 401 and isinstance(answer.get("nonce"), str):
                raise Challenged(message, answer["nonce"])
            if e.code in (429, 503):    # told to come back (a NAT we share guessed tokens; a full disk)
                raise ServerUnreachable(message)
            raise (Overtaken if e.code == 409 else Fatal)(message)
        except (urllib.error.URLError, OSError, ValueError) as e:
            reason = getattr(e, "reason", e)
            if isinstance(reason, ssl.SSLCertVerificationError):
                raise Fatal(f"{self.server}: its certificate does not verify against the pinned site CA "
                            f"{self.ca} ({reason.verify_message})")
            raise ServerUnreachable(str(reason))

    def update_self(self, expected):
        """Replace this file with the server's version (hash checked), then run again once."""
        if os.environ.get("DYNFARM_UPDATED") == expected:
            raise Fatal("the server asks for an update again right after one; its dynfarm.py changed meanwhile?")
        source = self.call("GET", "/v1/client")
        if hashlib.sha256(source).hexdigest() != expected:
            raise Fatal("downloaded dynfarm.py does not match the announced hash; not installed")
        own = os.path.realpath(__file__)
        write_file(own, source, stat.S_IMODE(os.stat(own).st_mode))
        say(f"updated {own} to {expected[:12]}; running it")
        os.environ["DYNFARM_UPDATED"] = expected
        sys.stdout.flush()
        os.execv(sys.executable, [sys.executable, own] + sys.argv[1:])

    # the tunnel

    def write_vpn_config(self, answer):
        text = answer["openvpn_config"] + f"key {self.key_path}\n"
        write_file(self.vpn_config_path, text, 0o600)

    def ensure_tunnel(self, answer):
        """Start OpenVPN unless a tunnel of ours already carries traffic."""
        if self.openvpn_pid() and tunnel_carries_traffic(answer, 1.0):
            say("tunnel already up; left as it is")
            return
        self.stop_openvpn()
        for warning in raise_kernel_limits():
            say(warning)
        run(["openvpn", "--daemon", "dynfarm-client", "--config", self.vpn_config_path,
             "--writepid", self.vpn_pid_path, "--log", self.vpn_log_path])
        started = time.monotonic()
        while time.monotonic() - started < self.timeout:
            if tunnel_carries_traffic(answer, 0.5):
                say(f"tunnel up: {answer['address']} reaches {answer['vpn_server']}")
                return
            if time.monotonic() - started > 1 and not self.openvpn_pid():
                raise Fatal(f"openvpn exited; see {self.vpn_log_path}: "
                            f"{last_line(self.vpn_log_path)}")
            time.sleep(0.05)
        raise Fatal(f"VPN tunnel to {answer['vpn_server']} not carrying traffic after {self.timeout:.0f}s; "
                    f"see {self.vpn_log_path}: {last_line(self.vpn_log_path)}")

    def openvpn_pid(self):
        """The pid of our openvpn if it runs (checked in /proc, not trusted from the file)."""
        try:
            pid = int(read_text(self.vpn_pid_path).strip())
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().split(b"\0")
        except (OSError, ValueError):
            return None
        return pid if self.vpn_config_path.encode() in cmdline else None

    def stop_openvpn(self):
        pid = self.openvpn_pid()
        if pid:
            os.kill(pid, 15)
            for _ in range(100):
                if not os.path.exists(f"/proc/{pid}"):
                    break
                time.sleep(0.05)

    # customization

    def apply_customization(self, custom, env=None):
        """ssh keys, files, commands (run with env), in that order; returns how many steps failed."""
        self.install_ssh_keys(custom["ssh_keys"])
        for entry in custom["files"]:
            self.apply_file(entry)
        failed = 0
        for command in custom["commands"]:
            script = os.path.join(self.commands_dir, command["name"])
            write_file(script, command["script"], 0o700)
            if ECHO_COMMANDS:
                log(f"[#] /bin/sh {shlex.quote(script)}")
            done = subprocess.run(["/bin/sh", script], cwd="/", capture_output=True, env=env)
            self.steps.append({"step": "command " + command["name"], "rc": done.returncode})
            say(f"command {command['name']}: exit {done.returncode}")
            for line in (done.stdout + done.stderr).decode(errors="replace").splitlines()[-5:]:
                say(f"  {command['name']}: {line}")
            failed += done.returncode != 0
        return failed

    def install_ssh_keys(self, keys):
        """The site's keys for root, once each; keys the site dropped since the
        last boot go (only those dynfarm put there: the rest is the VM's)."""
        ssh_dir = os.path.join(self.home, ".ssh")
        os.makedirs(ssh_dir, mode=0o700, exist_ok=True)
        path = os.path.join(ssh_dir, "authorized_keys")
        try:
            present = read_text(path).splitlines()
        except FileNotFoundError:
            present = []
        try:
            ours_before = json.loads(read_text(self.site_keys_path))
        except (OSError, ValueError):
            ours_before = []
        dropped = [k for k in ours_before if k not in keys]
        kept = [line for line in present if line not in dropped]
        missing = [k for k in keys if k not in kept]
        if missing or dropped or not os.path.exists(path):
            write_file(path, "".join(line + "\n" for line in kept + missing), 0o600)
        write_file(self.site_keys_path, json.dumps(keys), 0o600)
        self.steps.append({"step": "ssh keys", "added": len(missing), "removed": len(present) - len(kept)})

    def apply_file(self, entry):
        target = os.path.normpath(entry["path"])
        if not target.startswith("/") or ".." in target.split("/"):
            raise Fatal(f"refusing customization path {entry['path']!r}")
        if entry["type"] == "dir":
            # Only a directory we make gets the tree's mode: /etc in the
            # admin's tree must not chmod the VM's /etc.
            if not os.path.isdir(target):
                os.makedirs(target)
                os.chmod(target, entry["mode"])
        else:
            write_file(target, base64.b64decode(entry["data"]), entry["mode"])
        self.steps.append({"step": "file " + target})

    def send_report(self, ok, ready):
        try:
            self.call("POST", "/v1/report", {"ok": ok, "steps": self.steps, "ready_seconds": round(ready, 3)})
        except (ServerUnreachable, Fatal) as e:
            say(f"report not sent ({e}); not needed to run")


# A first enrollment outlasts a server that restarts, or a boot storm past its
# connection cap: tries spaced 2, 4, 8, 15, then 30 s, each spread by half
# either way so that VMs refused together do not all come back together.
RETRY_STEPS = (2, 4, 8, 15, 30)


def raise_kernel_limits(root="/proc/sys"):
    """The VM's side of socket_buffer_steps: the caps on socket buffers
    raised to what the tunnel asks for, if lower. What cannot be raised (a
    container's read-only /proc) only costs speed: a warning each."""
    warnings = []
    for key in SOCKET_LIMITS:
        path = os.path.join(root, key)
        try:
            if int(read_text(path)) < VPN_SOCKET_BUFFER:
                with open(path, "w") as f:
                    f.write(str(VPN_SOCKET_BUFFER))
        except (OSError, ValueError) as e:
            warnings.append(f"could not raise {key.replace('/', '.')} to {VPN_SOCKET_BUFFER} "
                            f"({getattr(e, 'strerror', None) or e}): the tunnel may be slower")
    return warnings


def retry_pauses():
    """The pauses between tries, jittered, without end."""
    for step in itertools.chain(RETRY_STEPS, itertools.repeat(RETRY_STEPS[-1])):
        yield random.uniform(step / 2, step * 1.5)


def say(message):
    print(f"dynfarm client: {message}", flush=True)


def last_line(path):
    try:
        lines = read_text(path).strip().splitlines()
        return lines[-1] if lines else "(empty)"
    except OSError:
        return "(no log)"


def tunnel_carries_traffic(answer, timeout):
    """True once a TCP probe from our VPN address to the VPN server gets any answer.

    A refused connection is an answer too: it proves the packet went through
    the tunnel and back, even when the enrollment server is down. Binding to
    our VPN address fails until the tunnel has it, and keeps the probe from
    leaving by any other route.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.bind((answer["address"], 0))
            sock.connect((answer["vpn_server"], answer["probe_port"]))
            return True
        except ConnectionRefusedError:
            return True
        except OSError:
            return False


def machine_id():
    for path in ("/etc/machine-id", "/var/lib/dbus/machine-id"):
        try:
            value = read_text(path).strip()
            if MACHINE_ID_RE.fullmatch(value):
                return value
        except OSError:
            pass
    return socket.gethostname()[:64]


def ssh_host_keys():
    keys = []
    for name in sorted(os.listdir("/etc/ssh")) if os.path.isdir("/etc/ssh") else []:
        if name.startswith("ssh_host_") and name.endswith("_key.pub"):
            fields = read_text(os.path.join("/etc/ssh", name)).split()
            if len(fields) >= 2 and HOST_KEY_RE.fullmatch(f"{fields[0]} {fields[1]}"):   # no ssh-dss
                keys.append(f"{fields[0]} {fields[1]}")
    return keys


def command_environment(answer):
    """The environment of a provider command: the VM's own, less the
    enrollment token (whatever a command starts, a batch daemon and its jobs,
    must not see it), plus this host's identity as site.conf.example lists it."""
    env = {name: value for name, value in os.environ.items() if name != "DYNFARM_TOKEN"}
    facts = machine_facts()
    env.update({
        "DYNFARM_NAME": answer["name"],
        "DYNFARM_PROVIDER": answer["provider"],
        "DYNFARM_ADDRESS": answer["address"],
        "DYNFARM_NETMASK": answer["netmask"],
        "DYNFARM_SERVER": answer["vpn_server"],
        "DYNFARM_CORES": str(facts["cores"]),
        "DYNFARM_MEMORY_MB": str(facts.get("memory_mb", "")),
        # an answer stored by an older version has no links
        "DYNFARM_LINKS": " ".join(f"{name}={address}" for name, address in answer.get("links", {}).items()),
    })
    return env


def machine_facts():
    facts = {"cores": os.cpu_count() or 1, "kernel": platform.release()}
    try:
        for line in read_text("/proc/meminfo").splitlines():
            if line.startswith("MemTotal:"):
                facts["memory_mb"] = int(line.split()[1]) // 1024
        for line in read_text("/etc/os-release").splitlines():
            if line.startswith("PRETTY_NAME="):
                facts["os"] = line.split("=", 1)[1].strip('"')[:128]
    except (OSError, ValueError):
        pass
    return facts


# === remote_control ===
#
# The admin's hands on the VMs: select hosts from the database (by provider,
# host set, connected state), then ssh or scp to each over the VPN with a
# bounded fan-out, checking the host keys the VMs sent at enrollment.

# --- host sets: the clush / pdsh vocabulary (-w, -x, -b) ---
#
# Padding follows ClusterShell: in a range element LO-HI, a lower bound with a
# leading zero sets the width every number is zero-filled to; admins paste
# clush ranges, so the same text must mean the same hosts.

MAX_HOSTS = 100000      # a typo like [0-999999999] must fail, not eat the memory
HOST_RANGE_RE = re.compile(r"^([0-9]+)(?:-([0-9]+))?$")
LAST_NUMBER_RE = re.compile(r"([0-9]+)([^0-9]*)$")


def expand_hosts(text):
    """Names of a host set, in the order written, each once.

    Items are separated by commas outside brackets; an item may hold several
    bracket groups of numbers and ranges (`r[1-2]n[01-02]`). `*` and `?` are kept
    as they are: match_hosts gives them a meaning. Raises ValueError naming the bad part.
    """
    names, total = [], 0
    for item in _split_items(text):
        if not item:
            raise ValueError(f"empty item in host set {text!r}")
        if any(ch.isspace() for ch in item):
            raise ValueError(f"whitespace inside host item {item!r}")
        parts = re.split(r"\[([^\]]*)\]", item)     # literal, range, literal, range, ...
        ranges = [_parse_ranges(body, item) for body in parts[1::2]]
        count = 1
        for numbers in ranges:
            count *= sum(hi - lo + 1 for lo, hi, _ in numbers)
        total += count
        if total > MAX_HOSTS:   # checked before anything is generated
            raise ValueError(f"host set expands to more than {MAX_HOSTS} names at {item!r}")
        choices = [[part] for part in parts]
        choices[1::2] = [["%0*d" % (pad, n) for lo, hi, pad in numbers for n in range(lo, hi + 1)]
                         for numbers in ranges]
        names.extend("".join(combo) for combo in itertools.product(*choices))
    return list(dict.fromkeys(names))


def _split_items(text):
    """Top-level comma-separated items, stripped; brackets checked for balance here."""
    items, start, opened = [], 0, None
    for i, ch in enumerate(text):
        if ch == "[":
            if opened is not None:
                raise ValueError(f"'[' inside brackets in host set at {text[opened:i + 1]!r}")
            opened = i
        elif ch == "]":
            if opened is None:
                raise ValueError(f"']' without '[' in host item {text[start:i + 1].strip()!r}")
            opened = None
        elif ch == "," and opened is None:
            items.append(text[start:i].strip())
            start = i + 1
    if opened is not None:
        raise ValueError(f"'[' never closed in host set at {text[opened:]!r}")
    return items + [text[start:].strip()]


def _parse_ranges(body, item):
    """[(low, high, pad), ...] from the inside of one bracket group, checked."""
    ranges = []
    for element in body.split(","):
        m = HOST_RANGE_RE.match(element)
        if not m:
            what = "empty range" if not element else f"range {element!r} is not N or N-M"
            raise ValueError(f"{what} in host item {item!r}")
        low, high = m.group(1), m.group(2) or m.group(1)
        if int(low) > int(high):
            raise ValueError(f"reversed range {element!r} in host item {item!r}")
        # ClusterShell pads only when LO has a leading zero; every number >= LO has at
        # least len(LO) digits anyway, so zero-filling to len(LO) is the same rule.
        ranges.append((int(low), int(high), len(low)))
    return ranges


def match_hosts(text, known):
    """(known names the patterns select, in known's order; items that selected nothing).

    Each expanded item is a name, or a pattern with `*` (any run) and `?` (any one
    character). Not fnmatch: its [...] classes would clash with ranges. The CLI can
    warn with fold_hosts(unmatched), which folds the misses back into ranges.
    """
    known = list(dict.fromkeys(known))
    exact, chosen, unmatched = set(known), set(), []
    for item in expand_hosts(text):
        if "*" in item or "?" in item:
            pattern = re.compile(re.escape(item).replace(r"\*", ".*").replace(r"\?", "."))
            hits = {name for name in known if pattern.fullmatch(name)}
        else:
            hits = {item} & exact
        if not hits:
            unmatched.append(item)
        chosen |= hits
    return [name for name in known if name in chosen], unmatched


def host_sort_key(name):
    """Order names as people count them: n2 before n10, then by padding and suffix."""
    prefix, digits, suffix = _split_last_number(name)
    return prefix, int(digits) if digits else -1, len(digits), suffix


def _split_last_number(name):
    """(prefix, digits, suffix) around the last run of digits; digits is '' if none."""
    m = LAST_NUMBER_RE.search(name)
    if not m:
        return name, "", ""
    return name[:m.start()], m.group(1), m.group(2)


def fold_hosts(names):
    """The clush text for a set of names: expand_hosts gives the same set back.

    Names are grouped by prefix, suffix and padding around their last number.
    A zero-padded number (`0007`) fixes its group's width; an unpadded one joins
    the widest padded group it fits (`1000` joins `0999`: 1000 is what %04d
    writes), else the unpadded group. So `n1` and `n01` never merge, and the
    groups are sorted by prefix, first number, width, suffix.
    """
    names = set(names)
    widths, groups, items = {}, {}, []
    for name in names:
        prefix, digits, suffix = _split_last_number(name)
        if len(digits) > 1 and digits.startswith("0"):
            widths.setdefault((prefix, suffix), set()).add(len(digits))
    for name in names:
        prefix, digits, suffix = _split_last_number(name)
        if not digits:
            items.append((name, -1, 0, "", name))
            continue
        pad = max((w for w in widths.get((prefix, suffix), ()) if w <= len(digits)), default=0)
        groups.setdefault((prefix, pad, suffix), []).append(int(digits))
    for (prefix, pad, suffix), numbers in groups.items():
        numbers.sort()
        items.append((prefix, numbers[0], pad, suffix, prefix + _fold_numbers(numbers, pad) + suffix))
    return ",".join(item[-1] for item in sorted(items))


def _fold_numbers(numbers, pad):
    """Sorted numbers as `7` or `[1-3,7]`, consecutive runs merged, zero-filled to pad."""
    runs = []
    for n in numbers:
        if runs and n == runs[-1][1] + 1:
            runs[-1][1] = n
        else:
            runs.append([n, n])
    parts = ["%0*d" % (pad, lo) if lo == hi else "%0*d-%0*d" % (pad, lo, pad, hi) for lo, hi in runs]
    return parts[0] if len(numbers) == 1 else "[" + ",".join(parts) + "]"


def gather_outputs(outputs):
    """What `-b` prints: [(folded hosts, output)], each distinct output once.

    Groups come in the order of their first host by host_sort_key. Outputs are
    compared as given, so b"ok" and "ok" are two outputs: decode them all or none.
    """
    groups = {}
    for host in sorted(outputs, key=host_sort_key):
        groups.setdefault(outputs[host], []).append(host)
    return [(fold_hosts(hosts), output) for output, hosts in groups.items()]


# --- selection ---

def host_rows(config, store, providers):
    """Hosts joined with their provider's live OpenVPN status; then the retired."""
    live = {v.name: connected_clients(config, v.name) for v in config.vpns}
    rows = []
    for host in store.hosts(providers):
        provider = config.providers.get(host["provider"])
        clients = live.get(provider.vpn_of(host["address"]).name) if provider else None
        if host["revoked_at"] is not None:
            state = "revoked"
        elif clients is None:
            state = "vpn-down"
        else:
            state = "connected" if host["name"] in clients else "disconnected"
        rows.append({
            "name": host["name"],
            "provider": host["provider"],
            "address": host["address"],
            "state": state,
            "hostname": host["hostname"],
            "enrolled_at": host["enrolled_at"],
            "last_seen": host["last_seen"],
            "client_version": (host["client_version"] or "")[:12],
            "facts": json.loads(host["facts"]),
            "host_keys": json.loads(host["host_keys"]),
            "retired_at": None,
        })
    for host in store.retired(providers):
        rows.append({"name": host["name"], "provider": host["provider"], "address": host["address"],
                     "state": "retired", "hostname": host["hostname"], "enrolled_at": host["enrolled_at"],
                     "last_seen": host["last_seen"], "client_version": "", "facts": {}, "host_keys": [],
                     "retired_at": host["retired_at"]})
    return rows


# Which hosts an action or list is for: providers (a set, empty for all),
# then the host sets to take (-w) and to leave out (-x), each None for none.
Selection = collections.namedtuple("Selection", "providers hosts exclude")


def select_hosts(config, store, selection):
    """The rows of the selected hosts, in provider and sequence order."""
    for name in selection.providers:
        config.provider(name)
    rows = host_rows(config, store, selection.providers)
    try:
        if selection.hosts:
            chosen, unmatched = match_hosts(selection.hosts, [r["name"] for r in rows])
            if unmatched:
                sys.stderr.write(f"dynfarm: no such host: {fold_hosts(unmatched)}\n")
            rows = [r for r in rows if r["name"] in set(chosen)]
        if selection.exclude:
            excluded = set(match_hosts(selection.exclude, [r["name"] for r in rows])[0])
            rows = [r for r in rows if r["name"] not in excluded]
    except ValueError as e:
        raise UsageError(f"bad host set: {e}")
    return rows


def list_hosts(config, selection, as_json=False, retired=False):
    """remote_control list: a table (the retired hosts too if asked), or everything recorded as JSON."""
    rows = select_hosts(config, open_store(config), selection)
    changed = open_events(config).host_keys_changed()
    for row in rows:
        row["host_keys_changed_at"] = changed.get(row["name"]) if row["state"] != "retired" else None
    if as_json:
        print(json.dumps(rows, indent=1))
        return 0
    rows = [r for r in rows if retired or r["state"] != "retired"]
    if rows:
        for row in rows:
            row["last seen"] = ago(row["last_seen"])
            row["version"] = row["client_version"] or "-"
            row["cores"] = row["facts"].get("cores", "-")
            memory = row["facts"].get("memory_mb")
            row["memory"] = f"{memory // 1024} GiB" if isinstance(memory, int) else "-"
        print(format_table(rows, ["name", "provider", "address", "state", "last seen", "version", "cores",
                                  "memory"]))
        keys = [f"{r['name']} ({ago(r['host_keys_changed_at'])})" for r in rows if r["host_keys_changed_at"]]
        if keys:
            print(f"ssh host keys changed at a re-enrollment: {', '.join(keys)}; see 'dynfarm.py events --host NAME'")
    else:
        sys.stderr.write("no hosts enrolled match\n")
    return 0


def format_table(rows, columns):
    widths = [max([len(c)] + [len(str(r[c])) for r in rows]) for c in columns]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths)).rstrip()]
    lines += ["  ".join(str(r[c]).ljust(w) for c, w in zip(columns, widths)).rstrip() for r in rows]
    return "\n".join(lines)


def ago(stamp, now=None):
    """'42s ago', '5m ago', '3h ago', '2d ago' or '-'."""
    if stamp is None:
        return "-"
    seconds = max(0, int((time.time() if now is None else now) - stamp))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit} ago"
    return f"{seconds}s ago"


def known_hosts_lines(rows):
    """known_hosts text for rows with an address and a list of host keys."""
    return "".join(f"{row['address']} {key}\n" for row in rows for key in row["host_keys"])


# --- ssh, scp and the fan-out ---

@dataclasses.dataclass
class Reach:
    """How an action reaches the selected hosts (-f, -u, -t, --reuse, --all)."""
    fanout: int = 64
    timeout: float = 0            # seconds per host for the command; 0: no limit
    connect_timeout: float = 10
    reuse: bool = False           # keep ssh connections open for later runs
    all: bool = False             # also the hosts the VPN does not show connected


# How a host's part can end, with the word that says so in its line and in
# the summary; the first four are counted in every summary, even at zero.
STATUS_WORDS = {
    "ok": "ok",
    "failed": "failed",
    "unreachable": "unreachable",
    "timeout": "timed out",
    "hostkey": "host key refused",
    "interrupted": "interrupted",
}
ALWAYS_COUNTED = ("ok", "failed", "unreachable", "timeout")


def ssh_options(config, reach, known_hosts_path):
    """Options shared by ssh and scp: never a prompt, never trust on first use."""
    options = ["-F", "/dev/null", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
               "-o", f"UserKnownHostsFile={known_hosts_path}", "-o", "GlobalKnownHostsFile=/dev/null",
               "-o", f"ConnectTimeout={reach.connect_timeout:g}", "-o", "ServerAliveInterval=15",
               "-o", "LogLevel=ERROR", "-o", "User=root",
               # OpenSSH 9.0-9.8 put the sntrup761 hybrid first: 80 ms of client
               # CPU per connection here against 12 ms for curve25519, which
               # saturates the cores at a few hundred hosts. The session already
               # runs inside the site's VPN; host key and auth checks are unchanged,
               # and OpenSSH 9.9+ keeps its ML-KEM hybrid first.
               "-o", "KexAlgorithms=-sntrup761x25519-sha512*"]
    if config.ssh_identity:
        options += ["-i", config.ssh_identity, "-o", "IdentitiesOnly=yes"]
    if reach.reuse:
        # One master connection per host, kept 10 minutes: a series of
        # commands pays the key exchange once.
        options += ["-o", "ControlMaster=auto", "-o", f"ControlPath={control_dir()}/%C",
                    "-o", "ControlPersist=600"]
    return options


def control_dir():
    """A private directory for ssh's control sockets, with a short path: a
    socket path may not exceed 107 bytes, and whoever can reach the socket
    can use the connection."""
    path = os.path.join(tempfile.gettempdir(), f"dynfarm-ssh-{os.getuid()}")
    os.makedirs(path, mode=0o700, exist_ok=True)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or stat.S_IMODE(st.st_mode) != 0o700:
        raise Fatal(f"{path}: not a private directory of ours (0700); remove it and try again")
    return path


@dataclasses.dataclass
class Job:
    host: str
    argv: list
    started: float = 0.0
    proc: subprocess.Popen = None
    out: bytearray = dataclasses.field(default_factory=bytearray)
    err: bytearray = dataclasses.field(default_factory=bytearray)
    partial: dict = dataclasses.field(default_factory=dict)
    status: str = ""
    rc: int = None
    seconds: float = 0.0


class FanOut:
    """Run one command per host, at most `fanout` at once, each under a deadline.

    Lines are handed to on_line(host, stream, text) as they arrive; each host
    ends as ok, failed, unreachable, hostkey (refused: the key is not the one
    it enrolled with) or timeout.
    """

    KEEP = 1 << 20   # bytes of output kept per host and stream for -b and --json

    def __init__(self, jobs, fanout, timeout, on_line=None, progress=False):
        self.waiting = list(jobs)
        self.jobs = list(jobs)
        self.fanout = fanout
        self.timeout = timeout
        self.on_line = on_line
        self.progress = progress
        self.running = {}
        self.selector = selectors.DefaultSelector()
        self.finished = 0

    def run(self):
        began = time.monotonic()
        try:
            while self.waiting or self.running:
                while self.waiting and len(self.running) < self.fanout:
                    self.start(self.waiting.pop(0))
                self.pump(0.2)
                self.expire()
                if self.progress and time.monotonic() - began > 1:
                    self.show_progress()
        finally:
            self.stop_all()
            if self.progress and time.monotonic() - began > 1:
                sys.stderr.write("\r\033[K")
        return self.jobs

    def start(self, job):
        job.started = time.monotonic()
        if ECHO_COMMANDS:
            log("[#] " + " ".join(shlex.quote(a) for a in job.argv))
        try:
            # Own session: a Ctrl-C reaches us, and we end the children ourselves.
            job.proc = subprocess.Popen(job.argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, start_new_session=True)
        except OSError as e:
            job.status, job.err = "failed", bytearray(f"{job.argv[0]}: {e.strerror}\n".encode())
            self.finished += 1
            return
        self.running[job.proc.pid] = job
        for stream, pipe in (("out", job.proc.stdout), ("err", job.proc.stderr)):
            os.set_blocking(pipe.fileno(), False)
            self.selector.register(pipe, selectors.EVENT_READ, (job, stream))

    def pump(self, wait):
        for key, _ in self.selector.select(wait):
            job, stream = key.data
            data = os.read(key.fd, 65536)
            if data:
                self.take(job, stream, data)
                continue
            self.selector.unregister(key.fileobj)
            key.fileobj.close()
            self.flush(job, stream)
        self.reap()

    def reap(self):
        """End the jobs whose process exited and whose output is all read;
        a child that closed its pipes but lives on is polled, not waited for."""
        for job in list(self.running.values()):
            if job.proc.stdout.closed and job.proc.stderr.closed:
                try:
                    self.end(job, job.proc.wait(timeout=0.05))   # it exits just after closing them
                except subprocess.TimeoutExpired:
                    pass

    def take(self, job, stream, data):
        kept = getattr(job, stream)
        kept += data[:max(0, self.KEEP - len(kept))]
        if self.on_line:
            lines = (job.partial.get(stream, b"") + data).split(b"\n")
            job.partial[stream] = lines.pop()
            if len(job.partial[stream]) > self.KEEP:     # output that never ends a line
                lines.append(job.partial.pop(stream))
            for line in lines:
                self.on_line(job.host, stream, line.decode(errors="replace"))

    def flush(self, job, stream):
        rest = job.partial.pop(stream, b"")
        if rest and self.on_line:
            self.on_line(job.host, stream, rest.decode(errors="replace"))

    def end(self, job, rc):
        del self.running[job.proc.pid]
        job.seconds = time.monotonic() - job.started
        if job.status != "timeout":
            job.rc = rc
            job.status = classify(rc, bytes(job.err))
        self.finished += 1

    def expire(self):
        if not self.timeout:
            return
        now = time.monotonic()
        for job in list(self.running.values()):
            if job.status != "timeout" and now - job.started > self.timeout:
                job.status = "timeout"
                kill_group(job.proc)

    def stop_all(self):
        for job in list(self.running.values()):
            kill_group(job.proc)
            job.proc.wait()
            for pipe in (job.proc.stdout, job.proc.stderr):
                if not pipe.closed:
                    self.selector.unregister(pipe)
                    pipe.close()
            del self.running[job.proc.pid]
        self.selector.close()

    def show_progress(self):
        failed = sum(1 for j in self.jobs if j.status and j.status != "ok")
        sys.stderr.write(f"\r\033[K{self.finished}/{len(self.jobs)} done, {failed} failed")
        sys.stderr.flush()


def kill_group(proc):
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def classify(rc, stderr):
    """ssh's exit 255 is its own failure: a refused host key, or no connection."""
    if rc == 0:
        return "ok"
    if rc == 255:
        if b"Host key verification failed" in stderr or b"HOST IDENTIFICATION HAS CHANGED" in stderr:
            return "hostkey"
        return "unreachable"
    return "failed"


def summary_line(jobs):
    """'3 ok, 1 failed, 0 unreachable, 0 timed out' (+ refused host keys, interrupted)."""
    counts = collections.Counter(job.status for job in jobs)
    return ", ".join(f"{counts[status]} {word}" for status, word in STATUS_WORDS.items()
                     if counts[status] or status in ALWAYS_COUNTED)


def host_verdict(job):
    """The line for a host that did not succeed: its status word and why."""
    if job.status == "failed" and job.rc is not None:
        why = f"exit {job.rc}"
    elif job.status == "timeout":
        why = "killed"
    else:
        lines = job.err.decode(errors="replace").strip().splitlines()
        why = lines[-1] if lines else ""
    return f"{job.host}: {STATUS_WORDS[job.status]}" + (f" ({why})" if why else "")


# --- output: chosen once per run ---

class LinesOutput:
    """Each line as it arrives, as 'HOST: line' (stderr's lines on stderr)."""
    progress = True

    def on_line(self, host, stream, text):
        print(f"{host}: {text}", file=sys.stdout if stream == "out" else sys.stderr, flush=True)

    def report(self, jobs):
        pass     # every line is out already


class GatheredOutput:
    """-b: each distinct output once, under the folded set of its hosts."""
    progress = True
    on_line = None

    def report(self, jobs):
        outputs = {j.host: j.out.decode(errors="replace") for j in jobs if j.status in ("ok", "failed")}
        for hosts, output in gather_outputs(outputs):
            print(f"---------------\n{hosts} ({len(expand_hosts(hosts))})\n---------------")
            print(output, end="" if output.endswith("\n") or not output else "\n")


class JsonOutput:
    """--json: per host, its status, exit code, stdout, stderr and time."""
    progress = False    # stderr may be read by the same program
    on_line = None

    def report(self, jobs):
        print(json.dumps([{"host": j.host, "status": j.status, "exit_code": j.rc,
                           "stdout": j.out.decode(errors="replace"), "stderr": j.err.decode(errors="replace"),
                           "seconds": round(j.seconds, 3)} for j in jobs], indent=1))


def remote_action(config, selection, reach, make_argv, output):
    """Select, fan out, report: what run, put and get share. make_argv(row, ssh options) -> argv."""
    store = open_store(config)
    rows = [r for r in select_hosts(config, store, selection) if r["state"] not in ("revoked", "retired")]
    if not reach.all:
        rows = [r for r in rows if r["state"] == "connected"]
    if not rows:
        raise Fatal("no connected host selected (see 'remote_control list'; --all tries the others too)")
    # A file per run: two runs at once must not rewrite each other's.
    with tempfile.NamedTemporaryFile("w", dir=config.state.run, prefix="known_hosts.") as known:
        known.write(known_hosts_lines(rows))
        known.flush()
        options = ssh_options(config, reach, known.name)
        return fan_out([Job(r["name"], make_argv(r, options)) for r in rows], reach, output)


def fan_out(jobs, reach, output):
    """Run the jobs, report them; the exit code (130 if interrupted)."""
    # The progress line rewrites itself: echoed commands would end up on it.
    fan = FanOut(jobs, reach.fanout, reach.timeout, on_line=output.on_line,
                 progress=output.progress and sys.stderr.isatty() and not ECHO_COMMANDS)
    try:
        fan.run()
    except KeyboardInterrupt:
        for job in jobs:
            job.status = job.status or "interrupted"
        sys.stderr.write(f"\ninterrupted: {summary_line(jobs)}\n")
        return 130
    output.report(jobs)
    for job in jobs:
        if job.status != "ok":
            sys.stderr.write(host_verdict(job) + "\n")
    sys.stderr.write(summary_line(jobs) + "\n")
    return 0 if all(job.status == "ok" for job in jobs) else 1


# === CLI ===

def cmd_init(args, config):
    added = init_site(config)
    for line in added:
        print(f"added: {line}")
    if not added:
        print(f"nothing to add: site state in {config.state.root} is complete")
    return 0


def cmd_backup(args, config):
    print(backup_site(config, args.file))
    return 0


def cmd_restore(args, config):
    for line in restore_site(config, args.file):
        print(line)
    return 0


def cmd_server(args, config):
    serve(config)
    return 0


def cmd_vpn(args, config):
    exec_vpn_server(config, config.vpn(args.name))


def cmd_token(args, config):
    if args.provider == "list":
        return list_tokens(config, args.json)
    if args.provider == "revoke":
        if not args.token_id:
            raise UsageError("token revoke: which token? give its ID (see 'dynfarm.py token list')")
        store = open_store(config)
        row = store.token(args.token_id)
        print(revoke_token(store, args.token_id))
        provider = row["provider"] if row else None
        open_events(config).record("token-revoked", provider, detail=f"token {args.token_id}")
        return 0
    if args.token_id or args.json:
        raise UsageError(f"token {args.provider}: makes a token; an ID or --json goes with 'token list' "
                         "or 'token revoke'")
    provider = config.provider(args.provider)
    token, expires = made_token(config, provider, args.uses, parse_duration(args.ttl))
    print(token)
    sys.stderr.write(f"token for {provider.name}: {args.uses} enrollment(s), valid until "
                     f"{time.strftime('%Y-%m-%d %H:%M %Z', time.localtime(expires))}\n")
    return 0


def made_token(config, provider, uses, ttl):
    """new_token, recorded in the audit log (its id, never its secret)."""
    token, expires = new_token(open_store(config), provider.name, uses, ttl)
    open_events(config).record("token-made", provider.name, detail=f"token {token.split('.')[0]}, {uses} use(s), "
                               f"until {time.strftime('%Y-%m-%d %H:%M', time.localtime(expires))}")
    return token, expires


def list_tokens(config, as_json):
    rows = token_rows(open_store(config))
    if as_json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        sys.stderr.write("no tokens\n")
        return 0
    for row in rows:
        row["uses left"] = row["uses_left"]
        row["expires"] = time.strftime("%Y-%m-%d %H:%M", time.localtime(row["expires_at"]))
        row["created"] = time.strftime("%Y-%m-%d %H:%M", time.localtime(row["created_at"]))
    print(format_table(rows, ["id", "provider", "uses left", "expires", "created", "state"]))
    return 0


def cmd_bootstrap(args, config):
    provider = config.provider(args.provider)
    token, expires = made_token(config, provider, args.uses, parse_duration(args.ttl))
    script = bootstrap_script(config, provider, token, expires)
    print(cloud_init(script) if args.cloud_init else script, end="")
    return 0


def cmd_events(args, config):
    since = time.time() - parse_duration(args.since) if args.since else 0.0
    rows = open_events(config).events(since, args.host)
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    if not rows:
        sys.stderr.write("no events" + (f" of {args.host}" if args.host else "") +
                         (f" in the last {args.since}" if args.since else "") + "\n")
        return 0
    for row in rows:
        row["time"] = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(row["at"]))
        times = f"{row['count']}x " if row["count"] > 1 else ""
        row["detail"] = (times + row["detail"]).translate(LOG_ESCAPES)     # a client's words, escaped
        for column in ("provider", "host", "source"):
            row[column] = row[column] or "-"
    print(format_table(rows, ["time", "kind", "provider", "host", "source", "detail"]))
    return 0


def cmd_units(args, config):
    if args.install:
        print("\n".join(install_units(config, args.directory)))
        return 0
    for name, text in systemd_units(config).items():
        print(f"# {os.path.join(args.directory, name)}\n{text}")
    return 0


def cmd_revoke(args, config):
    print(revoke_host(config, args.host))
    return 0


def cmd_retire(args, config):
    if bool(args.hosts) == bool(args.stale):
        raise UsageError("retire: name the hosts, or give --stale DURATION (not both)")
    timeout = parse_duration(args.timeout)
    names = args.hosts or stale_hosts(config, parse_duration(args.stale))
    if not names:
        print(f"no host is stale for {args.stale}")
        return 0
    return retire_hosts(config, names, timeout, args.dry_run)


def cmd_links(args, config):
    if args.action == "up":
        return links_up(config, args.dry_run)
    if args.action == "down":
        return links_down(config)
    if args.action == "status":
        return links_status(config)
    return links_peer(config, args.name, args.down)


def cmd_client(args, config):
    token = args.token or os.environ.get("DYNFARM_TOKEN", "")
    if not os.path.isfile(args.ca):
        raise UsageError(f"{args.ca}: no such CA file (the site CA to pin; 'bootstrap' installs it)")
    client = Client(args.server, args.ca, token, args.provider, args.state_dir,
                    os.path.expanduser("~root"), args.timeout, args.wait)
    return client.main()


def selection_of(args):
    return Selection(set(args.provider or []), args.hosts, args.exclude)


def reach_of(args):
    return Reach(args.fanout, args.timeout, args.connect_timeout, args.reuse, args.all)


def cmd_list(args, config):
    return list_hosts(config, selection_of(args), args.json, retired=args.all)


def cmd_run(args, config):
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        raise UsageError("run: no command given (remote_control run -- CMD)")
    text = " ".join(command)
    output = JsonOutput() if args.json else GatheredOutput() if args.gather else LinesOutput()
    return remote_action(config, selection_of(args), reach_of(args),
                         lambda row, opts: ["ssh"] + opts + [row["address"], text], output)


def cmd_put(args, config):
    for source in args.sources:
        if not os.path.exists(source):
            raise UsageError(f"put: {source}: no such file or directory")
    return remote_action(config, selection_of(args), reach_of(args),
                         lambda row, opts: ["scp", "-q", "-r", "-p"] + opts + args.sources
                         + [f"{row['address']}:{args.destination}"], LinesOutput())


def cmd_get(args, config):
    if os.path.exists(args.directory) and not os.path.isdir(args.directory):
        raise UsageError(f"get: {args.directory} is not a directory")

    def argv(row, opts):
        target = os.path.join(args.directory, row["name"])
        try:
            os.makedirs(target, exist_ok=True)
        except OSError as e:
            raise Fatal(f"get: cannot make {target}: {e.strerror}")
        return ["scp", "-q", "-r", "-p"] + opts + [f"{row['address']}:{args.source}", target + "/"]
    return remote_action(config, selection_of(args), reach_of(args), argv, LinesOutput())


def build_parser():
    parser = argparse.ArgumentParser(
        prog="dynfarm.py",
        description="Turn cloud VMs behind any NAT into worker nodes of your batch farm.",
        epilog="Site side: init, then 'vpn PROVIDER' and 'server' (e.g. as systemd units), then "
               "'bootstrap PROVIDER' for each VM's user-data. Exit codes: 0 success, 1 some hosts "
               "or steps failed, 2 usage or configuration error.")
    parser.add_argument("-c", "--config", default=DEFAULT_CONFIG, help=f"site configuration (default {DEFAULT_CONFIG})")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="echo every external command (openssl, openvpn, ip, iptables, ssh) as '[#] ...'")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("init", help="create or complete the site state (CA, VPN configs, database)")
    p.set_defaults(func=cmd_init)
    p = sub.add_parser(
        "backup", help="write the site's state to one archive (the server may run)",
        description="A consistent snapshot of the site: the databases (sqlite's online backup, so the "
                    "server and VPNs keep running), the CA, the server certificate, the tls-crypt keys, and "
                    "site.conf. Written 0600: it holds the CA's key. Run it from cron as often as VMs enroll: "
                    "a restore brings the site back as it was when the backup was taken.")
    p.add_argument("file", metavar="FILE", help="the archive to write (a .tar.gz)")
    p.set_defaults(func=cmd_backup)
    p = sub.add_parser(
        "restore", help="make a fresh state directory the site of a backup (a new machine)",
        description="Into site.conf's state_dir, which must hold no site yet: the backup's databases, CA "
                    "and keys; then what follows from them (OpenVPN configurations, client-config entries, "
                    "the CRL). site.conf must give the VMs what they know (public_address, the enrollment "
                    "port, mode, each provider's port, protocol, subnet, servers, pool); restore refuses otherwise and "
                    "says what differs. Then start 'vpn' and 'server': the VMs reconnect by themselves.")
    p.add_argument("file", metavar="FILE", help="an archive written by 'backup'")
    p.set_defaults(func=cmd_restore)
    p = sub.add_parser("server", help="run the enrollment service in the foreground")
    p.set_defaults(func=cmd_server)
    p = sub.add_parser("vpn", help="run one of a provider's OpenVPN servers in the foreground",
                       description="A provider with vpn_instances = N has N servers: PROVIDER, PROVIDER-1, ... "
                                   "PROVIDER-(N-1), each on its own port (vpn_port, vpn_port + 1, ...), tun device "
                                   "and slice of vpn_subnet; a host stays on the one it was given.")
    p.add_argument("name", metavar="PROVIDER[-N]", help="aruba, or aruba-1 for its second server")
    p.set_defaults(func=cmd_vpn)
    for name, helptext in (("token", "print a new enrollment token for a provider; or list or revoke tokens"),
                           ("bootstrap", "print the script (or cloud-init) that joins a fresh VM")):
        p = sub.add_parser(name, help=helptext)
        if name == "token":
            p.description = ("token PROVIDER prints a new token (stored hashed: shown once). token list shows "
                             "every token (id, provider, uses left, expiry; never the secret); token revoke ID "
                             "deletes one, so that a token leaked with its user-data enrolls nothing more.")
            p.add_argument("provider", metavar="PROVIDER | list | revoke")
            p.add_argument("token_id", nargs="?", metavar="ID", help="with revoke: the token's id (before the dot)")
            p.add_argument("--json", action="store_true", help="with list: everything, as JSON")
        else:
            p.add_argument("provider")
        p.add_argument("--uses", type=positive_int, default=1, help="how many machines it may enroll (default 1)")
        p.add_argument("--ttl", default="24h", help="how long it is valid: 30m, 24h, 7d (default 24h)")
        if name == "bootstrap":
            p.add_argument("--cloud-init", action="store_true", help="print cloud-init user-data instead")
        p.set_defaults(func=cmd_token if name == "token" else cmd_bootstrap)
    p = sub.add_parser(
        "events", help="the audit log: enrollments, host key changes, refusals, revokes, retirements, tokens",
        description="What the site recorded, oldest first: every enrollment (new, again, ssh host keys "
                    "changed), every refused request (its source and reason; refusals alike within a "
                    "second are one line with a count), every revoke and retirement, every token made or "
                    "revoked. Never a secret. Past 100000 refusals, the oldest make room; the other "
                    "events are all kept.")
    p.add_argument("--since", metavar="DURATION", help="only the last 30m, 24h, 7d, ...")
    p.add_argument("--host", metavar="NAME", help="only this host's")
    p.add_argument("--json", action="store_true", help="everything, as JSON")
    p.set_defaults(func=cmd_events)
    p = sub.add_parser(
        "units", help="print (or install) the systemd units that run the site",
        description="The site as systemd services: dynfarm-links (oneshot: links up at start, down at "
                    "stop, before the VPN servers), dynfarm-vpn@SERVER (each OpenVPN server: PROVIDER, PROVIDER-1, ...) "
                    "and dynfarm-server (the enrollment server). They restart on failure, run with this "
                    "Python, this dynfarm.py and this site.conf, and may write only the state directory.")
    p.add_argument("--install", action="store_true", help="write them into DIR and say how to start them")
    p.add_argument("--dir", dest="directory", default="/etc/systemd/system", metavar="DIR",
                   help="where units go (default /etc/systemd/system)")
    p.set_defaults(func=cmd_units)
    p = sub.add_parser("revoke", help="a host can no longer connect or re-enroll")
    p.add_argument("host")
    p.set_defaults(func=cmd_revoke)
    p = sub.add_parser(
        "retire", help="drain hosts in the batch system, then revoke them and free their names and addresses",
        description="The planned removal of hosts: the [batch] drain command, then its idle command until "
                    "the node runs no job, then its remove command; then the host is revoked (CRL, VPN "
                    "session ended, all its certificates refused) and its name and address go to the next "
                    "new VM. Without a [batch] section, only the revoke and the release. A host still busy "
                    "at the timeout is left drained and enrolled (exit 1).")
    p.add_argument("hosts", nargs="*", metavar="HOST")
    p.add_argument("--stale", metavar="DURATION",
                   help="instead of names: the hosts the VPN shows disconnected that have not enrolled or "
                        "reported (each boot does both) for that long, e.g. 7d")
    p.add_argument("--timeout", default="1h", help="how long to wait for a node to run no job (default 1h)")
    p.add_argument("--dry-run", action="store_true", help="say what would be done, do nothing")
    p.set_defaults(func=cmd_retire)

    p = sub.add_parser("links", help="the VPN server's links to site hosts, routing and firewall",
                       description="gre mode: links (gre or vxlan) to the [link:NAME] hosts, policy routing "
                                   "so VMs reach exactly those hosts, a firewall as second wall. "
                                   "routed mode: forwarding and the firewall only.")
    actions = p.add_subparsers(dest="action", metavar="ACTION")
    actions.required = True
    a = actions.add_parser("up", help="create the links, routes and firewall rules (idempotent)")
    a.add_argument("--dry-run", action="store_true", help="print the commands, change nothing")
    actions.add_parser("down", help="remove exactly what 'up' added")
    actions.add_parser("status", help="each link, its state and whether its peer answers")
    a = actions.add_parser("peer", help="print the sh script for a linked host's end (| ssh root@HOST sh)")
    a.add_argument("name", help="the link's name, as in [link:NAME]")
    a.add_argument("--down", action="store_true", help="the script that removes that end instead")
    p.set_defaults(func=cmd_links)

    p = sub.add_parser("client", help="on a VM: enroll, bring the VPN up, apply the customization")
    p.add_argument("--server", required=True, help="enrollment URL, e.g. https://203.0.113.1:8443")
    p.add_argument("--ca", required=True, help="the site CA certificate to pin")
    p.add_argument("--token", help="enrollment token (default: $DYNFARM_TOKEN; not needed once enrolled)")
    p.add_argument("--provider", help="the provider this VM expects to join")
    p.add_argument("--state-dir", default=CLIENT_STATE_DIR, help=f"where the client keeps its state "
                                                                 f"(default {CLIENT_STATE_DIR})")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the server and the tunnel")
    p.add_argument("--wait", type=seconds, default=300.0,
                   help="on the first boot, seconds to keep trying a server that does not answer (default "
                        "300; 0 tries once); later boots use what they stored at once")
    p.set_defaults(func=cmd_client, needs_config=False)

    p = sub.add_parser(
        "remote_control", help="the admin's hands on the VMs: list, run, put, get",
        description="Act on the enrolled VMs over the VPN (ssh, host keys from enrollment, never a prompt). "
                    "Also runs as 'remote_control' (a symlink to dynfarm.py).",
        epilog="Host sets: -w 'aruba-[0001-0040,0100]', globs 'aruba-00*'. Actions reach connected hosts "
               "only unless --all. Exit: 0 all ok, 1 some host failed, was unreachable or timed out, "
               "2 usage, 130 interrupted.")
    p.add_argument("-c", "--config", default=argparse.SUPPRESS, help="site configuration")
    p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                   help="echo every ssh and scp command as '[#] ...'")
    p.add_argument("-p", "--provider", action="append", help="only this provider (repeatable)")
    p.add_argument("-w", dest="hosts", metavar="HOSTS", help="only these hosts (ranges, globs, commas)")
    p.add_argument("-x", dest="exclude", metavar="HOSTS", help="not these hosts")
    p.add_argument("--all", action="store_true", help="also try hosts the VPN does not show connected "
                                                      "(list: also show the retired)")
    p.add_argument("-f", "--fanout", type=positive_int, default=64, help="hosts at once (default 64)")
    p.add_argument("-t", "--connect-timeout", type=float, default=10, help="ssh connect timeout, s (default 10)")
    p.add_argument("-u", "--timeout", type=float, default=0, help="command timeout per host, s (default none)")
    p.add_argument("--reuse", action="store_true", help="keep ssh connections open for later runs "
                                                        "(ControlMaster, 10 minutes)")
    verbs = p.add_subparsers(dest="verb", metavar="VERB")
    verbs.required = True
    v = verbs.add_parser("list", help="hosts: name, provider, address, connected or not, last seen, version")
    v.add_argument("--json", action="store_true", help="machine-readable output with all recorded fields")
    v.set_defaults(func=cmd_list)
    v = verbs.add_parser("run", help="run a command on every selected host: run -- CMD")
    v.add_argument("-b", dest="gather", action="store_true", help="gather identical outputs under host sets")
    v.add_argument("--json", action="store_true", help="per host: status, exit code, stdout, stderr, time")
    v.add_argument("command", nargs=argparse.REMAINDER, help="the command (after --)")
    v.set_defaults(func=cmd_run)
    v = verbs.add_parser("put", help="copy files or directories to every selected host (modes kept)")
    v.add_argument("sources", nargs="+", metavar="SRC")
    v.add_argument("destination", metavar="DST")
    v.set_defaults(func=cmd_put)
    v = verbs.add_parser("get", help="copy SRC from every selected host into DIR/HOST/")
    v.add_argument("source", metavar="SRC")
    v.add_argument("directory", metavar="DIR")
    v.set_defaults(func=cmd_get)
    return parser


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if os.path.basename(sys.argv[0]) == "remote_control" and argv[:1] != ["remote_control"]:
        argv = ["remote_control"] + argv
    args = build_parser().parse_args(argv)
    global ECHO_COMMANDS
    ECHO_COMMANDS = args.verbose
    try:
        config = load_config(args.config) if getattr(args, "needs_config", True) else None
        if config is not None:
            check_secrets(config)
        return args.func(args, config)
    except Fatal as e:
        sys.stderr.write(f"dynfarm: {e}\n")
        return e.code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
