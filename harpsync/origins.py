"""Which browser requests the operations API serves: only those of its own pages.

A browser attaches the Basic credentials it holds for the node (typed into a prompt of a
proxy in front of it, say) to any request a page on another site makes it send. A
``<form enctype="text/plain">`` or a ``no-cors`` fetch needs no CORS preflight, and its
body can be JSON, so without this check such a page could run any operation as the
signed-in operator. The same goes for the ``/changes`` WebSocket, which CORS never covers.

Browsers say where a request comes from; other clients (curl, SDKs, peers) say nothing
and are served as before:

- ``Sec-Fetch-Site``, set by the browser itself and not by the page, is the first
  witness: only ``same-origin`` (and ``none``, a request the user made) is served.
  Browsers send it to HTTPS and loopback addresses.
- Otherwise ``Origin``: it must name this node as the request reached it (``Host``) or as
  a proxy in front of it says the browser asked for it (``X-Forwarded-Host``; a page on
  another site cannot add that header without a preflight, which the node refuses).
"""

from __future__ import annotations

from urllib.parse import urlsplit

from harpsync.errors import HarpsyncError


class CrossOriginError(HarpsyncError):
    """A page of another origin made a browser send the request (403)."""

    status = 403
    code = "FORBIDDEN"


_SERVED_SITES = ("same-origin", "none")
_DEFAULT_PORTS = {"http": 80, "https": 443}


def _split(authority: str, default_port: int) -> tuple[str, int] | None:
    """``(host, port)`` of ``host[:port]`` (``default_port`` when none is given)."""
    try:
        parts = urlsplit("//" + authority.strip())
        if not parts.hostname:
            return None
        return parts.hostname.lower(), parts.port or default_port
    except ValueError:
        return None


def _refused(origin: str, why: str = "") -> CrossOriginError:
    return CrossOriginError(f"Cross-origin request refused: a page of origin '{origin[:100]}' "
                            f"may not use this node's operations API{why}")


def check(origin: str | None, fetch_site: str | None, host: str | None,
          forwarded_host: str | None) -> None:
    """Refuse a request a page of another origin made a browser send.

    Args:
        origin, fetch_site, host, forwarded_host: the ``Origin``, ``Sec-Fetch-Site``,
            ``Host`` and ``X-Forwarded-Host`` headers (None when absent).

    Raises:
        CrossOriginError: the request comes from a page of another origin.
    """
    if fetch_site is not None:
        if fetch_site.strip().lower() in _SERVED_SITES:
            return
        raise _refused(origin or "(not sent)", f" (Sec-Fetch-Site: {fetch_site[:20]})")
    if origin is None:
        return  # not a browser: nothing to hold against it
    try:
        parts = urlsplit(origin.strip())
        default_port = _DEFAULT_PORTS.get(parts.scheme)
        wanted = _split(parts.netloc, default_port) if default_port else None
    except ValueError:
        wanted = None
    if wanted is not None and default_port is not None:
        # A Host without a port names the default port of the scheme the browser used.
        for seen in (host, *(forwarded_host or "").split(",")):
            if seen and _split(seen, default_port) == wanted:
                return
    raise _refused(origin)
