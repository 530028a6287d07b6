"""One exception tree for the whole node; each class carries its HTTP status."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any


class HarpsyncError(Exception):
    """Base of every error the node reports to a client."""

    status: int = 500
    # The machine-readable kind of error (seed 000 section 6.2), sent as ``code``;
    # a subclass without one gets the code of its status.
    code: str | None = None

    def __init__(self, message: str, code: str | None = None, **extra: Any) -> None:
        super().__init__(message)
        self.message = message
        self.extra = extra
        if code is not None:
            self.code = code

    def body(self) -> dict[str, Any]:
        """The JSON body sent to the client: ``{"error": message, **extra, "code": ...}``.

        The HTTP layer adds ``request_id``.
        """
        return {"error": self.message, **self.extra,
                "code": self.code or code_for_status(self.status)}


class BadRequestError(HarpsyncError):
    """Bad input: a field problem, an unknown operation, malformed JSON (400)."""

    status = 400
    code = "VALIDATION_ERROR"


class ValidationError(BadRequestError):
    """A body failed its operation's JSON Schema (400)."""


class UnauthorizedError(HarpsyncError):
    """No credentials or failed login (401)."""

    status = 401
    code = "UNAUTHORIZED"


class ForbiddenError(HarpsyncError):
    """The user's role does not allow the operation (403)."""

    status = 403
    code = "FORBIDDEN"

    def __init__(
        self,
        unauthorized_access: list[Any],
        invalid_schema_items: list[Any] | None = None,
    ) -> None:
        super().__init__(
            "This operation is not authorized due to role restrictions and/or "
            "invalid database items",
            unauthorized_access=unauthorized_access,
            invalid_schema_items=invalid_schema_items or [],
        )


class NotFoundError(HarpsyncError):
    """A missing database or table where Harper answers 404."""

    status = 404
    code = "NOT_FOUND"


class MissingError(NotFoundError):
    """Something a request names does not exist (404).

    Lower layers raise it in their own terms (storage's ``NoSuchDatabaseError``,
    ``NoSuchTableError``, ``NoSuchAttributeError``) and choose no status: a missing
    name is answered as 404, except where the operation says otherwise with
    :func:`missing_is_bad_request` (Harper answers writes naming a missing table with
    400).
    """


@contextlib.contextmanager
def missing_is_bad_request() -> Iterator[None]:
    """Answer a :class:`MissingError` raised in the block as a 400 with its message
    (the status Harper gives writes, loads and resolutions naming a missing table)."""
    try:
        yield
    except MissingError as exc:
        raise BadRequestError(exc.message) from None


class ConflictError(HarpsyncError):
    """A duplicate, such as an existing user (409)."""

    status = 409
    code = "CONFLICT"


class PayloadTooLargeError(HarpsyncError):
    """The request body is over the size limit (413)."""

    status = 413
    code = "PAYLOAD_TOO_LARGE"


class TooManyRequestsError(HarpsyncError):
    """Too many failed logins or requests from one client; retry later (429).

    ``retry_after`` (whole seconds) becomes the ``Retry-After`` header and the body's
    ``retry_after_seconds`` (seed 000 section 7.3), for every kind of 429.
    """

    status = 429
    code = "RATE_LIMIT_EXCEEDED"

    def __init__(self, message: str, retry_after: int, headers: dict[str, str] | None = None,
                 code: str | None = None, **extra: Any) -> None:
        retry_after = max(1, int(retry_after))
        extra.setdefault("retry_after_seconds", retry_after)
        super().__init__(message, code, **extra)
        self.retry_after = retry_after
        self.headers = {"Retry-After": str(self.retry_after), **(headers or {})}


class PeerError(HarpsyncError):
    """A peer could not be reached, refused us, or failed TLS (502-ish, reported as 400)."""

    status = 400
    code = "PEER_ERROR"


class ConfigError(Exception):
    """A bad configuration value; the message names the key."""


class StorageError(HarpsyncError):
    """The storage layer failed (disk full, map full); a 500-class server fault."""

    status = 507
    code = "STORAGE_ERROR"


class ServiceUnavailableError(HarpsyncError):
    """The node cannot serve this yet (not ready, shutting down) (503)."""

    status = 503
    code = "SERVICE_UNAVAILABLE"


class ReplicationTimeoutError(HarpsyncError):
    """Peers did not apply a version in time (``wait_for_replication``, 504)."""

    status = 504
    code = "REPLICATION_LAG_EXCEEDED"


# Codes for statuses that come from the HTTP layer itself (unknown paths, methods).
STATUS_CODES = {400: "VALIDATION_ERROR", 401: "UNAUTHORIZED", 403: "FORBIDDEN",
                404: "NOT_FOUND", 405: "METHOD_NOT_ALLOWED", 409: "CONFLICT",
                413: "PAYLOAD_TOO_LARGE", 429: "RATE_LIMIT_EXCEEDED", 500: "INTERNAL_ERROR",
                503: "SERVICE_UNAVAILABLE", 504: "REPLICATION_LAG_EXCEEDED",
                507: "STORAGE_ERROR"}


def code_for_status(status: int) -> str:
    """The ``code`` of an error answered with ``status`` outside the exception tree."""
    return STATUS_CODES.get(status, "INTERNAL_ERROR" if status >= 500 else "INVALID_REQUEST")
