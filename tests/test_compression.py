"""Per-link zstd compression (issue 9): negotiated in the hello, used when it pays,
reported in cluster_status and /metrics; a bomb or a frame nobody agreed to fails."""

from __future__ import annotations

import random
from typing import Any

import pytest
import zstandard

from harpsync.compression import MAX_OUTPUT, CompressionError, FrameCompressor
from harpsync.replication.messages import TAG_ZSTD
from harpsync.replication.protocol import (
    EntriesReceived,
    ProtocolFailed,
    PublisherSession,
    SubscriberSession,
)
from tests.helpers import ADMIN, wait_for
from tests.lifecycle_util import db_socket
from tests.repl_util import has_table, join, wait_linked

TABLES: dict[str, Any] = {"dog": {"primary_key": "id"}}
ENTRIES = [(seq, 1, (b"penny the dog " * 40) + str(seq).encode()) for seq in range(1, 40)]


def _pair(offer: bool, allow: bool) -> tuple[SubscriberSession, PublisherSession]:
    sub = SubscriberSession("node-b", "data", TABLES, {1: "node-b"}, compression=offer)
    pub = PublisherSession("node-a")
    sub.start()
    for frame in sub.data_to_send():
        pub.receive(frame)
    pub.accept("data", TABLES, {1: "node-a"}, compression=allow)
    for frame in pub.data_to_send():
        sub.receive(frame)
    sub.subscribe(0, {"node-a": None}, None)
    for frame in sub.data_to_send():
        pub.receive(frame)
    sub.events_received()
    pub.events_received()
    return sub, pub


def _deliver(pub: PublisherSession, sub: SubscriberSession) -> list[bytes]:
    frames = pub.data_to_send()
    for frame in frames:
        sub.receive(frame)
    return frames


def test_both_sides_agree_and_batches_shrink() -> None:
    """When both offer zstd, big batches go compressed and arrive unchanged."""
    sub, pub = _pair(offer=True, allow=True)
    assert sub.compression == pub.compression == "zstd"
    pub.send_entries(39, ENTRIES, {1: "node-a"})
    frames = _deliver(pub, sub)
    assert any(f[:1] == TAG_ZSTD for f in frames)
    got = [e for ev in sub.events_received() if isinstance(ev, EntriesReceived)
           for e in ev.entries]
    assert got == [(seq, value) for seq, _, value in ENTRIES]
    assert sub.compression_ratio is not None and sub.compression_ratio < 0.5


@pytest.mark.parametrize(("offer", "allow"), [(False, True), (True, False)])
def test_no_compression_unless_both_sides_want_it(offer: bool, allow: bool) -> None:
    """A side that does not offer (or allow) zstd gets plain frames."""
    sub, pub = _pair(offer=offer, allow=allow)
    assert sub.compression is None and pub.compression is None
    pub.send_entries(39, ENTRIES, {1: "node-a"})
    assert all(f[:1] != TAG_ZSTD for f in _deliver(pub, sub))


def test_small_batches_stay_plain() -> None:
    """A single small write is not worth compressing: it goes as it is."""
    sub, pub = _pair(offer=True, allow=True)
    pub.send_entries(1, [(1, 1, b"x" * 40)], {1: "node-a"})
    assert all(f[:1] != TAG_ZSTD for f in _deliver(pub, sub))


def test_a_compressed_frame_without_agreement_fails_the_session() -> None:
    """A peer that sends zstd frames nobody negotiated is a protocol error."""
    sub, _ = _pair(offer=False, allow=False)
    sub.receive(TAG_ZSTD + zstandard.ZstdCompressor().compress(b"D" + b"\0" * 8))
    assert any(isinstance(e, ProtocolFailed) for e in sub.events_received())


def test_a_decompression_bomb_is_refused() -> None:
    """A frame that claims to inflate past the limit is refused before inflating."""
    bomb = zstandard.ZstdCompressor().compress(b"\0" * (MAX_OUTPUT + 1))
    with pytest.raises(CompressionError, match="limit"):
        FrameCompressor().inflate(bomb)


@pytest.mark.timeout(120)
def test_links_sending_the_same_frame_share_one_compression() -> None:
    """Each peer's link gets the same frame after a commit: the second link takes the
    first one's compressed bytes, and a frame of the same size with other bytes is
    compressed on its own."""
    frame = b"D" + b"".join(b"penny the dog %d " % i for i in range(400))
    other = frame[:-1] + b"?"
    first, second = FrameCompressor(), FrameCompressor()
    packed = first.shrink(frame)
    assert packed is not None and second.shrink(frame) is packed
    changed = second.shrink(other)
    assert changed is not None and changed != packed
    assert first.inflate(changed) == other and second.inflate(packed) == frame
    noise = random.Random(3).randbytes(4096)  # does not pay: None, from the cache too
    assert first.shrink(noise) is None and second.shrink(noise) is None


def test_links_report_compression_in_status_and_metrics(node_factory):
    """Nodes set to zstd negotiate it (on loopback too); a node set to none does not."""
    zstd = {"REPLICATION_COMPRESSION": "zstd"}
    a = node_factory("node-a", env=zstd)
    b = node_factory("node-b", env=zstd)
    c = node_factory("node-c", env={"REPLICATION_COMPRESSION": "none"})
    a.call("create_table", table="t", primary_key="id")
    join(a, b)
    join(a, c)
    wait_linked([(b, a), (c, a)], ("system", "data"))
    for node in (b, c):
        wait_for(lambda n=node: has_table(n, "t"), timeout=20, message="table t")
    a.call("insert", table="t", records=[{"id": i, "text": "compress me " * 20}
                                         for i in range(200)])
    for node in (b, c):
        wait_for(lambda n=node: n.count("t") == 200, timeout=20, message="200 records")
    on_b = db_socket(b.call("cluster_status"), "node-a", "data")
    on_c = db_socket(c.call("cluster_status"), "node-a", "data")
    assert on_b is not None and on_c is not None
    assert on_b["compression"] == "zstd"
    assert 0 < on_b["compression_ratio"] < 0.5
    assert on_c.get("compression") is None
    metrics = b.client.get(b.url.rstrip("/") + "/metrics", auth=ADMIN).text
    assert "harpsync_replication_compression_ratio" in metrics


@pytest.mark.timeout(60)
def test_auto_leaves_links_on_this_host_uncompressed(node_factory):
    """The default (auto) does not compress to a peer on a loopback address."""
    a = node_factory("node-a")
    b = node_factory("node-b")
    join(a, b)
    wait_linked([(b, a)], ("system",))
    sock = db_socket(b.call("cluster_status"), "node-a", "system")
    assert sock is not None and sock.get("compression") is None


def test_loopback_urls_are_recognised() -> None:
    """localhost and 127.0.0.0/8 or ::1 are this host; other names and addresses not."""
    from harpsync.replication.replicator import is_loopback

    assert is_loopback("wss://127.0.0.1:9933") and is_loopback("wss://127.8.0.1:1")
    assert is_loopback("wss://localhost:9933") and is_loopback("wss://[::1]:9933")
    assert not is_loopback("wss://10.0.0.5:9933") and not is_loopback("wss://node-b:9933")
