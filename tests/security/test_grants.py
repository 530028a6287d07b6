"""What a peer may read: a node holding its own valid certificate, asking a publisher
by hand for more than the publisher's row for it grants (every table, every origin,
another database), gets only what that row publishes."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from harpsync import codec
from harpsync.replication.events import CaughtUp, CopyRows, EntriesReceived
from harpsync.replication.subscriber_session import SubscriberSession
from tests.helpers import wait_for
from tests.repl_util import by_id, join
from tests.security.attacker import SUBPROTOCOL, client_context

T1_ONLY = [{"database": "data", "table": "t1", "subscribe": True, "publish": True}]


def _greedy_read(url: str, keys: Path, node: str, database: str,
                 write: Any = None) -> tuple[set[str], set[str], str]:
    """Dial ``url``/``database`` as ``node`` (its own certificate), subscribe to every
    table and origin with a full copy, and return the tables of the rows copied, the
    tables of the data ops streamed, and how it ended. ``write`` runs once the copy
    caught up (a later write to stream)."""

    async def run() -> tuple[set[str], set[str], str]:
        session = SubscriberSession(node, database, {}, {})
        copied: set[str] = set()
        streamed: set[str] = set()
        try:
            async with connect(f"{url}/{database}", ssl=client_context(keys),
                               subprotocols=[SUBPROTOCOL],  # type: ignore[list-item]
                               open_timeout=10, close_timeout=2, proxy=None,
                               max_size=2**26) as ws:
                session.start()
                for frame in session.data_to_send():
                    await ws.send(frame)
                caught_up = 0
                subscribed = False
                while caught_up < (2 if write is not None else 1):
                    session.receive(await asyncio.wait_for(ws.recv(), 20))
                    for event in session.events_received():
                        if isinstance(event, CopyRows):
                            copied.add(event.table.rstrip("\x00"))
                        elif isinstance(event, EntriesReceived):
                            for _seq, raw in event.entries:
                                ops = codec.unpack(raw)[3]
                                streamed.update(op[0] for op in ops
                                                if op[1] not in ("create_table",
                                                                 "drop_table",
                                                                 "set_attribute"))
                        elif isinstance(event, CaughtUp):
                            caught_up += 1
                            if caught_up == 1 and write is not None:
                                await asyncio.to_thread(write)
                    if not subscribed and session.peer is not None:
                        session.subscribe(0, None, None, copy=True)
                        subscribed = True
                    for frame in session.data_to_send():
                        await ws.send(frame)
                return copied, streamed, "streamed"
        except ConnectionClosed as exc:
            return copied, streamed, f"closed {exc.rcvd.code if exc.rcvd else None}"
        except TimeoutError:
            return copied, streamed, "quiet"

    return asyncio.run(run())


@pytest.mark.timeout(120)
def test_a_peer_asking_for_everything_gets_only_what_its_row_publishes(node_factory):
    """a publishes only data.t1 to b. A socket with b's certificate that asks a for all
    tables and origins of data, with a full copy, gets rows of t1 only, copied and
    streamed; one asking for d2 (not published to b) gets no row of it."""
    a, b, c = (node_factory(f"node-{x}") for x in "abc")
    for table in ("t1", "t2"):
        a.call("create_table", table=table, primary_key="id")
    a.call("create_database", database="d2")
    a.call("create_table", database="d2", table="t", primary_key="id")
    join(c, a)
    join(b, a, subscriptions=T1_ONLY)
    c.call("insert", table="t2", records=[{"id": 1, "v": "c's"}])  # another origin
    a.call("insert", table="t1", records=[{"id": 1}])
    a.call("insert", table="t2", records=[{"id": 2}])
    a.call("insert", database="d2", table="t", records=[{"id": 1}])
    wait_for(lambda: by_id(a, "t2", 1) is not None and by_id(b, "t1", 1) is not None,
             timeout=20, message="rows in place")
    keys = b.root / "keys"

    def later() -> None:
        a.call("insert", table="t2", records=[{"id": 3}])
        a.call("insert", table="t1", records=[{"id": 3}])

    copied, streamed, how = _greedy_read(a.repl_url, keys, b.name, "data", later)
    assert copied <= {"t1"} and streamed <= {"t1"}, (copied, streamed, how)
    assert "t1" in copied | streamed, (copied, streamed, how)

    copied, streamed, how = _greedy_read(a.repl_url, keys, b.name, "d2")
    assert not copied and not streamed, (copied, streamed, how)


@pytest.mark.timeout(120)
def test_a_peer_asking_for_a_local_database_gets_none_of_it(node_factory):
    """a replicates only ``data`` (``replication.databases``); ``secret`` is local. A
    socket with b's certificate (a full peer) asking a for ``secret`` gets no row."""
    a = node_factory("node-a", env={"REPLICATION_DATABASES": "data"})
    b = node_factory("node-b")
    a.call("create_table", table="t1", primary_key="id")
    a.call("create_database", database="secret")
    a.call("create_table", database="secret", table="s", primary_key="id")
    a.call("insert", database="secret", table="s", records=[{"id": 1, "v": "local"}])
    join(b, a)
    a.call("insert", table="t1", records=[{"id": 1}])
    wait_for(lambda: by_id(b, "t1", 1) is not None, timeout=20, message="data flowing")

    copied, streamed, how = _greedy_read(a.repl_url, b.root / "keys", b.name, "data")
    assert "t1" in copied, (copied, streamed, how)
    copied, streamed, how = _greedy_read(a.repl_url, b.root / "keys", b.name, "secret")
    assert not copied and not streamed, (copied, streamed, how)
    assert by_id(b, "s", 1, database="secret") is None
