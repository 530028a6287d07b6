"""The node's key files on disk: written atomically, private keys readable by us only.

Layout of ``keys_dir``: ``ca.pem``/``ca.key`` (the node's CA), ``node.pem``/``node.key``
(the node certificate and key), ``trusted/`` (peer CAs by SHA-256 fingerprint),
``peer_certs/`` (our node certificates signed by peers' CAs) and ``removed_pins``.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from harpsync.durable import sync_directory
from harpsync.security.certificates import (
    MAX_COMMON_NAME,
    PEM,
    RENEW_BEFORE,
    node_cert_ok,
    wanted_names,
)
from harpsync.security.issuing import issue

__all__ = ["write_file", "load_or_create_files"]

log = logging.getLogger(__name__)


def write_file(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write a file atomically and durably with the given permission bits: the data is
    synced before the rename and the directory after, so a power loss leaves the old
    file or the new one, never an empty key or certificate."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.chmod(tmp, mode)
    os.replace(tmp, path)
    sync_directory(path.parent)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    """Serialise a private key as unencrypted PKCS#8 PEM."""
    return key.private_bytes(PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """Load an EC private key from a PEM file."""
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{path} does not hold an EC private key")
    return key


def _ca_name(node_name: str) -> str:
    """The CA's common name: descriptive only, cut to the 64 characters X.509 allows."""
    return f"harpsync CA {node_name}"[:MAX_COMMON_NAME]


def load_or_create_files(
    keys_dir: Path, node_name: str, hosts: list[str]
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate,
           ec.EllipticCurvePrivateKey, x509.Certificate]:
    """Load the CA and node key material from ``keys_dir``, generating what is missing.

    See :meth:`harpsync.security.NodeKeys.load_or_create` for when the node certificate
    is re-issued.

    Returns:
        ``(ca_key, ca_cert, node_key, node_cert)``.

    Only ``ca.key`` with neither ``ca.pem`` nor ``node.pem`` is what a first start
    killed between its writes leaves: the CA certificate is issued from that key.

    Raises:
        ValueError: If only one of ``ca.pem`` / ``ca.key`` exists otherwise, a key
            is not EC, or the node name is too long for a certificate.
    """
    if not 1 <= len(node_name) <= MAX_COMMON_NAME:
        # The name is the node certificate's common name, which peers check.
        raise ValueError(f"replication.hostname {node_name[:80]!r} has {len(node_name)} "
                         f"characters; a node name is its certificate's common name, which "
                         f"holds 1 to {MAX_COMMON_NAME}: set a shorter replication.hostname "
                         "(replication.url can still name the long host)")
    keys_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    (keys_dir / "trusted").mkdir(exist_ok=True, mode=0o700)
    # Whatever the umask was, or an older version left: private keys stay private.
    os.chmod(keys_dir, 0o700)
    for private in (keys_dir / "ca.key", keys_dir / "node.key"):
        if private.exists():
            os.chmod(private, 0o600)
    ca_path, ca_key_path = keys_dir / "ca.pem", keys_dir / "ca.key"
    node_path, node_key_path = keys_dir / "node.pem", keys_dir / "node.key"
    if ca_key_path.exists() and not ca_path.exists() and not node_path.exists():
        # The first start stopped between writing ca.key and ca.pem (a crash): no node
        # certificate was ever signed, so nothing can trust this CA yet. Finish it.
        ca_key = _load_key(ca_key_path)
        log.warning("%s has ca.key without ca.pem (an interrupted first start): issuing "
                    "the CA certificate", keys_dir)
        write_file(ca_path, issue(_ca_name(node_name), ca_key.public_key(), ca_key,
                                  None).public_bytes(PEM))
    if ca_path.exists() != ca_key_path.exists():
        raise ValueError(f"{keys_dir} has only one of ca.pem / ca.key; refusing to "
                         "replace the CA")
    if ca_path.exists():
        ca_key = _load_key(ca_key_path)
        ca_cert = x509.load_pem_x509_certificate(ca_path.read_bytes())
    else:
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_cert = issue(_ca_name(node_name), ca_key.public_key(), ca_key, None)
        write_file(ca_key_path, _key_pem(ca_key), 0o600)
        write_file(ca_path, ca_cert.public_bytes(PEM))
    if ca_cert.not_valid_after_utc - dt.datetime.now(dt.UTC) < RENEW_BEFORE:
        log.warning("the CA in %s ends on %s and is never replaced by itself; node "
                    "certificates cannot outlive it: give the node new keys and run "
                    "add_node for it on its peers", keys_dir,
                    ca_cert.not_valid_after_utc.isoformat())
    if node_key_path.exists():
        node_key = _load_key(node_key_path)
    else:
        node_key = ec.generate_private_key(ec.SECP256R1())
        write_file(node_key_path, _key_pem(node_key), 0o600)
        node_path.unlink(missing_ok=True)
    wanted = wanted_names(node_name, hosts)
    node_cert = None
    if node_path.exists():
        node_cert = x509.load_pem_x509_certificate(node_path.read_bytes())
        if not node_cert_ok(node_cert, node_key, ca_cert, node_name, wanted):
            log.info("re-issuing node certificate for %s", node_name)
            node_cert = None
    if node_cert is None:
        node_cert = issue(node_name, node_key.public_key(), ca_key, ca_cert, sans=wanted)
        write_file(node_path, node_cert.public_bytes(PEM))
    return ca_key, ca_cert, node_key, node_cert
