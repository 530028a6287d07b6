"""Who is on the other end: the certificate a peer presented on a TLS connection."""

from __future__ import annotations

import ipaddress
import ssl
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509

from harpsync.security.certificates import common_name, serial_to_hex, spki_pin
from harpsync.security.certificates import issued_by as _issued_by

__all__ = ["PeerCert", "PeerIdentity", "peer_cert", "peer_identity"]


@dataclass(frozen=True)
class PeerCert:
    """The certificate the other end of a TLS connection presented (verified or not)."""

    common_name: str
    pin: str
    serial_hex: str
    der: bytes = field(repr=False)

    def issued_by(self, ca_pems: list[bytes | str]) -> bool:
        """Whether this certificate was signed directly by one of ``ca_pems``."""
        return _issued_by(x509.load_der_x509_certificate(self.der), ca_pems)


def peer_cert(ssl_object: Any) -> PeerCert | None:
    """The certificate the peer presented on a TLS connection, or None.

    Unlike :func:`peer_identity` this also reads a certificate that was not verified
    (a client dialing with ``verify=False`` still learns which key answered).
    """
    if ssl_object is None:
        return None
    try:
        der = ssl_object.getpeercert(binary_form=True)
    except ValueError:
        return None
    if not der:
        return None
    try:
        cert = x509.load_der_x509_certificate(der)
    except ValueError:
        return None
    return PeerCert(common_name(cert.subject) or "", spki_pin(cert.public_key()),
                    serial_to_hex(cert.serial_number), der)


@dataclass(frozen=True)
class PeerIdentity:
    """The verified certificate identity of the other end of a TLS connection."""

    common_name: str
    serial_hex: str
    sans: tuple[str, ...]


def peer_identity(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> PeerIdentity | None:
    """Read the peer's verified certificate from a TLS connection.

    Args:
        ssl_object: ``writer.get_extra_info("ssl_object")`` or an ``SSLSocket``.

    Returns:
        The peer identity, or None if the peer sent no certificate, verification was
        off, or the handshake has not finished.
    """
    if ssl_object is None:
        return None
    try:
        cert: Any = ssl_object.getpeercert()
    except ValueError:  # handshake not done yet
        return None
    if not cert:  # None: no certificate; {}: present but not verified (CERT_NONE)
        return None
    cn = next((v for rdn in cert.get("subject", ()) for k, v in rdn if k == "commonName"), "")
    sans: list[str] = []
    for kind, value in cert.get("subjectAltName", ()):
        if kind == "IP Address":
            try:
                value = str(ipaddress.ip_address(value.strip()))
            except ValueError:
                pass
        sans.append(value)
    return PeerIdentity(str(cn), str(cert.get("serialNumber", "")).upper(), tuple(sans))
