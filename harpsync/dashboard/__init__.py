"""The dashboard: a static page (HTML, CSS, vanilla JavaScript) served at ``/dashboard``.

The page holds no data and needs nothing from the internet. It asks for the
credentials of the operations API in a small form, then polls ``POST /`` with Basic
auth (``cluster_overview`` and friends) from JavaScript. The files are read once from
this package; ``asset`` refuses any name it does not ship.
"""

from __future__ import annotations

from functools import cache
from importlib import resources

TYPES = {
    "index.html": "text/html; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
    "dashboard.js": "text/javascript; charset=utf-8",
}

# Only this page's own files, no inline script or style, and never inside a frame (its
# controls must not be clickjacked).
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
                               "img-src 'self' data:; connect-src 'self'; "
                               "form-action 'none'; frame-ancestors 'none'; base-uri 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def asset(name: str) -> tuple[bytes, str] | None:
    """``(content, content type)`` of a shipped file, or None for any other name."""
    content_type = TYPES.get(name)
    if content_type is None:
        return None  # never cached: anyone may ask for any name, as often as they like
    return _read(name), content_type


@cache
def _read(name: str) -> bytes:
    """A shipped file's content, read once (``name`` is one of ``TYPES``)."""
    return resources.files(__name__).joinpath(name).read_bytes()
