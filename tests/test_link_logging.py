"""What a link logs when the network fails under it: one concise line, no traceback."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from tests.helpers import wait_for
from tests.proxy_util import TcpProxy
from tests.repl_util import CREDS, by_id


def _link_state(node: Any, peer: str, database: str = "data") -> str | None:
    for conn in node.call("cluster_status")["connections"]:
        if conn["name"] == peer:
            for sock in conn["database_sockets"]:
                if sock["database"] == database:
                    return str(sock.get("state"))
    return None


@pytest.mark.timeout(120)
def test_a_peer_that_stops_answering_is_one_warning_line_per_link_without_a_traceback(
        node_factory: Any, caplog: pytest.LogCaptureFixture) -> None:
    """node-b reaches node-a through a proxy that stalls (nothing forwarded, the sockets
    left open, as in a partition): node-b's keepalive pings go unanswered and its links
    drop. Each drop is one WARNING naming the peer and the reason; the redials that fail
    while the peer stays silent add nothing above DEBUG, and nothing logs a traceback."""
    a = node_factory("node-a")
    b = node_factory("node-b")
    a.call("create_table", table="t1", primary_key="id")
    to_a = TcpProxy(a.repl_port)
    try:
        b.call("add_node", hostname=a.name, url=to_a.url, verify_tls=False,
               authorization=CREDS)
        a.call("insert", table="t1", records=[{"id": 1}])
        wait_for(lambda: by_id(b, "t1", 1) is not None, timeout=30, message="row 1 on node-b")
        wait_for(lambda: _link_state(b, a.name, "system") == "streaming"
                 and _link_state(b, a.name, "data") == "streaming", timeout=30,
                 message="node-b's links streaming")
        caplog.clear()
        caplog.set_level(logging.DEBUG)
        to_a.stall()
        wait_for(lambda: _link_state(b, a.name, "system") == "connecting"
                 and _link_state(b, a.name, "data") == "connecting", timeout=30,
                 message="node-b to notice node-a stopped answering")
        # Redials through the stalled proxy fail (the TLS handshake gets no answer): wait
        # for one, so the test sees that failures while the peer is silent stay quiet.
        wait_for(lambda: any(r.levelno == logging.DEBUG and r.getMessage().startswith(
                     f"link {a.name}/") and "keepalive" not in r.getMessage()
                     for r in caplog.records), timeout=60, message="a redial to fail")
        warned = [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert not [r for r in caplog.records if r.exc_info], \
            [(r.name, r.getMessage()) for r in caplog.records if r.exc_info]
        drops = sorted(r.getMessage() for r in warned
                       if r.name.startswith("harpsync") and "dropped" in r.getMessage())
        assert len(drops) == 2, [r.getMessage() for r in warned]
        for database, line in zip(("data", "system"), drops, strict=True):
            assert line.startswith(f"link {a.name}/{database} dropped: "), line
            assert "keepalive ping timeout" in line and "\n" not in line, line
        assert all(r in warned for r in caplog.records if r.levelno >= logging.WARNING)
        assert len(warned) == 2, [(r.name, r.getMessage()) for r in warned]
    finally:
        to_a.close()
