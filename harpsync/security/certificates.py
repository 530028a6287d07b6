"""Reading and checking X.509 certificates: names, SANs, pins, serials, issuers.

Nothing here signs anything (see :mod:`harpsync.security.issuing`) or touches the disk
(see :mod:`harpsync.security.files`).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

__all__ = ["serial_to_hex", "valid_pin", "check_node_cert", "check_ca_cert", "describe_ca",
           "describe_ca_pem"]

RENEW_BEFORE = dt.timedelta(days=30)
MAX_COMMON_NAME = 64  # X.509's upper bound (ub-common-name), enforced by cryptography
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun",
           "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_PIN_RE = re.compile(r"^[0-9a-f]{64}$")
PEM = serialization.Encoding.PEM


def serial_to_hex(serial: int) -> str:
    """Format a certificate serial the way ``getpeercert()['serialNumber']`` does.

    Args:
        serial: The serial number.

    Returns:
        Upper-case hex, left-padded with a zero to an even number of digits.
    """
    text = f"{serial:X}"
    return "0" + text if len(text) % 2 else text


def _asn1_time(value: dt.datetime) -> str:
    """Format a UTC time like OpenSSL / Node (``Nov  2 10:33:25 2026 GMT``)."""
    return f"{_MONTHS[value.month - 1]} {value.day:2d} {value:%H:%M:%S} {value.year} GMT"


def describe_ca(cert: x509.Certificate) -> dict[str, str]:
    """Describe a CA certificate like Harper's ``ca_info``.

    Returns:
        ``{"issuer", "subject", "serialNumber", "validFrom", "validTo"}``.
    """
    return {
        "issuer": cert.issuer.rfc4514_string(),
        "subject": cert.subject.rfc4514_string(),
        "serialNumber": serial_to_hex(cert.serial_number),
        "validFrom": _asn1_time(cert.not_valid_before_utc),
        "validTo": _asn1_time(cert.not_valid_after_utc),
    }


def describe_ca_pem(pem: bytes | str | None) -> dict[str, str] | None:
    """:func:`describe_ca` of a PEM certificate (a peer's CA from its row), or None when
    there is none or it cannot be read."""
    if not pem:
        return None
    try:
        return describe_ca(x509.load_pem_x509_certificate(
            pem.encode("utf-8") if isinstance(pem, str) else pem))
    except ValueError:
        return None


def general_name(name: str) -> x509.GeneralName | None:
    """An IPAddress SAN for an IP literal, else a DNSName (IDNA A-label), else None."""
    try:
        return x509.IPAddress(ipaddress.ip_address(name.strip("[]")))
    except ValueError:
        pass
    try:
        return x509.DNSName(name if name.isascii() else name.encode("idna").decode("ascii"))
    except (UnicodeError, ValueError):
        return None


def name_key(name: x509.GeneralName) -> tuple[str, str]:
    """Normalise a SAN entry for comparison (DNS names are case-insensitive)."""
    if isinstance(name, x509.IPAddress):
        return ("IP", str(name.value))
    return ("DNS", str(name.value).lower())


def wanted_names(node_name: str, hosts: list[str]) -> list[x509.GeneralName]:
    """The SANs a node certificate must carry, de-duplicated, in a stable order."""
    names: dict[tuple[str, str], x509.GeneralName] = {}
    for raw in [node_name, *hosts, "localhost", "127.0.0.1"]:
        host = raw.strip()
        if host:
            general = general_name(host)
            if general is not None:
                names.setdefault(name_key(general), general)
    return list(names.values())


def cert_sans(cert: x509.Certificate) -> list[x509.GeneralName]:
    """The certificate's subjectAltName entries (empty if it has none)."""
    try:
        return list(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
    except x509.ExtensionNotFound:
        return []


def common_name(name: x509.Name) -> str | None:
    """The first commonName of an X.509 name, or None."""
    attrs = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(attrs[0].value) if attrs else None


def spki_pin(public_key: Any) -> str:
    """SHA-256 (hex) of a public key's DER SubjectPublicKeyInfo: the key a node is
    pinned by. Every certificate a node presents (its own, or ones peers signed for
    it) carries the same node key, so one pin covers them all."""
    der = public_key.public_bytes(serialization.Encoding.DER,
                                  serialization.PublicFormat.SubjectPublicKeyInfo)
    digest = hashes.Hash(hashes.SHA256())
    digest.update(der)
    return digest.finalize().hex()


def valid_pin(value: Any) -> bool:
    """Whether ``value`` looks like a pin made by this package (64 hex digits)."""
    return isinstance(value, str) and _PIN_RE.match(value) is not None


def issued_by(cert: x509.Certificate, ca_pems: list[bytes | str]) -> bool:
    """Whether ``cert`` was signed directly by one of ``ca_pems`` (empty ones skipped)."""
    for pem in ca_pems:
        if not pem:
            continue
        try:
            ca = x509.load_pem_x509_certificate(pem.encode() if isinstance(pem, str) else pem)
            cert.verify_directly_issued_by(ca)
            return True
        except (ValueError, TypeError, InvalidSignature):
            continue
    return False


def check_node_cert(cert_pem: bytes | str, ca_pem: bytes | str, node_name: str,
                    pin: str) -> str:
    """Check that a node's own certificate is named ``node_name``, carries the pinned
    key and was signed by ``ca_pem``; return its serial.

    Raises:
        ValueError: naming what does not match.
    """
    if isinstance(cert_pem, str):
        cert_pem = cert_pem.encode("utf-8")
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError as exc:
        raise ValueError("node certificate is not PEM") from exc
    if common_name(cert.subject) != node_name:
        raise ValueError(f"node certificate is not named {node_name!r}")
    if spki_pin(cert.public_key()) != pin:
        raise ValueError("node certificate does not carry the key of the CSR")
    if not issued_by(cert, [ca_pem]):
        raise ValueError("node certificate was not signed by the CA it came with")
    return serial_to_hex(cert.serial_number)


def check_ca_cert(ca_pem: bytes) -> x509.Certificate:
    """Parse a peer's CA certificate, refusing anything but one valid self-signed CA.

    Args:
        ca_pem: The PEM bytes a peer sent.

    Returns:
        The certificate.

    Raises:
        ValueError: If it is not exactly one valid, self-signed CA certificate.
    """
    try:
        certs = x509.load_pem_x509_certificates(ca_pem)
    except ValueError as exc:
        raise ValueError("Invalid CA certificate: not PEM") from exc
    if len(certs) != 1:
        raise ValueError("Expected exactly one CA certificate")
    cert = certs[0]
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        raise ValueError("Certificate is not a CA (BasicConstraints ca=False)")
    try:
        cert.verify_directly_issued_by(cert)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise ValueError("CA certificate is not self-signed") from exc
    if cert.not_valid_after_utc < dt.datetime.now(dt.UTC):
        raise ValueError("CA certificate has expired")
    return cert


def node_cert_ok(cert: x509.Certificate, key: ec.EllipticCurvePrivateKey,
                 ca_cert: x509.Certificate, node_name: str,
                 wanted: list[x509.GeneralName]) -> bool:
    """Whether an existing node certificate can be kept (key, CN, issuer, SANs, expiry)."""
    if cert.public_key() != key.public_key() or common_name(cert.subject) != node_name:
        return False
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature):
        return False
    if not {name_key(n) for n in wanted} <= {name_key(n) for n in cert_sans(cert)}:
        return False
    return cert.not_valid_after_utc - dt.datetime.now(dt.UTC) > RENEW_BEFORE
