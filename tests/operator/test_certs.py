"""The webhook's self-managed CA and serving certificate."""

from __future__ import annotations

import datetime

from convostore_operator.certs import SERVING_DAYS, WebhookTLS, issue
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

NAMES = ["convostore-webhook.convostore-system.svc"]
NOW = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)


def verify_chain(tls: WebhookTLS) -> x509.Certificate:
    ca = x509.load_pem_x509_certificate(tls.ca_cert)
    cert = x509.load_pem_x509_certificate(tls.cert)
    public = ca.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    cert.verify_directly_issued_by(ca)
    return cert


def test_issues_a_serving_certificate_signed_by_its_own_ca() -> None:
    tls = issue(NAMES, NOW)
    cert = verify_chain(tls)
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == NAMES
    assert not tls.needs_renewal(NAMES, NOW)
    assert WebhookTLS.from_secret(tls.secret_data()) == tls


def test_renews_in_the_last_third_of_its_life_keeping_the_ca() -> None:
    tls = issue(NAMES, NOW)
    later = NOW + datetime.timedelta(days=SERVING_DAYS * 2 // 3 + 1)
    assert tls.needs_renewal(NAMES, later)
    renewed = issue(NAMES, later, tls)
    assert renewed.ca_cert == tls.ca_cert, "the caBundle the API server trusts stays valid"
    assert renewed.cert != tls.cert
    verify_chain(renewed)


def test_renames_and_a_dying_ca_force_new_material() -> None:
    tls = issue(NAMES, NOW)
    assert tls.needs_renewal([*NAMES, "other.svc"], NOW)
    near_ca_end = NOW + datetime.timedelta(days=3650 - 100)
    replaced = issue(NAMES, near_ca_end, tls)
    assert replaced.ca_cert != tls.ca_cert
    verify_chain(replaced)
    # replicas still serving the old certificate stay trusted until they reload
    assert replaced.ca_bundle == replaced.ca_cert + tls.ca_cert
    assert WebhookTLS.from_secret(replaced.secret_data()) == replaced


def test_an_incomplete_secret_is_not_trusted() -> None:
    data = issue(NAMES, NOW).secret_data()
    del data["ca.key"]
    assert WebhookTLS.from_secret(data) is None


def test_the_path_token_is_made_once_and_survives_every_renewal() -> None:
    tls = issue(NAMES, NOW)
    assert len(tls.token) >= 40
    assert issue(NAMES, NOW, tls).token == tls.token
    ca_renewal = NOW + datetime.timedelta(days=3650 - 300)
    assert issue(NAMES, ca_renewal, tls).ca_cert != tls.ca_cert
    assert issue(NAMES, ca_renewal, tls).token == tls.token
    older = WebhookTLS.from_secret(
        {k: v for k, v in tls.secret_data().items() if k != "path-token"}
    )
    assert older is not None
    assert older.needs_renewal(NAMES, NOW), "a Secret from before tokens is renewed"
    assert issue(NAMES, NOW, older).token not in (b"", tls.token)
