"""The admission webhook's TLS: a CA of the operator's own and a serving certificate.

Both live in one Secret, so that every operator replica serves the same certificate
and the API server trusts it through the `caBundle` of the webhook configuration. They
are made on first start and remade when the serving certificate has less than a third
of its life left; the CA changes only when it nears its own end, and then the bundle
keeps trusting the previous CA too, for replicas that still serve a certificate it signed.
The same Secret keeps the webhook's path token, made once and kept across renewals.
"""

from __future__ import annotations

import datetime
import secrets
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_DAYS, SERVING_DAYS = 3650, 365


@dataclass(frozen=True)
class WebhookTLS:
    ca_cert: bytes
    ca_key: bytes
    cert: bytes
    key: bytes
    previous_ca: bytes = b""
    token: bytes = b""
    """The shared secret in the webhook configuration's path: only the API server, which
    reads that configuration, knows where to send admissions."""

    @property
    def ca_bundle(self) -> bytes:
        """What the API server should trust: the CA, and the one it replaced."""
        return self.ca_cert + self.previous_ca

    def secret_data(self) -> dict[str, bytes]:
        data = {
            "ca.crt": self.ca_cert,
            "ca.key": self.ca_key,
            "tls.crt": self.cert,
            "tls.key": self.key,
        }
        if self.previous_ca:
            data["ca-previous.crt"] = self.previous_ca
        if self.token:
            data["path-token"] = self.token
        return data

    @classmethod
    def from_secret(cls, data: dict[str, bytes]) -> WebhookTLS | None:
        try:
            return cls(
                data["ca.crt"],
                data["ca.key"],
                data["tls.crt"],
                data["tls.key"],
                data.get("ca-previous.crt", b""),
                data.get("path-token", b""),
            )
        except KeyError:
            return None

    def needs_renewal(self, hostnames: list[str], now: datetime.datetime) -> bool:
        if not self.token:
            return True  # made before the webhook had a token: renewing adds one
        cert = x509.load_pem_x509_certificate(self.cert)
        life = cert.not_valid_after_utc - cert.not_valid_before_utc
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        return cert.not_valid_after_utc - now < life / 3 or sorted(
            names.get_values_for_type(x509.DNSName)
        ) != sorted(hostnames)


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def issue(
    hostnames: list[str], now: datetime.datetime, current: WebhookTLS | None = None
) -> WebhookTLS:
    """A serving certificate for `hostnames`, signed by the current CA when it still has
    more than a year to live, else by a new CA."""
    previous_ca = b""
    token = (current.token if current else b"") or secrets.token_urlsafe(32).encode()
    if current is not None:
        ca = x509.load_pem_x509_certificate(current.ca_cert)
        ca_key = serialization.load_pem_private_key(current.ca_key, password=None)
        if ca.not_valid_after_utc - now < datetime.timedelta(days=365):
            previous_ca = current.ca_cert
            current = None
    if current is None:
        ca_key = _key()
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "convostore webhook CA")])
        ca = (
            x509.CertificateBuilder()
            .subject_name(ca_name)
            .issuer_name(ca_name)
            .public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                critical=True,
            )
            .sign(ca_key, hashes.SHA256())
        )
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = _key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostnames[0])]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=SERVING_DAYS))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName(h) for h in hostnames]), critical=False
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    return WebhookTLS(
        ca_cert=current.ca_cert if current else ca.public_bytes(serialization.Encoding.PEM),
        ca_key=current.ca_key if current else _pem_key(ca_key),
        cert=cert.public_bytes(serialization.Encoding.PEM),
        key=_pem_key(key),
        previous_ca=current.previous_ca if current else previous_ca,
        token=token,
    )
