"""The HTTP layer: one POST route for operations, ``/health`` and ``/metrics``."""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections.abc import Callable
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from harpsync import jsonio
from harpsync.errors import (
    BadRequestError,
    HarpsyncError,
    PayloadTooLargeError,
    TooManyRequestsError,
)

log = logging.getLogger(__name__)

JSON = "application/json"


def json_response(payload: Any, status: int = 200) -> Response:
    body = jsonio.dumps(payload)
    return Response(body, status_code=status, media_type=JSON)


parse_json = jsonio.parse_request


class RateLimiter:
    """Per-user token buckets: ``per_minute`` requests a minute, bursts of ``burst``.

    Each user's bucket holds up to ``burst`` tokens and refills at ``per_minute / 60``
    a second; a request takes one. Off when ``per_minute`` is 0.
    """

    def __init__(self, per_minute: int, burst: int,
                 clock: Callable[[], float] = time.time) -> None:
        self.per_minute = per_minute
        self.burst = max(1, burst)
        self.rate = per_minute / 60.0
        self.clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.per_minute > 0

    def take(self, user: str) -> dict[str, str]:
        """Take one token for ``user``; return the ``X-RateLimit-*`` headers.

        Raises:
            TooManyRequestsError: the bucket is empty (429 with ``RATE_LIMIT_EXCEEDED``).
        """
        with self._lock:
            now = self.clock()
            tokens, last = self._buckets.get(user, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - last) * self.rate)
            allowed = tokens >= 1.0
            if allowed:
                tokens -= 1.0
            if len(self._buckets) > 100_000:
                self._buckets.clear()
            self._buckets[user] = (tokens, now)
        reset = math.ceil(now + (self.burst - tokens) / self.rate)
        headers = {"X-RateLimit-Limit": str(self.per_minute),
                   "X-RateLimit-Remaining": str(int(tokens)),
                   "X-RateLimit-Reset": str(reset)}
        if not allowed:
            wait = max(1, math.ceil((1.0 - tokens) / self.rate))
            raise TooManyRequestsError(
                f"Rate limit exceeded. Retry after {wait} seconds.", wait, headers,
                code="RATE_LIMIT_EXCEEDED", retry_after_seconds=wait)
        return headers


def build_app(services: Any) -> Any:
    """The ASGI app; ``services`` is the node's composition of collaborators.

    ``POST /`` (every operation) is served by a small ASGI function; everything else
    (``/health``, ``/metrics``, unknown paths) goes through Starlette. The operations
    route is the hot path: skipping Starlette's request object, router and middleware
    there is worth about a fifth of the CPU a single-record insert costs.
    """
    limit = int(services.config.get("operationsApi.network.maxBodySize"))
    too_large = f"Request body is larger than the limit of {limit} bytes"

    limiter = RateLimiter(int(services.config.get("operationsApi.rateLimit.requestsPerMinute")
                              or 0),
                          int(services.config.get("operationsApi.rateLimit.burst") or 1))

    async def run_operation(header: str | None, declared: bytes | None, receive: Any,
                            client: str) -> tuple[int, Any, dict[str, str]]:
        headers: dict[str, str] = {}
        try:
            # A password check is a deliberately slow scrypt: keep it off the event loop.
            user = (services.auth.cached(header)
                    or await asyncio.to_thread(services.auth.authenticate, header, client))
            if limiter.enabled:
                headers = limiter.take(user.username)
            if declared is not None and declared.isdigit() and int(declared) > limit:
                raise PayloadTooLargeError(too_large)
            chunks: list[bytes] = []
            size = 0
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    raise BadRequestError("the client went away")
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > limit:
                    raise PayloadTooLargeError(too_large)
                chunks.append(chunk)
                if not message.get("more_body"):
                    break
            body = parse_json(chunks[0] if len(chunks) == 1 else b"".join(chunks))
            result = await services.dispatcher.run(services, user, body)
            services.metrics.count_operation(body["operation"], 200)
            return 200, result, headers
        except TooManyRequestsError as exc:
            services.metrics.count_operation(None, exc.status)
            return exc.status, exc.body(), exc.headers
        except HarpsyncError as exc:
            services.metrics.count_operation(None, exc.status)
            return exc.status, exc.body(), headers
        except Exception:
            log.exception("operation failed with an unexpected error")
            services.metrics.count_operation(None, 500)
            return 500, {"error": "Internal error; see the node log"}, headers

    async def health(request: Request) -> Response:
        report = services.health()
        return json_response(report, 200 if report["status"] == "ok" else 503)

    async def metrics(request: Request) -> Response:
        data, content_type = services.metrics_report()
        return Response(data, media_type=content_type)

    async def http_error(request: Request, exc: Exception) -> Response:
        # Unknown paths and methods get the same {"error": ...} shape as everything else.
        if not isinstance(exc, HTTPException):
            return json_response({"error": "Internal error; see the node log"}, 500)
        response = json_response({"error": exc.detail}, exc.status_code)
        response.headers.update(exc.headers or {})
        return response

    async def operations(request: Request) -> Response:  # reached only via Starlette
        status, payload, headers = await run_operation(
            request.headers.get("authorization"), None, request.receive,
            request.client.host if request.client else "")
        response = json_response(payload, status)
        response.headers.update(headers)
        return response

    routes = [
        Route("/", operations, methods=["POST"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ]
    starlette = Starlette(routes=routes, exception_handlers={HTTPException: http_error})

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] != "/":
            await starlette(scope, receive, send)
            return
        header = declared = None
        for key, value in scope["headers"]:
            if key == b"authorization":
                header = value.decode("latin-1")
            elif key == b"content-length":
                declared = value
        client = scope.get("client")
        status, payload, extra = await run_operation(header, declared, receive,
                                                     str(client[0]) if client else "")
        data = jsonio.dumps(payload)
        headers = [(b"content-type", b"application/json"),
                   (b"content-length", str(len(data)).encode())]
        headers.extend((k.lower().encode(), v.encode()) for k, v in extra.items())
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": data})

    return app
