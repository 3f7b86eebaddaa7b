"""What the tests share that is not a fixture: the site they set up and the
enrollment requests they make.

One site configuration serves the loopback fixtures (conftest.py) and the
namespace world (farm.py); only where the server listens, the address VMs
are told, the request timeout and aruba's source networks differ.
"""

import base64
import concurrent.futures
import contextlib
import hashlib
import json
import os
import socket
import ssl
import subprocess
import sys
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import dynfarm  # noqa: E402

VERSION = hashlib.sha256(dynfarm.read_own_source()).hexdigest()

# provider other is a /29 so that running out of addresses takes five
# enrollments; no test of the world puts more than one VM in it.
SITE_TEMPLATE = """\
[site]
state_dir = state
listen = {listen}
public_address = {public_address}
ssh_keys = admin_key.pub
ssh_identity = admin_key
request_timeout = {request_timeout}

[provider:aruba]
vpn_port = 1194
vpn_subnet = 10.8.0.0/24
{networks}files = custom/aruba/files
commands = custom/aruba/setup.sh

[provider:other]
vpn_port = 1195
vpn_subnet = 10.9.0.0/29

[link:master]
address = 10.10.0.5
encap = vxlan
"""


def site_conf(listen, public_address, request_timeout, networks=None):
    """site.conf's text; networks, if given, limits where aruba's VMs may enroll from."""
    return SITE_TEMPLATE.format(listen=listen, public_address=public_address, request_timeout=request_timeout,
                                networks=f"networks = {networks}\n" if networks else "")


# The loopback site: peers are 127.0.0.1, so no networks; a short timeout
# keeps the server tests of slow clients quick.
SITE_CONF = site_conf(listen="127.0.0.1:0", public_address="127.0.0.1", request_timeout=2)


def write_site(directory, conf=SITE_CONF):
    """site.conf, the admin's ssh key and aruba's customization (a file, a
    script); returns the path of site.conf."""
    files = os.path.join(directory, "custom", "aruba", "files", "etc", "dynfarm-test")
    os.makedirs(files, exist_ok=True)
    with open(os.path.join(files, "greeting"), "w") as f:
        f.write("hello from the site\n")
    os.chmod(os.path.join(files, "greeting"), 0o640)
    # Run only on the world's VMs: the loopback tests look at it, never run it.
    with open(os.path.join(directory, "custom", "aruba", "setup.sh"), "w") as f:
        f.write("hostname > /etc/dynfarm-test/setup-ran\necho setup done\n")
    key = os.path.join(directory, "admin_key")
    if not os.path.exists(key):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "admin@site", "-f", key], check=True)
    path = os.path.join(directory, "site.conf")
    with open(path, "w") as f:
        f.write(conf)
    return path


def enroll_body(token, csr, **extra):
    body = {"version": VERSION, "token": token, "machine_id": "0123abcd", "hostname": "vm1", "csr": csr,
            "host_keys": ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGl1"], "facts": {"cores": 2}}
    body.update(extra)
    return body


def fresh_csr(app, key):
    """What an enrolled machine sends without its certificate: a CSR naming a nonce of the app's."""
    return dynfarm.make_csr(key, dynfarm.NONCE_PREFIX + app.nonces.new())


@contextlib.contextmanager
def tls_server(config):
    """The real TLS server around a fresh App, on 127.0.0.1 in a thread: (httpd, ctx),
    httpd.app the app, ctx a client context pinning the site CA."""
    httpd = dynfarm.TLSServer(("127.0.0.1", 0), dynfarm.App(config), dynfarm.server_tls_context(config),
                              config.request_timeout)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield httpd, ssl.create_default_context(cafile=config.state.ca_cert)
    finally:
        httpd.shutdown()
        httpd.server_close()


def call(app, path, body, peer_ip="127.0.0.1", method="POST", peer=("", "")):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return app(dynfarm.Request(method, path, raw, peer_ip, *peer))


def db_snapshot(store):
    return ([dict(r) for r in store.db.execute("SELECT * FROM hosts ORDER BY name")],
            [dict(r) for r in store.db.execute("SELECT * FROM tokens ORDER BY id")])


def tamper(csr_pem):
    """Flip one bit of the CSR's signature: still well-formed, no longer valid."""
    der = bytearray(dynfarm.pem_to_der(csr_pem, "CERTIFICATE REQUEST"))
    der[-3] ^= 1
    body = base64.encodebytes(bytes(der)).decode()
    return f"-----BEGIN CERTIFICATE REQUEST-----\n{body}-----END CERTIFICATE REQUEST-----\n"


def known_hosts(store):
    """known_hosts text for every host, from the keys the VMs sent at enrollment."""
    return dynfarm.known_hosts_lines({"address": h["address"], "host_keys": json.loads(h["host_keys"])}
                                     for h in store.hosts())


def cert_serial(certificate):
    return subprocess.run(["openssl", "x509", "-noout", "-serial"], input=certificate,
                          capture_output=True, text=True, check=True).stdout.split("=")[1].strip().lower()


def crl_serials(config):
    text = subprocess.run(["openssl", "crl", "-in", config.state.crl, "-noout", "-text"],
                          capture_output=True, text=True, check=True).stdout
    return {line.split(":", 1)[1].strip().lower() for line in text.splitlines() if "Serial Number:" in line}


# --- a VM's enrollment over the wire, against a server process ---

class Machine:
    """A VM's enrollment as the client does it: retry while nobody answers,
    answer a nonce challenge, give up only on a final refusal."""

    def __init__(self, tmp, index, token):
        self.key = os.path.join(tmp, f"m{index}.key")
        dynfarm.make_key(self.key)
        self.body = enroll_body(token, dynfarm.make_csr(self.key, "dynfarm-client"), machine_id=f"m{index}")
        self.answer = None
        self.tries = 0

    @classmethod
    def many(cls, tmp, token, count):
        """count machines, their keys made in parallel (openssl, a process each)."""
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            return list(pool.map(lambda i: cls(tmp, i, token), range(count)))

    def enroll(self, port, ctx, deadline):
        while time.monotonic() < deadline:
            self.tries += 1
            status, answer = post(port, ctx, self.body)
            if status == 200:
                self.answer = answer
                return 200
            if status == 401 and "nonce" in answer:      # enrolled by a request whose answer was lost
                self.body = dict(self.body, csr=dynfarm.make_csr(self.key, dynfarm.NONCE_PREFIX + answer["nonce"]))
                continue
            if status is not None and status not in (409, 429, 503):
                return status
            time.sleep(0.05 * min(self.tries, 20))
        return None


def post(port, ctx, body):
    raw = json.dumps(body).encode()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with ctx.wrap_socket(sock, server_hostname="127.0.0.1") as tls:
                tls.sendall(f"POST /v1/enroll HTTP/1.1\r\nContent-Length: {len(raw)}\r\n\r\n".encode() + raw)
                reply = tls.makefile("rb").read()
    except OSError:
        return None, {}
    head, _, body = reply.partition(b"\r\n\r\n")
    if not head:
        return None, {}
    return int(head.split()[1]), json.loads(body or b"{}")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(conf, log):
    """The enrollment server of conf, as a process of its own."""
    return subprocess.Popen([sys.executable, os.path.join(REPO, "dynfarm.py"), "-c", conf, "server"], stdout=log, stderr=log)
