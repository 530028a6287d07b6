"""Node keys, certificates and TLS contexts (DESIGN.md §7).

This is the only module that touches ``cryptography`` and ``ssl``. Each node owns a
private CA (EC P-256) and a node certificate signed by it. Peers exchange CA
certificates during ``add_node``; :meth:`NodeKeys.trust_ca` adds a peer CA to disk and
to every TLS context already handed out, so new handshakes trust it at once.

Gotcha: with ``CERT_OPTIONAL`` a client sending *no* certificate is accepted
(``getpeercert()`` is None) but one sending an unverifiable certificate fails the
handshake, so a node joining a peer that lacks its CA dials with
``client_context(..., present_cert=False)``. Under TLS 1.3 the client sees that failure
only on its first read.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import os
import re
import ssl
import threading
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from harpsync.passwords import hash_password, parse_authorization, verify_password

__all__ = [
    "NodeKeys", "PeerIdentity", "PeerCert", "peer_identity", "peer_cert", "serial_to_hex",
    "hash_password", "verify_password", "parse_authorization", "IssuedCert",
    "check_node_cert", "valid_pin",
]

log = logging.getLogger(__name__)

VALIDITY_DAYS = 3650
_RENEW_BEFORE = dt.timedelta(days=30)
_CLOCK_SKEW = dt.timedelta(minutes=5)
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun",
           "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@:-]*$")
_PEM = serialization.Encoding.PEM


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


def _general_name(name: str) -> x509.GeneralName | None:
    """An IPAddress SAN for an IP literal, else a DNSName (IDNA A-label), else None."""
    try:
        return x509.IPAddress(ipaddress.ip_address(name.strip("[]")))
    except ValueError:
        pass
    try:
        return x509.DNSName(name if name.isascii() else name.encode("idna").decode("ascii"))
    except (UnicodeError, ValueError):
        return None


def _name_key(name: x509.GeneralName) -> tuple[str, str]:
    """Normalise a SAN entry for comparison (DNS names are case-insensitive)."""
    if isinstance(name, x509.IPAddress):
        return ("IP", str(name.value))
    return ("DNS", str(name.value).lower())


def _wanted_names(node_name: str, hosts: list[str]) -> list[x509.GeneralName]:
    """The SANs a node certificate must carry, de-duplicated, in a stable order."""
    names: dict[tuple[str, str], x509.GeneralName] = {}
    for raw in [node_name, *hosts, "localhost", "127.0.0.1"]:
        host = raw.strip()
        if host:
            general = _general_name(host)
            if general is not None:
                names.setdefault(_name_key(general), general)
    return list(names.values())


def _sans(cert: x509.Certificate) -> list[x509.GeneralName]:
    """The certificate's subjectAltName entries (empty if it has none)."""
    try:
        return list(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
    except x509.ExtensionNotFound:
        return []


def _cn(name: x509.Name) -> str | None:
    """The first commonName of an X.509 name, or None."""
    attrs = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(attrs[0].value) if attrs else None


_PIN_RE = re.compile(r"^[0-9a-f]{64}$")


def _spki_pin(public_key: Any) -> str:
    """SHA-256 (hex) of a public key's DER SubjectPublicKeyInfo: the key a node is
    pinned by. Every certificate a node presents (its own, or ones peers signed for
    it) carries the same node key, so one pin covers them all."""
    der = public_key.public_bytes(serialization.Encoding.DER,
                                  serialization.PublicFormat.SubjectPublicKeyInfo)
    digest = hashes.Hash(hashes.SHA256())
    digest.update(der)
    return digest.finalize().hex()


def valid_pin(value: Any) -> bool:
    """Whether ``value`` looks like a pin made by this module (64 hex digits)."""
    return isinstance(value, str) and _PIN_RE.match(value) is not None


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


@dataclass(frozen=True)
class IssuedCert:
    """A certificate this node's CA signed for a joining peer."""

    pem: str
    pin: str
    serial_hex: str


def _issued_by(cert: x509.Certificate, ca_pems: list[bytes | str]) -> bool:
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
    return PeerCert(_cn(cert.subject) or "", _spki_pin(cert.public_key()),
                    serial_to_hex(cert.serial_number), der)


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
    if _cn(cert.subject) != node_name:
        raise ValueError(f"node certificate is not named {node_name!r}")
    if _spki_pin(cert.public_key()) != pin:
        raise ValueError("node certificate does not carry the key of the CSR")
    if not _issued_by(cert, [ca_pem]):
        raise ValueError("node certificate was not signed by the CA it came with")
    return serial_to_hex(cert.serial_number)


def _write(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write a file atomically with the given permission bits."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    """Serialise a private key as unencrypted PKCS#8 PEM."""
    return key.private_bytes(_PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """Load an EC private key from a PEM file."""
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{path} does not hold an EC private key")
    return key


def _issue(
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


def _node_cert_ok(cert: x509.Certificate, key: ec.EllipticCurvePrivateKey,
                  ca_cert: x509.Certificate, node_name: str,
                  wanted: list[x509.GeneralName]) -> bool:
    """Whether an existing node certificate can be kept (key, CN, issuer, SANs, expiry)."""
    if cert.public_key() != key.public_key() or _cn(cert.subject) != node_name:
        return False
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature):
        return False
    if not {_name_key(n) for n in wanted} <= {_name_key(n) for n in _sans(cert)}:
        return False
    return cert.not_valid_after_utc - dt.datetime.now(dt.UTC) > _RENEW_BEFORE


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
        cert = ssl_object.getpeercert()
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


@dataclass(eq=False)
class NodeKeys:
    """A node's CA, node certificate, trusted peer CAs and the TLS contexts built on them.

    Create with :meth:`load_or_create`.
    """

    node_name: str
    keys_dir: Path
    ca_key: ec.EllipticCurvePrivateKey = field(repr=False)
    ca_cert: x509.Certificate
    node_key: ec.EllipticCurvePrivateKey = field(repr=False)
    node_cert: x509.Certificate
    _server_ctx: ssl.SSLContext | None = field(default=None, repr=False)
    _client_ctxs: dict[tuple[bool, bool, str | None], ssl.SSLContext] = field(
        default_factory=dict, repr=False
    )
    _live: weakref.WeakSet[ssl.SSLContext] = field(default_factory=weakref.WeakSet, repr=False)
    _lock: threading.RLock = field(default_factory=threading.RLock, repr=False)

    # Files under keys_dir; trusted/ holds peer CAs by SHA-256 fingerprint and
    # peer_certs/ our node certificates signed by peers' CAs.
    ca_path: Path = field(init=False)
    ca_key_path: Path = field(init=False, repr=False)
    node_cert_path: Path = field(init=False)
    node_key_path: Path = field(init=False, repr=False)
    trusted_dir: Path = field(init=False, repr=False)
    peer_certs_dir: Path = field(init=False, repr=False)

    def __post_init__(self) -> None:
        """Derive the file paths from ``keys_dir``."""
        d = self.keys_dir
        self.ca_path, self.ca_key_path = d / "ca.pem", d / "ca.key"
        self.node_cert_path, self.node_key_path = d / "node.pem", d / "node.key"
        self.trusted_dir, self.peer_certs_dir = d / "trusted", d / "peer_certs"

    @property
    def ca_pem(self) -> bytes:
        """The CA certificate as PEM."""
        return self.ca_cert.public_bytes(_PEM)

    @property
    def node_cert_pem(self) -> bytes:
        """The node certificate as PEM."""
        return self.node_cert.public_bytes(_PEM)

    @property
    def serial_hex(self) -> str:
        """Node certificate serial, formatted as ``getpeercert()`` reports it."""
        return serial_to_hex(self.node_cert.serial_number)

    @classmethod
    def load_or_create(cls, keys_dir: Path, node_name: str, hosts: list[str]) -> NodeKeys:
        """Load the node's keys from ``keys_dir``, generating whatever is missing.

        The node certificate is re-issued from the existing CA when it is missing, does
        not match the node key or CA, has the wrong CN, lacks a wanted SAN, or expires
        within 30 days. The CA itself is never replaced once it exists.

        Args:
            keys_dir: Directory for ``ca.pem``, ``ca.key``, ``node.pem``, ``node.key``.
            node_name: The node name (certificate CN and a SAN).
            hosts: Extra host names or IP addresses for SANs (e.g. the replication host).

        Returns:
            The loaded keys.

        Raises:
            ValueError: If only one of ``ca.pem`` / ``ca.key`` exists, or a key is not EC.
        """
        keys_dir = Path(keys_dir)
        keys_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        (keys_dir / "trusted").mkdir(exist_ok=True, mode=0o700)
        # Whatever the umask was, or an older version left: private keys stay private.
        os.chmod(keys_dir, 0o700)
        for private in (keys_dir / "ca.key", keys_dir / "node.key"):
            if private.exists():
                os.chmod(private, 0o600)
        ca_path, ca_key_path = keys_dir / "ca.pem", keys_dir / "ca.key"
        node_path, node_key_path = keys_dir / "node.pem", keys_dir / "node.key"
        if ca_path.exists() != ca_key_path.exists():
            raise ValueError(f"{keys_dir} has only one of ca.pem / ca.key; refusing to "
                             "replace the CA")
        if ca_path.exists():
            ca_key = _load_key(ca_key_path)
            ca_cert = x509.load_pem_x509_certificate(ca_path.read_bytes())
        else:
            ca_key = ec.generate_private_key(ec.SECP256R1())
            ca_cert = _issue(f"harpsync CA {node_name}", ca_key.public_key(), ca_key, None)
            _write(ca_key_path, _key_pem(ca_key), 0o600)
            _write(ca_path, ca_cert.public_bytes(_PEM))
        if node_key_path.exists():
            node_key = _load_key(node_key_path)
        else:
            node_key = ec.generate_private_key(ec.SECP256R1())
            _write(node_key_path, _key_pem(node_key), 0o600)
            node_path.unlink(missing_ok=True)
        wanted = _wanted_names(node_name, hosts)
        node_cert = None
        if node_path.exists():
            node_cert = x509.load_pem_x509_certificate(node_path.read_bytes())
            if not _node_cert_ok(node_cert, node_key, ca_cert, node_name, wanted):
                log.info("re-issuing node certificate for %s", node_name)
                node_cert = None
        if node_cert is None:
            node_cert = _issue(node_name, node_key.public_key(), ca_key, ca_cert, sans=wanted)
            _write(node_path, node_cert.public_bytes(_PEM))
        return cls(node_name, keys_dir, ca_key, ca_cert, node_key, node_cert)

    def ca_info(self) -> dict[str, str]:
        """Describe the CA certificate like Harper's ``ca_info``.

        Returns:
            ``{"issuer", "subject", "serialNumber", "validFrom", "validTo"}``.
        """
        cert = self.ca_cert
        return {
            "issuer": cert.issuer.rfc4514_string(),
            "subject": cert.subject.rfc4514_string(),
            "serialNumber": serial_to_hex(cert.serial_number),
            "validFrom": _asn1_time(cert.not_valid_before_utc),
            "validTo": _asn1_time(cert.not_valid_after_utc),
        }

    def https_files(self) -> tuple[str, str]:
        """Files for serving the operations API over HTTPS.

        Returns:
            ``(certfile, keyfile)`` paths as strings.
        """
        return str(self.node_cert_path), str(self.node_key_path)

    def make_csr(self) -> bytes:
        """Build a CSR for the node key, with CN = node name and the node cert's SANs.

        Returns:
            The CSR as PEM.
        """
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, self.node_name)]))
            .add_extension(x509.SubjectAlternativeName(_sans(self.node_cert)), critical=False)
            .sign(self.node_key, hashes.SHA256())
        )
        return csr.public_bytes(_PEM)

    @property
    def pin(self) -> str:
        """The pin (SPKI SHA-256) of this node's key."""
        return _spki_pin(self.node_key.public_key())

    def sign_csr(self, csr_pem: bytes | str, node_name: str, url_host: str | None,
                 days: int = VALIDITY_DAYS) -> IssuedCert:
        """Sign a joining peer's CSR with this node's CA, for that peer only.

        The certificate names exactly the node that proved itself with super_user
        credentials: CN = ``node_name`` and SANs = that name and the host of the URL it
        claimed. Whatever else the CSR asks for is ignored; a CSR whose CN is another
        name is refused.

        Args:
            csr_pem: The CSR in PEM form.
            node_name: The joining node's name.
            url_host: The host of the joining node's replication URL, if any.
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
        cn = _cn(csr.subject)
        if cn != node_name:
            raise ValueError(f"Invalid CSR: it names {cn!r}, not the joining node "
                             f"{node_name!r}")
        sans = [n for n in (_general_name(h) for h in [node_name, url_host or ""] if h)
                if n is not None]
        unique = list({_name_key(n): n for n in sans}.values())
        cert = _issue(node_name, public_key, self.ca_key, self.ca_cert, sans=unique, days=days)
        return IssuedCert(cert.public_bytes(_PEM).decode("ascii"), _spki_pin(public_key),
                          serial_to_hex(cert.serial_number))

    # -- keys of removed nodes ---------------------------------------------------------
    @property
    def _barred_path(self) -> Path:
        return self.keys_dir / "removed_pins"

    def barred_pins(self) -> set[str]:
        """Pins of nodes an operator removed (``keys/removed_pins``, one a line)."""
        try:
            return {line for line in self._barred_path.read_text().split() if valid_pin(line)}
        except FileNotFoundError:
            return set()

    def bar_pin(self, pin: str, barred: bool = True) -> None:
        """Record (or, with ``barred=False``, forget) the key of a removed node, so no
        row learned later, under any name, accepts it until an operator re-adds it."""
        if not valid_pin(pin):
            return
        with self._lock:
            pins = self.barred_pins()
            if (pin in pins) == barred:
                return
            pins = pins | {pin} if barred else pins - {pin}
            _write(self._barred_path, "".join(f"{p}\n" for p in sorted(pins)).encode(),
                   0o600)

    def trusted_ca_pems(self) -> list[bytes]:
        """Peer CA certificates trusted so far.

        Returns:
            The PEM bytes of each file under ``trusted/``.
        """
        if not self.trusted_dir.is_dir():
            return []
        return [p.read_bytes() for p in sorted(self.trusted_dir.glob("*.pem"))]

    def trust_ca(self, ca_pem: bytes | str) -> bool:
        """Trust a peer's CA, on disk and in every live TLS context.

        Args:
            ca_pem: One self-signed CA certificate in PEM form.

        Returns:
            True if newly trusted; False if it was already known (or is our own CA).

        Raises:
            ValueError: If it is not exactly one valid, self-signed CA certificate.
        """
        if isinstance(ca_pem, str):
            ca_pem = ca_pem.encode("utf-8")
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
        fingerprint = cert.fingerprint(hashes.SHA256()).hex()
        path = self.trusted_dir / f"{fingerprint}.pem"
        pem = cert.public_bytes(_PEM)
        with self._lock:
            if cert == self.ca_cert or path.exists():
                return False
            self.trusted_dir.mkdir(parents=True, exist_ok=True)
            _write(path, pem)
            for ctx in list(self._live):
                ctx.load_verify_locations(cadata=pem.decode("ascii"))
        return True

    def store_peer_signed_cert(self, peer_name: str, cert_pem: bytes | str) -> None:
        """Save a node certificate that a peer's CA signed for us.

        Args:
            peer_name: The peer's node name (file name ``peer_certs/<peer_name>.pem``).
            cert_pem: The certificate PEM; it must be for our node key.

        Raises:
            ValueError: If the name is unsafe or the certificate is not for our key.
        """
        if isinstance(cert_pem, str):
            cert_pem = cert_pem.encode("utf-8")
        path = self._peer_cert_path(peer_name)
        try:
            cert = x509.load_pem_x509_certificate(cert_pem)
        except ValueError as exc:
            raise ValueError("Invalid certificate: not PEM") from exc
        if cert.public_key() != self.node_key.public_key():
            raise ValueError("Certificate is not for this node's key")
        with self._lock:
            self.peer_certs_dir.mkdir(parents=True, exist_ok=True)
            _write(path, cert.public_bytes(_PEM))
            for key in [k for k in self._client_ctxs if k[2] == peer_name]:
                del self._client_ctxs[key]

    def _peer_cert_path(self, peer_name: str) -> Path:
        """Path for a peer-signed certificate; rejects names unsafe as file names."""
        if not _SAFE_NAME.match(peer_name) or ".." in peer_name:
            raise ValueError("Invalid peer name for a certificate file")
        return self.peer_certs_dir / f"{peer_name}.pem"

    def _load_trust(self, ctx: ssl.SSLContext) -> None:
        """Load our CA and every trusted peer CA into a context and register it live."""
        ctx.load_verify_locations(cadata=self.ca_pem.decode("ascii"))
        for pem in self.trusted_ca_pems():
            try:
                ctx.load_verify_locations(cadata=pem.decode("ascii"))
            except (ssl.SSLError, UnicodeDecodeError):
                log.warning("skipping unreadable trusted CA file")
        self._live.add(ctx)

    def server_context(self) -> ssl.SSLContext:
        """The replication listener's TLS context (cached).

        Returns:
            A TLS 1.2+ server context with the node cert, ``CERT_OPTIONAL`` client
            certificates, trusting our CA and all trusted peer CAs.
        """
        with self._lock:
            if self._server_ctx is None:
                ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
                ctx.minimum_version = ssl.TLSVersion.TLSv1_2
                ctx.load_cert_chain(self.node_cert_path, self.node_key_path)
                ctx.verify_mode = ssl.CERT_OPTIONAL
                self._load_trust(ctx)
                self._server_ctx = ctx
            return self._server_ctx

    def client_context(
        self, verify: bool = True, peer_name: str | None = None, *, present_cert: bool = True
    ) -> ssl.SSLContext:
        """A TLS context for dialing a peer (cached per argument set).

        Args:
            verify: Verify the server certificate and host name. If False, no checks.
            peer_name: Present the certificate that this peer's CA signed for us, if one
                was stored; otherwise the node certificate.
            present_cert: Send a client certificate at all. Use False when joining a
                peer that does not trust our CA yet (see the module docstring).

        Returns:
            A TLS 1.2+ client context.
        """
        key = (verify, present_cert, peer_name)
        with self._lock:
            ctx = self._client_ctxs.get(key)
            if ctx is not None:
                return ctx
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            if present_cert:
                certfile = self.node_cert_path
                if peer_name is not None and self._peer_cert_path(peer_name).exists():
                    certfile = self._peer_cert_path(peer_name)
                ctx.load_cert_chain(certfile, self.node_key_path)
            if verify:
                self._load_trust(ctx)
            else:
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
            self._client_ctxs[key] = ctx
            return ctx


# -- for modules that must not import ssl themselves ---------------------------------
TLSContext = ssl.SSLContext
TLS_ERRORS: tuple[type[BaseException], ...] = (ssl.SSLError,)


def describe_tls_error(exc: BaseException) -> str | None:
    """A short cause for a TLS failure, or None if ``exc`` is not one."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS certificate verification failed: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        return f"TLS failure: {exc.reason or exc}"
    return None
