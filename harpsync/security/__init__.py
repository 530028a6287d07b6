"""Node keys, certificates and TLS contexts (replication/DESIGN.md, "Trust model").

This package is the only importer of ``cryptography`` and ``ssl``. Each node owns a
private CA (EC P-256) and a node certificate signed by it; peers exchange CA
certificates during ``add_node``. Its modules, by reason to change:

- :mod:`~harpsync.security.certificates`: reading and checking certificates (names,
  SANs, pins, serials, issuers);
- :mod:`~harpsync.security.issuing`: building certificates and CSRs;
- :mod:`~harpsync.security.identity`: the certificate a peer presented on a TLS socket;
- :mod:`~harpsync.security.files`: key files on disk, private ones with mode 0600;
- :mod:`~harpsync.security.keys`: :class:`NodeKeys`, the node's keys, trusted peer CAs,
  removed nodes' pins and the TLS contexts it hands out;
- :mod:`~harpsync.security.tls`: building ``ssl`` contexts, and TLS names for modules
  that must not import ``ssl``.

Everything callers use is re-exported here, so they import from ``harpsync.security``.
"""

from __future__ import annotations

from harpsync.passwords import hash_password, parse_authorization, verify_password
from harpsync.security.certificates import (
    check_node_cert,
    describe_ca_pem,
    serial_to_hex,
    valid_pin,
)
from harpsync.security.identity import PeerCert, PeerIdentity, peer_cert, peer_identity
from harpsync.security.issuing import VALIDITY_DAYS, IssuedCert
from harpsync.security.keys import NodeKeys
from harpsync.security.tls import TLS_ERRORS, TLSContext, describe_tls_error, server_context

__all__ = [
    "NodeKeys", "PeerIdentity", "PeerCert", "peer_identity", "peer_cert", "serial_to_hex",
    "hash_password", "verify_password", "parse_authorization", "IssuedCert",
    "check_node_cert", "describe_ca_pem", "valid_pin", "VALIDITY_DAYS", "TLSContext", "TLS_ERRORS",
    "describe_tls_error", "server_context",
]
