"""Certificate requests for the tests of what the CA signs: keys of every
kind made by the real openssl, and malformed requests made by editing good
DER. Shared by test_csr_policy.py and test_hostile.py."""

import base64
import functools
import subprocess
import tempfile

import dynfarm


def openssl(*argv, input=None):
    return subprocess.run(["openssl", *argv], input=input, capture_output=True, check=True).stdout


@functools.lru_cache(maxsize=None)
def csr_for(*genpkey):
    """A CSR (PEM text) for a fresh key made by `openssl genpkey ARGS`
    (ARGS ending in "compressed": an EC key whose point is sent compressed)."""
    key = openssl("genpkey", *genpkey[:-1]) if genpkey[-1] == "compressed" else openssl("genpkey", *genpkey)
    if genpkey[-1] == "compressed":
        key = openssl("ec", "-conv_form", "compressed", input=key)
    with tempfile.NamedTemporaryFile() as f:   # openssl req wants a file
        f.write(key)
        f.flush()
        return openssl("req", "-new", "-key", f.name, "-subj", "/CN=x").decode()


ACCEPTED = {
    "rsa-2048": ("-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"),
    "ec-p256": ("-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"),
    "ec-p384": ("-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-384"),
    "ec-p521": ("-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-521"),
    "ed25519": ("-algorithm", "ED25519"),
}
# One key, one key_id: the point must come uncompressed.
COMPRESSED = ("-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "compressed")
REFUSED = {
    "rsa-512": ("-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:512"),
    "rsa-1024": ("-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:1024"),
    "rsa-2047": ("-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2047"),
    "ec-secp112r1": ("-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:secp112r1"),
    "ec-secp256k1": ("-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:secp256k1"),
    "ed448": ("-algorithm", "ED448"),
}


def der_of(csr):
    return bytearray(dynfarm.pem_to_der(csr, "CERTIFICATE REQUEST"))


def pem_of(der):
    body = base64.b64encode(bytes(der)).decode()
    lines = [body[i:i + 64] for i in range(0, len(body), 64)]
    return "-----BEGIN CERTIFICATE REQUEST-----\n" + "\n".join(lines) + "\n-----END CERTIFICATE REQUEST-----\n"


def find(der, needle):
    at = bytes(der).find(needle)
    assert at >= 0
    return at


def off_curve(csr):
    der = der_of(csr)
    at = find(der, b"\x03\x42\x00\x04") + 4 + 63      # last byte of y of a P-256 point
    der[at] ^= 1
    return pem_of(der)


def truncated_signature(csr):
    der = der_of(csr)
    return pem_of(der[:-1])   # the outer length no longer matches: not DER


def short_signature(csr):
    """A well-formed request whose RSA signature lost its last byte."""
    der = der_of(csr)
    sig_at = len(der) - 256 - 5        # 03 82 01 01 00 <256 bytes>
    assert der[sig_at:sig_at + 5] == b"\x03\x82\x01\x01\x00"
    body = der[4:sig_at] + b"\x03\x82\x01\x00\x00" + der[sig_at + 5:-1]
    return pem_of(b"\x30\x82" + len(body).to_bytes(2, "big") + body)


def tlv(tag, body, long_form=False):
    """One DER element; long_form: a length in the 0x81 form even when short (not DER)."""
    n = len(body)
    if n < 0x80 and not long_form:
        return bytes([tag, n]) + body
    size = (n.bit_length() + 7) // 8 or 1
    return bytes([tag, 0x80 | size]) + n.to_bytes(size, "big") + body


def children(der, element):
    _, start, end = dynfarm.der_element(der, element[1])
    return [bytes(der[a:b]) for _, a, b in dynfarm.der_children(der, start, end)]


def non_minimal_length(csr):
    """The subject re-encoded with a long-form length it does not need."""
    der = bytes(der_of(csr))
    info, algorithm, signature = children(der, (0x30, 0, len(der)))
    version, subject, spki, attributes = children(info, (0x30, 0, len(info)))
    subject = tlv(0x30, subject[2:], long_form=True)
    return pem_of(tlv(0x30, tlv(0x30, version + subject + spki + attributes) + algorithm + signature))


def bad_utf8_subject(csr):
    der = der_of(csr)
    at = find(der, b"\x0c\x01x")          # CN=x as UTF8String
    der[at + 2] = 0xff
    return pem_of(der)


def sha1_signature(csr):
    der = der_of(csr)
    at = find(der, bytes.fromhex("06082a8648ce3d040302"))
    der[at:at + 10] = bytes.fromhex("06072a8648ce3d0401") + b"\x05"   # ecdsa-with-SHA1 + junk: refused
    return pem_of(der)


def empty_skeleton(_):
    return pem_of(b"\x30\x00")


MALFORMED = {
    "off-curve EC point": (off_curve, "ec-p256", "not a point on P-256"),
    "truncated": (truncated_signature, "ec-p256", "DER"),
    "short RSA signature": (short_signature, "rsa-2048", "wrong size"),
    "non-minimal DER length": (non_minimal_length, "ec-p256", "not minimal"),
    "invalid UTF-8 in the subject": (bad_utf8_subject, "ec-p256", "subject"),
    "SHA-1 signature algorithm": (sha1_signature, "ec-p256", ""),
    "empty skeleton": (empty_skeleton, "ec-p256", "not a certificate request"),
}


def rsa_key_edit(csr, edit):
    """The CSR with its RSA key replaced by edit(n, e) (the DER of its two
    INTEGERs) -> the key's DER; the signature is left as it was: the checks
    before signing must catch these."""
    der = bytes(der_of(csr))
    info, algorithm, signature = children(der, (0x30, 0, len(der)))
    version, subject, spki, attributes = children(info, (0x30, 0, len(info)))
    key_algorithm, bits = children(spki, (0x30, 0, len(spki)))
    key = element_body(bits)[1:]              # a BIT STRING: its unused-bits byte, then the key
    n, e = children(key, (0x30, 0, len(key)))
    spki = tlv(0x30, key_algorithm + tlv(0x03, b"\x00" + edit(n, e)))
    return pem_of(tlv(0x30, tlv(0x30, version + subject + spki + attributes) + algorithm + signature))


def element_body(element):
    _, start, end = dynfarm.der_element(element, 0)
    return element[start:end]


RSA_EDITS = {   # what openssl misreads, or reads and re-encodes: one key, several ids
    "exponent outside the key's SEQUENCE": lambda n, e: tlv(0x30, n) + e,
    "modulus padded with a zero": lambda n, e: tlv(0x30, tlv(0x02, b"\x00" + element_body(n)) + e),
    "exponent padded with a zero": lambda n, e: tlv(0x30, n + tlv(0x02, b"\x00" + element_body(e))),
    "exponent of 3072 bits": lambda n, e: tlv(0x30, n + tlv(0x02, (2**3071 + 1).to_bytes(385, "big"))),
}
