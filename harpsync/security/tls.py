"""Building ``ssl.SSLContext`` objects, and TLS names for modules that must not import ssl.

:class:`harpsync.security.NodeKeys` caches the contexts built here and keeps the trust
of every live one up to date.

Gotcha: with ``CERT_OPTIONAL`` a client sending *no* certificate is accepted
(``getpeercert()`` is None) but one sending an unverifiable certificate fails the
handshake, so a node joining a peer that lacks its CA dials with
``client_context(..., present_cert=False)``. Under TLS 1.3 the client sees that failure
only on its first read.
"""

from __future__ import annotations

import logging
import ssl
from pathlib import Path

__all__ = [
    "TLSContext", "TLS_ERRORS", "describe_tls_error", "server_context", "client_context",
    "load_trust", "add_trusted_ca",
]

log = logging.getLogger(__name__)

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


# -- building contexts ------------------------------------------------------------------
def server_context(certfile: Path, keyfile: Path) -> ssl.SSLContext:
    """A TLS 1.2+ server context presenting ``certfile`` and asking for (but not
    requiring) a client certificate; it trusts nothing until :func:`load_trust`."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(certfile, keyfile)
    ctx.verify_mode = ssl.CERT_OPTIONAL
    return ctx


def client_context(certfile: Path | None, keyfile: Path, verify: bool,
                   check_hostname: bool = True) -> ssl.SSLContext:
    """A TLS 1.2+ client context.

    Args:
        certfile: The client certificate to present, or None to present none.
        keyfile: The private key of ``certfile``.
        verify: Verify the server certificate and host name (the caller then loads
            trust with :func:`load_trust`). If False, no checks at all.
        check_hostname: With ``verify``, also require the URL's host in the server
            certificate. False only for callers that check who answered by its
            certificate (name, CA, pin) before sending anything.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if certfile is not None:
        ctx.load_cert_chain(certfile, keyfile)
    if verify and not check_hostname:
        ctx.check_hostname = False  # the chain is still verified (CERT_REQUIRED)
    if not verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def load_trust(ctx: ssl.SSLContext, own_ca_pem: bytes, trusted_pems: list[bytes]) -> None:
    """Trust our own CA and every trusted peer CA; an unreadable peer CA is skipped."""
    ctx.load_verify_locations(cadata=own_ca_pem.decode("ascii"))
    for pem in trusted_pems:
        try:
            ctx.load_verify_locations(cadata=pem.decode("ascii"))
        except (ssl.SSLError, UnicodeDecodeError):
            log.warning("skipping unreadable trusted CA file")


def add_trusted_ca(ctx: ssl.SSLContext, pem: bytes) -> None:
    """Trust one more CA in a context already handed out."""
    ctx.load_verify_locations(cadata=pem.decode("ascii"))
