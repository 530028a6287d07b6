"""Building X.509 certificates and CSRs: CAs, node certificates, certificates for peers."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from harpsync.security.certificates import (
    PEM,
    common_name,
    general_name,
    name_key,
    serial_to_hex,
    spki_pin,
)

__all__ = ["VALIDITY_DAYS", "IssuedCert", "issue", "make_csr", "sign_csr"]

VALIDITY_DAYS = 3650
_CLOCK_SKEW = dt.timedelta(minutes=5)


@dataclass(frozen=True)
class IssuedCert:
    """A certificate this node's CA signed for a joining peer."""

    pem: str
    pin: str
    serial_hex: str


def issue(
    cn: str,
    public_key: Any,
    signer_key: ec.EllipticCurvePrivateKey,
    signer: x509.Certificate | None,
    *,
    sans: list[x509.GeneralName] | None = None,
    days: int = VALIDITY_DAYS,
) -> x509.Certificate:
    """Sign a certificate: a self-signed CA if ``signer`` is None, else a leaf (capped
    at the CA's expiry) carrying ``sans`` and server+client EKU."""
    now = dt.datetime.now(dt.UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    not_after = now + dt.timedelta(days=days)
    if signer is not None:
        not_after = min(not_after, signer.not_valid_after_utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(signer.subject if signer is not None else subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(not_after)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )
    is_ca = signer is None
    builder = builder.add_extension(
        x509.BasicConstraints(ca=is_ca, path_length=0 if is_ca else None), critical=True
    ).add_extension(
        x509.KeyUsage(
            digital_signature=not is_ca, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=is_ca,
            crl_sign=is_ca, encipher_only=False, decipher_only=False,
        ),
        critical=True,
    )
    if signer is not None:
        builder = (
            builder.add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(signer_key.public_key()),
                critical=False,
            )
            .add_extension(x509.SubjectAlternativeName(sans or []), critical=False)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
        )
    return builder.sign(signer_key, hashes.SHA256())


def make_csr(node_name: str, key: ec.EllipticCurvePrivateKey,
             sans: list[x509.GeneralName]) -> bytes:
    """Build a CSR for ``key`` with CN = ``node_name`` and the given SANs.

    Returns:
        The CSR as PEM.
    """
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node_name)]))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(PEM)


def sign_csr(csr_pem: bytes | str, node_name: str, url_host: str | None,
             ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate,
             days: int = VALIDITY_DAYS) -> IssuedCert:
    """Sign a joining peer's CSR with a CA, naming only that peer.

    The certificate gets CN = ``node_name`` and SANs = that name and ``url_host``;
    whatever else the CSR asks for is ignored, and a CSR whose CN is another name is
    refused.

    Args:
        csr_pem: The CSR in PEM form.
        node_name: The joining node's name.
        url_host: The host of the joining node's replication URL, if any.
        ca_key: The signing CA's private key.
        ca_cert: The signing CA's certificate.
        days: Validity in days (capped at the CA's expiry).

    Returns:
        The signed certificate, the pin of its key and its serial.

    Raises:
        ValueError: If the CSR cannot be parsed, its signature is bad or it names
            another node.
    """
    if isinstance(csr_pem, str):
        csr_pem = csr_pem.encode("utf-8")
    if days < 1:
        raise ValueError("days must be at least 1")
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
        public_key = csr.public_key()
        valid = csr.is_signature_valid
    except (ValueError, TypeError) as exc:
        raise ValueError("Invalid CSR: not a PEM certificate signing request") from exc
    if not valid:
        raise ValueError("Invalid CSR: signature does not match its public key")
    cn = common_name(csr.subject)
    if cn != node_name:
        raise ValueError(f"Invalid CSR: it names {cn!r}, not the joining node "
                         f"{node_name!r}")
    names = [n for n in (general_name(h) for h in [node_name, url_host or ""] if h)
             if n is not None]
    unique = list({name_key(n): n for n in names}.values())
    cert = issue(node_name, public_key, ca_key, ca_cert, sans=unique, days=days)
    return IssuedCert(cert.public_bytes(PEM).decode("ascii"), spki_pin(public_key),
                      serial_to_hex(cert.serial_number))
