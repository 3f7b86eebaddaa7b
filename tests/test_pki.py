"""The site's PKI through its one seam, the openssl command, and the DER reading.

What the signing command is given and what is refused when openssl fails or
signs a key other than the request's; a certificate carries the key of its
request, and the DER parser turns junk away.
"""

import os
import subprocess

import pytest

import dynfarm
from helpers import call, enroll_body


# --- signing through openssl ------------------------------------------------------

def test_signing_command_checks_the_request_and_forces_the_name(site, make_csr, monkeypatch):
    _, _, pki = site
    _, csr = make_csr()
    seen = []
    real_run = dynfarm.run

    def spy(argv, **kw):
        seen.append((argv, kw.get("input")))
        return real_run(argv, **kw)
    monkeypatch.setattr(dynfarm, "run", spy)
    serial = dynfarm.new_serial()
    pki.sign_client(csr, "aruba-0042", serial)
    argv, given = seen[0]
    assert argv[:8] == ["openssl", "req", "-config", pki.state.req_config, "-in", "/dev/stdin", "-verify", "-x509"]
    assert argv[argv.index("-subj") + 1] == "/CN=aruba-0042"
    assert argv[argv.index("-set_serial") + 1] == "0x" + serial
    assert argv[argv.index("-CAkey") + 1] == pki.state.ca_key
    assert "extendedKeyUsage=clientAuth" in argv and given == csr.encode()


def test_a_certificate_for_another_key_is_refused(site, make_csr, monkeypatch):
    """Were openssl to sign a key of its own, the certificate must not go out."""
    _, _, pki = site
    _, csr = make_csr()
    _, other_csr = make_csr()
    real_run = dynfarm.run
    monkeypatch.setattr(dynfarm, "run", lambda argv, **kw: real_run(argv, **dict(kw, input=other_csr.encode())))
    with pytest.raises(dynfarm.Fatal, match="signed a key other than the request's"):
        pki.sign_client(csr, "aruba-0042", dynfarm.new_serial())


def failing_signing(monkeypatch, request_readable):
    """openssl fails to sign; asked on its own, it reads the request, or not."""
    real_run = dynfarm.run

    def run(argv, **kw):
        if "-x509" in argv:
            return subprocess.CompletedProcess(argv, 1, b"", b"req: Unknown option: -CA\n")
        if not request_readable:
            return subprocess.CompletedProcess(argv, 1, b"", b"unable to load X509 request\n")
        return real_run(argv, **kw)
    monkeypatch.setattr(dynfarm, "run", run)


def test_openssl_failure_is_not_blamed_on_a_request_it_can_read(site, make_csr, monkeypatch):
    _, _, pki = site
    failing_signing(monkeypatch, request_readable=True)
    with pytest.raises(dynfarm.Fatal, match="needs OpenSSL 3.0 or newer.*Unknown option: -CA"):
        pki.sign_client(make_csr()[1], "aruba-0001", dynfarm.new_serial())


def test_a_request_openssl_cannot_read_is_the_requests_fault(site, make_csr, monkeypatch):
    _, _, pki = site
    failing_signing(monkeypatch, request_readable=False)
    with pytest.raises(dynfarm.CSRRejected, match="openssl cannot read it"):
        pki.sign_client(make_csr()[1], "aruba-0001", dynfarm.new_serial())


# --- DER --------------------------------------------------------------------------

def test_csr_and_certificate_carry_the_same_key(app, make_csr):
    token, _ = dynfarm.new_token(app.store, "aruba", 1, 60)
    _, csr = make_csr()
    cert = call(app, "/v1/enroll", enroll_body(token, csr))[1]["certificate"]
    assert dynfarm.cert_public_key(dynfarm.pem_to_der(cert, "CERTIFICATE")) == dynfarm.csr_public_key(csr)


@pytest.mark.parametrize("junk", [b"", b"\x30", b"\x30\x85\x01\x02\x03\x04\x05", b"\x30\x03\x02\x01"])
def test_der_parser_rejects_junk(junk):
    with pytest.raises(ValueError):
        dynfarm.public_key_of(junk, 2)


# --- dates that must not lapse ------------------------------------------------------

def test_links_status_shows_the_pki_dates_and_warns_two_months_ahead(site, capsys, monkeypatch):
    config = site[0]
    assert dynfarm.main(["-c", config.path, "links", "status"]) == 0
    out = capsys.readouterr().out
    assert "site CA expires" in out and "server certificate expires" in out and "(CRL) must be renewed by" in out
    assert "WARNING" not in out
    server_expires = dynfarm.cert_expires(open(config.state.server_cert).read())
    later = server_expires - 30 * 86400
    monkeypatch.setattr(dynfarm.time, "time", lambda: later)
    assert dynfarm.main(["-c", config.path, "links", "status"]) == 1
    (warning,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("WARNING")]
    assert warning.startswith("WARNING: server certificate expires") and "in 30 days" in warning
    assert "run 'dynfarm.py init', which renews it" in warning


def test_vpn_start_writes_the_crl_anew(site, monkeypatch):
    config, store, pki = site
    os.utime(config.state.crl, (0, 0))
    monkeypatch.setattr(dynfarm.os, "execvp", lambda *a: None)      # not become openvpn here
    dynfarm.exec_vpn_server(config, config.vpn("aruba"))
    assert os.stat(config.state.crl).st_mtime > 1
    assert dynfarm.crl_next_update(config.state.crl) > dynfarm.time.time() + 3000 * 86400
