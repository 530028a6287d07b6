"""One exception tree for the whole node; each class carries its HTTP status."""

from __future__ import annotations

from typing import Any


class HarpsyncError(Exception):
    """Base of every error the node reports to a client."""

    status: int = 500

    def __init__(self, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.message = message
        self.extra = extra

    def body(self) -> dict[str, Any]:
        """The JSON body sent to the client: ``{"error": message, **extra}``."""
        return {"error": self.message, **self.extra}


class BadRequestError(HarpsyncError):
    """Bad input: a field problem, an unknown operation, malformed JSON (400)."""

    status = 400


class ValidationError(BadRequestError):
    """A body failed its operation's JSON Schema (400)."""


class UnauthorizedError(HarpsyncError):
    """No credentials or failed login (401)."""

    status = 401


class ForbiddenError(HarpsyncError):
    """The user's role does not allow the operation (403)."""

    status = 403

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


class ConflictError(HarpsyncError):
    """A duplicate, such as an existing user (409)."""

    status = 409


class PayloadTooLargeError(HarpsyncError):
    """The request body is over the size limit (413)."""

    status = 413


class TooManyRequestsError(HarpsyncError):
    """Too many failed logins or requests from one client; retry later (429).

    ``retry_after`` (whole seconds) becomes the ``Retry-After`` header.
    """

    status = 429

    def __init__(self, message: str, retry_after: int, headers: dict[str, str] | None = None,
                 **extra: Any) -> None:
        super().__init__(message, **extra)
        self.retry_after = max(1, int(retry_after))
        self.headers = {"Retry-After": str(self.retry_after), **(headers or {})}


class PeerError(HarpsyncError):
    """A peer could not be reached, refused us, or failed TLS (502-ish, reported as 400)."""

    status = 400


class ConfigError(Exception):
    """A bad configuration value; the message names the key."""


class StorageError(HarpsyncError):
    """The storage layer failed (disk full, map full); a 500-class server fault."""

    status = 507
