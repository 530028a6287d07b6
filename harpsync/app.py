"""The HTTP layer: one POST route for operations, ``/health`` and ``/metrics``."""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections.abc import Callable, MutableMapping
from typing import TYPE_CHECKING, Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from harpsync import dashboard, jsonio, origins, probes, requests_ctx
from harpsync.changes import ChangeFeed
from harpsync.errors import (
    BadRequestError,
    ForbiddenError,
    HarpsyncError,
    PayloadTooLargeError,
    TooManyRequestsError,
    code_for_status,
)
from harpsync.requests_ctx import REQUEST_ID_HEADER, VERSION_HEADER
from harpsync.services import Services

if TYPE_CHECKING:
    from harpsync.auth import User

log = logging.getLogger(__name__)

JSON = "application/json"
# Response header names as ASGI wants them (lower-case bytes), for the ones every
# response or write carries.
_HEADER_NAMES = {REQUEST_ID_HEADER: b"x-request-id", VERSION_HEADER: b"x-harpsync-version"}


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
                code="RATE_LIMIT_EXCEEDED")
        return headers


class _SocketChannel:
    """A Starlette WebSocket as the change feed's ``Channel``."""

    def __init__(self, websocket: WebSocket) -> None:
        self.websocket = websocket

    async def receive_text(self) -> str | None:
        while True:
            try:
                message = await self.websocket.receive()
            except (WebSocketDisconnect, RuntimeError):
                return None
            if message["type"] == "websocket.disconnect":
                return None
            if message.get("text") is not None:
                return str(message["text"])
            if message.get("bytes") is not None:
                return bytes(message["bytes"]).decode("utf-8", errors="replace")

    async def send_text(self, text: str) -> None:
        await self.websocket.send_text(text)

    async def close(self, code: int, reason: str) -> None:
        await self.websocket.close(code, reason)


async def _login(services: Services, header: str | None, client: str) -> User:
    """The user of an ``Authorization`` header: from the login cache, or checked in a
    worker thread (a password check is a deliberately slow scrypt)."""
    user = services.auth.cached(header, client)
    if user is None:
        user = await asyncio.to_thread(services.auth.authenticate, header, client)
    return user


def _browser(headers: Any) -> tuple[str | None, str | None, str | None, str | None]:
    """What ``origins.check`` looks at, from lower-case request headers."""
    return (headers.get("origin"), headers.get("sec-fetch-site"), headers.get("host"),
            headers.get("x-forwarded-host"))


def build_app(services: Services) -> Any:
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
                            client: str, request_id: bytes | str | None = None,
                            browser: tuple[str | None, str | None, str | None, str | None]
                            | None = None) -> tuple[int, Any, dict[str, str]]:
        """Log in, read and parse the body, dispatch; returns status, payload, headers.

        ``browser``: the ``Origin``, ``Sec-Fetch-Site``, ``Host`` and ``X-Forwarded-Host``
        headers when the request has either of the first two (see ``origins.check``).

        One coroutine for the whole request: this is the hot path, and each extra
        coroutine level costs about a microsecond.
        """
        request = requests_ctx.begin(request_id)
        started = time.perf_counter()
        headers: dict[str, str] = {}
        name: str | None = None
        try:
            if browser is not None:  # before the login: a forged request costs nothing
                origins.check(*browser)
            # The login cache first, without a coroutine (the hot path); a password check
            # is a deliberately slow scrypt, kept off the event loop.
            user = services.auth.cached(header, client)
            if user is None:
                user = await asyncio.to_thread(services.auth.authenticate, header, client)
            if limiter.enabled:
                headers = limiter.take(user.username)
            if declared is not None and declared.isdigit() and int(declared) > limit:
                raise PayloadTooLargeError(too_large)
            message = await receive()
            if message["type"] == "http.disconnect":
                raise BadRequestError("the client went away")
            raw = message.get("body", b"")
            if len(raw) > limit:
                raise PayloadTooLargeError(too_large)
            if message.get("more_body"):
                raw = await _rest_of_body(receive, raw)
            try:
                body = parse_json(raw)
            except BadRequestError as exc:
                exc.code = "INVALID_REQUEST"  # malformed, as opposed to failing validation
                raise
            status, payload = 200, await services.dispatcher.run(services, user, body)
            name = body["operation"]
        except TooManyRequestsError as exc:
            status, payload, headers = exc.status, exc.body(), exc.headers
        except HarpsyncError as exc:
            status, payload = exc.status, exc.body()
        except Exception:
            log.exception("operation failed with an unexpected error")
            status, payload = 500, {"error": "Internal error; see the node log",
                                    "code": "INTERNAL_ERROR"}
        if status != 200:
            payload["request_id"] = request.request_id
        elif request.headers:
            headers.update(request.headers)
        headers[REQUEST_ID_HEADER] = request.request_id
        services.metrics.observe_operation(name, status, time.perf_counter() - started)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("operation %s answered %d", name or "(rejected)", status)
        return status, payload, headers

    async def _rest_of_body(receive: Any, first: bytes) -> bytes:
        """The chunks after the first one, joined to it (at most ``limit`` bytes)."""
        chunks = [first]
        size = len(first)
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
                return b"".join(chunks)

    def denied(exc: HarpsyncError) -> Response:
        """A failed login or check on a GET route, in the usual error shape."""
        response = json_response({**exc.body(), "request_id": requests_ctx.current_id()},
                                 exc.status)
        response.headers.update(getattr(exc, "headers", None) or {})
        return response

    async def super_user(request: Request, required: bool) -> bool:
        """Whether the request logged in as a super user. Without credentials: False,
        or 401 ``Must login`` when ``required``. Wrong credentials are 401 (and count
        against the address) either way; a user who is not a super user is 403 when
        ``required``.

        Raises:
            HarpsyncError: as above (the caller answers it with ``denied``).
        """
        header = request.headers.get("authorization")
        if not header and not required:
            return False
        user = await _login(services, header, request.client.host if request.client else "")
        if required and not user.super_user:
            raise ForbiddenError([f"GET {request.url.path} is restricted to 'super_user' "
                                  "roles"])
        return user.super_user

    async def health(request: Request) -> Response:
        try:
            detailed = await super_user(request, required=False)
        except HarpsyncError as exc:
            return denied(exc)
        report = services.health()
        return json_response(report if detailed else probes.public_health(report),
                             200 if report["status"] == "ok" else 503)

    async def ready(request: Request) -> Response:
        try:
            detailed = await super_user(request, required=False)
        except HarpsyncError as exc:
            return denied(exc)
        status, report = probes.readiness(services)
        return json_response(report if detailed else probes.public_readiness(report), status)

    async def health_component(request: Request) -> Response:
        name = request.path_params["component"]
        try:
            # A peer's component names the peer: anonymously, 200/503 against 404 told
            # anyone which node names the cluster has.
            detailed = await super_user(request, required=name not in probes.COMPONENTS)
        except HarpsyncError as exc:
            return denied(exc)
        found = probes.health_component(services, name)
        if found is None:
            return json_response({"error": f"unknown health component '{name[:100]}': use "
                                           f"{', '.join(probes.COMPONENTS)} or a peer's name",
                                  "code": "NOT_FOUND",
                                  "request_id": requests_ctx.current_id()}, 404)
        return json_response(found[1] if detailed else probes.public_component(found[1]),
                             found[0])

    feed = ChangeFeed(services.storage, services.metrics,
                      int(services.config.get("operationsApi.changes.maxQueue") or 10_000),
                      int(services.config.get("operationsApi.changes.maxClients") or 100),
                      services.auth)

    async def changes_socket(websocket: WebSocket) -> None:
        """``/changes``: the same Basic login as ``POST /`` on the upgrade request."""
        client = websocket.client.host if websocket.client else ""
        header = websocket.headers.get("authorization")
        try:
            origins.check(*_browser(websocket.headers))
            user = await _login(services, header, client)
            if limiter.enabled:  # opening a feed is a request of its user, as POST / is
                limiter.take(user.username)
        except HarpsyncError as exc:
            denial = json_response({**exc.body(), "request_id": requests_ctx.current_id()},
                                   exc.status)
            denial.headers.update(getattr(exc, "headers", {}))
            await websocket.send_denial_response(denial)
            return
        await websocket.accept()
        await feed.serve(_SocketChannel(websocket), user, requests_ctx.current_id())

    async def no_socket(websocket: WebSocket) -> None:
        """A WebSocket upgrade to any other path: 404 with the usual error body (Starlette
        alone answers an empty 403, which reads like a permission problem)."""
        await websocket.send_denial_response(json_response(
            {"error": "Not Found", "code": "NOT_FOUND",
             "request_id": requests_ctx.current_id()}, 404))

    anonymous_metrics = bool(services.config.get("operationsApi.metrics.allowAnonymous"))

    async def metrics(request: Request) -> Response:
        if not anonymous_metrics:  # its labels name peers, databases and tables
            try:
                await super_user(request, required=True)
            except HarpsyncError as exc:
                return denied(exc)
        data, content_type = services.metrics_report()
        return Response(data, media_type=content_type)

    async def http_error(request: Request, exc: Exception) -> Response:
        # Unknown paths and methods get the same {"error": ...} shape as everything else.
        request_id = requests_ctx.current_id()
        if not isinstance(exc, HTTPException):
            log.error("request failed: %r", exc)
            return json_response({"error": "Internal error; see the node log",
                                  "code": "INTERNAL_ERROR", "request_id": request_id}, 500)
        response = json_response({"error": exc.detail, "code": code_for_status(exc.status_code),
                                  "request_id": request_id}, exc.status_code)
        response.headers.update(exc.headers or {})
        return response

    async def operations(request: Request) -> Response:  # reached only via Starlette
        status, payload, headers = await run_operation(
            request.headers.get("authorization"), None, request.receive,
            request.client.host if request.client else "",
            request.headers.get(REQUEST_ID_HEADER), _browser(request.headers))
        response = json_response(payload, status)
        response.headers.update(headers)
        return response

    async def dashboard_file(request: Request) -> Response:  # static; data comes via POST /
        found = dashboard.asset(request.path_params.get("name", "index.html"))
        if found is None:
            raise HTTPException(404, "Not Found")
        return Response(found[0], media_type=found[1], headers=dashboard.HEADERS)

    routes = [
        Route("/dashboard", dashboard_file, methods=["GET"]),
        Route("/dashboard/{name}", dashboard_file, methods=["GET"]),
        Route("/", operations, methods=["POST"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/ready", ready, methods=["GET"]),
        Route("/health/{component}", health_component, methods=["GET"]),
        WebSocketRoute("/changes", changes_socket),
        WebSocketRoute("/{path:path}", no_socket),
    ]
    starlette = Starlette(routes=routes, exception_handlers={HTTPException: http_error,
                                                            Exception: http_error})

    async def other(scope: dict[str, Any], receive: Any, send: Any) -> None:
        """Everything but ``POST /``: Starlette, with the request id on every response."""
        if scope["type"] not in ("http", "websocket"):
            await starlette(scope, receive, send)
            return
        sent = next((v for k, v in scope["headers"] if k == b"x-request-id"), None)
        header = (b"x-request-id", requests_ctx.begin(sent).request_id.encode())

        async def send_with_id(message: MutableMapping[str, Any]) -> None:
            if message["type"] in ("http.response.start", "websocket.accept",
                                   "websocket.http.response.start"):
                message = {**message, "headers": [*message.get("headers", []), header]}
            await send(message)

        await starlette(scope, receive, send_with_id)

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] != "/":
            await other(scope, receive, send)
            return
        header = declared = request_id = None
        browser = False
        for key, value in scope["headers"]:
            if key == b"authorization":
                header = value.decode("latin-1")
            elif key == b"content-length":
                declared = value
            elif key == b"x-request-id":
                request_id = value
            elif key == b"origin" or key == b"sec-fetch-site":
                browser = True
        client = scope.get("client")
        status, payload, extra = await run_operation(
            header, declared, receive, str(client[0]) if client else "", request_id,
            _browser(dict((k.decode("latin-1"), v.decode("latin-1"))
                          for k, v in scope["headers"])) if browser else None)
        data = jsonio.dumps(payload)
        headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(data))]
        for key, value in extra.items():
            headers.append((_HEADER_NAMES.get(key) or key.lower().encode(), value.encode()))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": data})

    return app
