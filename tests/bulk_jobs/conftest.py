"""A local HTTP server of CSV bodies and two replicating nodes, per test module."""

from __future__ import annotations

import http.server
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import ADMIN, InProcessNode, wait_for

READER = {"super_user": False,
          "dev": {"tables": {"breed": {"read": True, "insert": False, "update": False,
                                       "delete": False, "attribute_permissions": []}}}}


class _CsvHandler(http.server.BaseHTTPRequestHandler):
    """Serves ``bodies``; a path starting ``/stall`` sends its body, then hangs until
    the server stops or the body is removed (a download that never ends); a path
    holding ``latin1`` is declared ISO-8859-1."""

    bodies: dict[str, bytes] = {}
    release = threading.Event()

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        path = self.path.split("?")[0]
        body = self.bodies.get(path)
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        charset = "; charset=ISO-8859-1" if "latin1" in path else ""
        self.send_header("Content-Type", f"text/csv{charset}")
        if not path.startswith("/stall"):
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        self.wfile.flush()
        if path.startswith("/stall"):
            deadline = time.monotonic() + 60
            while path in self.bodies and not self.release.wait(0.05) \
                    and time.monotonic() < deadline:
                pass

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def csv_server() -> Iterator[tuple[str, dict[str, bytes]]]:
    """A local HTTP server on 127.0.0.1 (port chosen by the OS) serving CSV bodies."""
    bodies: dict[str, bytes] = {}
    release = threading.Event()
    handler = type("Handler", (_CsvHandler,), {"bodies": bodies, "release": release})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", bodies
    release.set()
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, Any]]:
    """A and B replicating, ``dev.breed`` on both, and a read-only user bob."""
    root: Path = tmp_path_factory.mktemp("bulk")
    a = InProcessNode("bulk-a", root / "a").start()
    b = InProcessNode("bulk-b", root / "b").start()
    try:
        a.call("add_node", hostname=b.name, url=b.repl_url, verify_tls=False,
               authorization={"username": ADMIN[0], "password": ADMIN[1]})
        a.call("create_table", database="dev", table="breed", primary_key="id")
        a.call("add_role", role="reader", permission=READER)
        a.call("add_user", role="reader", username="bob", password="bobpw", active=True)
        wait_for(lambda: b.post({"operation": "describe_table", "database": "dev",
                                 "table": "breed"}).status_code == 200, timeout=20,
                 message="dev.breed on B")
        yield a, b
    finally:
        b.close()
        a.close()
