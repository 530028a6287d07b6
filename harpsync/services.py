"""The seam between the node and its edges: what the HTTP layer and the operations use.

``harpsync/node.py`` (the composition root) is the one implementation; the HTTP layer
(``app.py``) and every operation handler (``OpContext.services``) see only this
protocol, so they never depend on how the node is put together (rqlite's
``http/service.go`` declares its ``Store`` and ``Cluster`` the same way).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from harpsync.auth import Authenticator
    from harpsync.config import Config
    from harpsync.dispatch import Dispatcher
    from harpsync.jobs import JobManager
    from harpsync.metrics import Metrics
    from harpsync.replication.replicator import Replicator
    from harpsync.replication.verifier import Verifier
    from harpsync.storage.store import Storage


class Services(Protocol):
    """The node's collaborators, as the HTTP layer and the operations see them."""

    @property
    def node_name(self) -> str: ...

    @property
    def started_at(self) -> float:
        """``time.monotonic()`` when the node started (for uptime)."""
        ...

    @property
    def config(self) -> Config: ...

    @property
    def storage(self) -> Storage: ...

    @property
    def auth(self) -> Authenticator: ...

    @property
    def cluster(self) -> Replicator: ...

    @property
    def metrics(self) -> Metrics: ...

    @property
    def dispatcher(self) -> Dispatcher: ...

    @property
    def jobs(self) -> JobManager: ...

    @property
    def verifier(self) -> Verifier: ...

    #: What asked for a restart in progress (``restart``, ``restart_service``), if any.
    restart_requested: str | None

    def listeners_up(self) -> dict[str, bool]:
        """Whether each listener accepts connections (``GET /ready``)."""
        ...

    def health(self) -> dict[str, Any]:
        """``GET /health``: status, uptime, storage, listeners and peers."""
        ...

    def metrics_report(self) -> tuple[bytes, str]:
        """``GET /metrics``: the rendered metrics and their content type."""
        ...
