"""What the CA will sign: the key policy and every way a certificate request
can be malformed, each refused with 400 before a token use or an address is
spent. Keys and requests are made by the real openssl; the malformed ones are
edits of good DER (tests/csrs.py)."""

import time

import pytest

import dynfarm
from csrs import ACCEPTED, COMPRESSED, MALFORMED, REFUSED, RSA_EDITS, csr_for, rsa_key_edit
from helpers import call, db_snapshot, enroll_body


@pytest.mark.parametrize("kind", sorted(ACCEPTED))
def test_the_policy_accepts_strong_keys_and_the_ca_signs_them(site, kind):
    _, _, pki = site
    csr = csr_for(*ACCEPTED[kind])
    dynfarm.check_csr(csr)
    pki.sign_client(csr, "aruba-0001", dynfarm.new_serial())


@pytest.mark.parametrize("kind", sorted(REFUSED))
def test_the_policy_refuses_weak_and_unlisted_keys(kind):
    with pytest.raises(ValueError, match="accepted"):
        dynfarm.check_csr(csr_for(*REFUSED[kind]))


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_requests_are_refused_before_anything_is_spent(app, case):
    edit, kind, words = MALFORMED[case]
    csr = edit(csr_for(*ACCEPTED[kind]))
    token, _ = dynfarm.new_token(app.store, "aruba", 1, 60)
    before = db_snapshot(app.store)
    status, answer, _ = call(app, "/v1/enroll", enroll_body(token, csr))
    assert status == 400 and answer["error"].startswith("field 'csr'") and words in answer["error"]
    assert db_snapshot(app.store) == before


def test_a_weak_key_spends_neither_a_token_use_nor_an_address(app):
    token, _ = dynfarm.new_token(app.store, "aruba", 1, 60)
    before = db_snapshot(app.store)
    status, answer, _ = call(app, "/v1/enroll", enroll_body(token, csr_for(*REFUSED["rsa-1024"])))
    assert status == 400 and "RSA key of 1024 bits" in answer["error"]
    assert db_snapshot(app.store) == before


def test_pem_parsing_is_linear_in_a_header_followed_by_spaces():
    """The backtracking case: a BEGIN line and thousands of spaces (minutes
    with the old regular expression at the 8 KiB limit)."""
    text = "-----BEGIN CERTIFICATE REQUEST-----" + " " * 8100
    started = time.process_time()
    for _ in range(100):
        with pytest.raises(ValueError):
            dynfarm.pem_to_der(text, "CERTIFICATE REQUEST")
    assert time.process_time() - started < 5     # a generous ceiling: about 10 ms here


def test_a_compressed_point_is_refused_one_key_one_id():
    with pytest.raises(ValueError, match="uncompressed"):
        dynfarm.check_csr(csr_for(*COMPRESSED))


@pytest.mark.parametrize("case", sorted(RSA_EDITS))
def test_rsa_keys_openssl_would_misread_or_re_encode_are_refused(app, case):
    csr = rsa_key_edit(csr_for(*ACCEPTED["rsa-2048"]), RSA_EDITS[case])
    token, _ = dynfarm.new_token(app.store, "aruba", 1, 60)
    before = db_snapshot(app.store)
    status, answer, _ = call(app, "/v1/enroll", enroll_body(token, csr))
    assert status == 400 and answer["error"].startswith("field 'csr'"), answer
    assert db_snapshot(app.store) == before
