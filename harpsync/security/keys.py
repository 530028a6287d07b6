"""NodeKeys: a node's key, CA and certificate, the peers it trusts, and its TLS contexts.

Peers exchange CA certificates during ``add_node``; :meth:`NodeKeys.trust_ca` adds a
peer CA to disk and to every TLS context already handed out, so new handshakes trust it
at once.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import re
import threading
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from harpsync.security import issuing, tls
from harpsync.security.certificates import (
    PEM,
    RENEW_BEFORE,
    cert_sans,
    check_ca_cert,
    common_name,
    describe_ca,
    issued_by,
    serial_to_hex,
    spki_pin,
    valid_pin,
)
from harpsync.security.files import load_or_create_files, write_file
from harpsync.security.issuing import VALIDITY_DAYS, IssuedCert
from harpsync.security.tls import TLSContext

__all__ = ["NodeKeys"]

_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@:-]*$")


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
    _server_ctx: TLSContext | None = field(default=None, repr=False)
    _client_ctxs: dict[tuple[bool, bool, str | None, bool], TLSContext] = field(
        default_factory=dict, repr=False
    )
    _live: weakref.WeakSet[TLSContext] = field(default_factory=weakref.WeakSet, repr=False)
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
        return self.ca_cert.public_bytes(PEM)

    @property
    def node_cert_pem(self) -> bytes:
        """The node certificate as PEM."""
        return self.node_cert.public_bytes(PEM)

    @property
    def serial_hex(self) -> str:
        """Node certificate serial, formatted as ``getpeercert()`` reports it."""
        return serial_to_hex(self.node_cert.serial_number)

    @property
    def pin(self) -> str:
        """The pin (SPKI SHA-256) of this node's key."""
        return spki_pin(self.node_key.public_key())

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
        ca_key, ca_cert, node_key, node_cert = load_or_create_files(keys_dir, node_name, hosts)
        return cls(node_name, keys_dir, ca_key, ca_cert, node_key, node_cert)

    def ca_info(self) -> dict[str, str]:
        """Describe the CA certificate like Harper's ``ca_info``.

        Returns:
            ``{"issuer", "subject", "serialNumber", "validFrom", "validTo"}``.
        """
        return describe_ca(self.ca_cert)

    def certificate_info(self) -> dict[str, Any]:
        """This node's certificate for ``cluster_status``: its subject, serial and
        validity, its CA's expiry, and whether either ends within 30 days (the node
        certificate is renewed at the next start then; the CA never is).

        Returns:
            ``{"subject", "serialNumber", "validFrom", "validTo", "ca_validTo",
            "expires_soon"}``.
        """
        info = describe_ca(self.node_cert)
        info.pop("issuer", None)
        ends = min(self.node_cert.not_valid_after_utc, self.ca_cert.not_valid_after_utc)
        return {**info, "ca_validTo": describe_ca(self.ca_cert)["validTo"],
                "expires_soon": ends - dt.datetime.now(dt.UTC) < RENEW_BEFORE}

    def https_files(self) -> tuple[str, str]:
        """Files for serving the operations API over HTTPS.

        Returns:
            ``(certfile, keyfile)`` paths as strings.
        """
        return str(self.node_cert_path), str(self.node_key_path)

    # -- certificates for and from peers -----------------------------------------------
    def make_csr(self) -> bytes:
        """Build a CSR for the node key, with CN = node name and the node cert's SANs.

        Returns:
            The CSR as PEM.
        """
        return issuing.make_csr(self.node_name, self.node_key, cert_sans(self.node_cert))

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
        return issuing.sign_csr(csr_pem, node_name, url_host, self.ca_key, self.ca_cert,
                                days)

    def check_peer_answer(self, ca_pem: str, cert_pem: str | None) -> None:
        """Check what a peer answered a join with before anything of it is kept: its CA
        (one valid, self-signed CA) and the certificate it signed for us (PEM, for our
        key, named after this node, signed by that CA).

        Raises:
            ValueError: naming what is wrong.
        """
        check_ca_cert(ca_pem.encode("utf-8"))
        if not cert_pem:
            return
        try:
            cert = x509.load_pem_x509_certificate(cert_pem.encode("utf-8"))
        except ValueError as exc:
            raise ValueError("the certificate it signed for this node is not PEM") from exc
        if cert.public_key() != self.node_key.public_key():
            raise ValueError("the certificate it signed for this node is for another key")
        if common_name(cert.subject) != self.node_name:
            raise ValueError(f"the certificate it signed for this node names "
                             f"{common_name(cert.subject)!r}, not {self.node_name!r}")
        if not issued_by(cert, [ca_pem]):
            raise ValueError("the certificate it signed for this node is not from its CA")

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
            write_file(path, cert.public_bytes(PEM))
            for key in [k for k in self._client_ctxs if k[2] == peer_name]:
                del self._client_ctxs[key]

    def forget_peer_signed_cert(self, peer_name: str, unless_issued_by: str | None = None,
                                ) -> None:
        """Delete the certificate ``peer_name``'s CA signed for us (the peer was removed,
        or re-joined with a new CA), so its links present ``node.pem`` again.

        Args:
            peer_name: The peer's node name.
            unless_issued_by: Keep the certificate if this CA (PEM) signed it.
        """
        path = self._peer_cert_path(peer_name)
        with self._lock:
            if unless_issued_by is not None and path.exists():
                with contextlib.suppress(ValueError):
                    cert = x509.load_pem_x509_certificate(path.read_bytes())
                    if issued_by(cert, [unless_issued_by]):
                        return
            path.unlink(missing_ok=True)
            for key in [k for k in self._client_ctxs if k[2] == peer_name]:
                del self._client_ctxs[key]

    def _peer_cert_usable(self, peer_name: str) -> bool:
        """Whether the certificate ``peer_name``'s CA signed for us still says who we
        are: our node name (it names the old one after a rename), our key, and valid
        now. Otherwise the peer is dialed with ``node.pem``, signed by our CA, which the
        peer recorded for us when we joined."""
        path = self._peer_cert_path(peer_name)
        try:
            cert = x509.load_pem_x509_certificate(path.read_bytes())
        except (OSError, ValueError):
            return False
        now = dt.datetime.now(dt.UTC)
        return (common_name(cert.subject) == self.node_name
                and cert.public_key() == self.node_key.public_key()
                and cert.not_valid_before_utc <= now < cert.not_valid_after_utc)

    def _peer_cert_path(self, peer_name: str) -> Path:
        """Path for a peer-signed certificate; rejects names unsafe as file names."""
        if not _SAFE_NAME.match(peer_name) or ".." in peer_name:
            raise ValueError("Invalid peer name for a certificate file")
        return self.peer_certs_dir / f"{peer_name}.pem"

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
            write_file(self._barred_path, "".join(f"{p}\n" for p in sorted(pins)).encode(),
                       0o600)

    # -- trusted peer CAs and the TLS contexts that use them ---------------------------
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
        cert = check_ca_cert(ca_pem)
        fingerprint = cert.fingerprint(hashes.SHA256()).hex()
        path = self.trusted_dir / f"{fingerprint}.pem"
        pem = cert.public_bytes(PEM)
        with self._lock:
            if cert == self.ca_cert or path.exists():
                return False
            self.trusted_dir.mkdir(parents=True, exist_ok=True)
            write_file(path, pem)
            for ctx in list(self._live):
                tls.add_trusted_ca(ctx, pem)
        return True

    def _load_trust(self, ctx: TLSContext) -> None:
        """Load our CA and every trusted peer CA into a context and register it live."""
        tls.load_trust(ctx, self.ca_pem, self.trusted_ca_pems())
        self._live.add(ctx)

    def server_context(self) -> TLSContext:
        """The replication listener's TLS context (cached).

        Returns:
            A TLS 1.2+ server context with the node cert, ``CERT_OPTIONAL`` client
            certificates, trusting our CA and all trusted peer CAs.
        """
        with self._lock:
            if self._server_ctx is None:
                ctx = tls.server_context(self.node_cert_path, self.node_key_path)
                self._load_trust(ctx)
                self._server_ctx = ctx
            return self._server_ctx

    def client_context(
        self, verify: bool = True, peer_name: str | None = None, *, present_cert: bool = True,
        check_hostname: bool = True,
    ) -> TLSContext:
        """A TLS context for dialing a peer (cached per argument set).

        Args:
            verify: Verify the server certificate and host name. If False, no checks.
            peer_name: Present the certificate that this peer's CA signed for us, if one
                was stored; otherwise the node certificate.
            present_cert: Send a client certificate at all. Use False when joining a
                peer that does not trust our CA yet (see :mod:`harpsync.security.tls`).
            check_hostname: With ``verify``, require the URL's host in the server's
                certificate. Callers that check the server's name, CA and pinned key
                before sending anything pass False: a peer added by an address its
                certificate does not list (another IP, a proxy) is still that peer.

        Returns:
            A TLS 1.2+ client context.
        """
        key = (verify, present_cert, peer_name, check_hostname)
        with self._lock:
            ctx = self._client_ctxs.get(key)
            if ctx is not None:
                return ctx
            certfile = None
            if present_cert:
                certfile = self.node_cert_path
                if peer_name is not None and self._peer_cert_usable(peer_name):
                    certfile = self._peer_cert_path(peer_name)
            ctx = tls.client_context(certfile, self.node_key_path, verify, check_hostname)
            if verify:
                self._load_trust(ctx)
            self._client_ctxs[key] = ctx
            return ctx
