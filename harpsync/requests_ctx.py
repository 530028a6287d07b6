"""The request being served: its id, response headers set by handlers, and log tagging.

A ``RequestContext`` lives in a context variable for the whole of one request, so a
handler deep inside an operation can add a response header (``X-Harpsync-Version``)
and every log line written while serving it carries the request's id.
"""

from __future__ import annotations

import itertools
import logging
import re
import secrets
from contextvars import ContextVar
from dataclasses import dataclass, field

REQUEST_ID_HEADER = "X-Request-Id"
VERSION_HEADER = "X-Harpsync-Version"
MAX_ID_LENGTH = 128
# What a client-sent id may hold: it is echoed in a header and written to logs, so
# nothing that could split a header or a log line.
_ID_RE = re.compile(r"^[A-Za-z0-9._:/+=@-]{1," + str(MAX_ID_LENGTH) + r"}$")


@dataclass(slots=True)
class RequestContext:
    """One request: its id and the headers its handlers add to the response."""

    request_id: str
    headers: dict[str, str] = field(default_factory=dict)
    # The newest version a write of this request committed (0: it wrote nothing).
    version: int = 0


_CURRENT: ContextVar[RequestContext | None] = ContextVar("harpsync_request", default=None)


# Ids only need to be unique, not secret: a random per-process prefix and a counter
# (a system call for random bytes per request would cost more than the rest of this).
_PREFIX = "req-" + secrets.token_hex(6) + "-"
_COUNTER = itertools.count(1)
# Requests begun in this process (the writer asks whether a write is the only one).
_BEGUN = [0]


def new_request_id() -> str:
    return f"{_PREFIX}{next(_COUNTER):x}"


def accept_request_id(sent: str | bytes | None) -> str:
    """The client's id if it is acceptable (at most 128 of ``A-Za-z0-9._:/+=@-``),
    else a new one: a bad id is replaced, never a reason to fail the request."""
    if isinstance(sent, bytes):
        sent = sent.decode("latin-1")
    if sent and _ID_RE.match(sent):
        return sent
    return new_request_id()


def begin(sent: str | bytes | None = None) -> RequestContext:
    """Start serving a request in the current context; returns its context."""
    ctx = RequestContext(accept_request_id(sent))
    _CURRENT.set(ctx)
    _BEGUN[0] += 1
    return ctx


def begun() -> int:
    """How many requests this process has begun serving (any route)."""
    return _BEGUN[0]


def current() -> RequestContext | None:
    return _CURRENT.get()


def current_id() -> str | None:
    ctx = _CURRENT.get()
    return ctx.request_id if ctx is not None else None


def note_version(version: int) -> None:
    """Record a version the current request committed (the newest one wins)."""
    ctx = _CURRENT.get()
    if ctx is not None and version > ctx.version:
        ctx.version = version
        ctx.headers[VERSION_HEADER] = str(version)


class RequestIdFilter(logging.Filter):
    """Adds ``request_id`` (or ``-``) and ``request_tag`` (`` [req-...]`` or empty) to
    every record, so a format can show which request a line is about."""

    def filter(self, record: logging.LogRecord) -> bool:
        rid = current_id()
        record.request_id = rid or "-"
        record.request_tag = f" [{rid}]" if rid else ""
        return True


_FACTORY_INSTALLED = False


def install_log_context() -> None:
    """Tag every log record made in this process with the current request's id
    (``request_id`` and ``request_tag`` attributes); safe to call more than once."""
    global _FACTORY_INSTALLED
    if _FACTORY_INSTALLED:
        return
    _FACTORY_INSTALLED = True
    previous = logging.getLogRecordFactory()
    tagger = RequestIdFilter()

    def factory(*args: object, **kwargs: object) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        tagger.filter(record)
        return record

    logging.setLogRecordFactory(factory)


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s%(request_tag)s: %(message)s"
