"""Issue 8, point 8: secrets stay secret (file modes, retained credentials, logs)."""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

import pytest

from tests.repl_util import PASSWORD, hdb_nodes, join


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def open_umask():
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def test_data_and_key_files_are_private_whatever_the_umask(node_factory, open_umask):
    """With umask 0: the root and database directories are 0700, LMDB files and
    private keys 0600, also for a database created later."""
    a = node_factory("node-a")
    a.call("create_database", database="shop")
    root = a.root
    assert _mode(root) == 0o700
    assert _mode(root / "database") == 0o700
    assert _mode(root / "keys") == 0o700
    for name in ("system", "data", "shop"):
        db = root / "database" / name
        if not db.exists():
            continue
        assert _mode(db) == 0o700, name
        for file in ("data.mdb", "lock.mdb"):
            assert _mode(db / file) == 0o600, (name, file)
    for key in (root / "keys").rglob("*.key"):
        assert _mode(key) == 0o600, key
    assert _mode(root / "database" / "shop") == 0o700


def test_retained_authorization_is_not_stored_or_logged(node_factory, caplog):
    """``retain_authorization`` keeps no password: not in hdb_nodes, not in any file
    under the node's root, not in a log line."""
    caplog.set_level(logging.DEBUG)
    a = node_factory("node-a")
    b = node_factory("node-b")
    join(a, b, retain_authorization=True)
    assert all("authorization" not in row or row["authorization"] is None
               for row in hdb_nodes(a))
    for file in a.root.rglob("*"):
        if file.is_file():
            assert PASSWORD.encode() not in file.read_bytes(), file
    assert PASSWORD not in caplog.text and "scrypt$" not in caplog.text


def test_transaction_log_of_users_holds_no_password_hashes(node_factory):
    """``read_transaction_log`` of ``system.hdb_user`` shows the users' changes without
    their password hashes, as every other read of that table."""
    a = node_factory("node-a")
    a.call("add_user", username="bob", password="pw-bob-123", role="super_user")
    a.call("alter_user", username="bob", password="pw-bob-456")
    log = a.call("read_transaction_log", database="system", table="hdb_user")
    records = [r for entry in log for r in entry["records"]]
    assert {r["username"] for r in records} >= {"admin", "bob"}
    assert all("password" not in r for r in records)
    assert "scrypt$" not in str(log)


def test_key_files_are_synced_before_their_rename_and_the_directory_after(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A key or certificate written by the node is fsynced before it replaces the old
    one, and its directory after: a power loss never leaves an empty node key."""
    from harpsync.security.files import write_file

    path = tmp_path / "node.key"
    path.write_bytes(b"old")
    synced: list[tuple[bool, bytes]] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append((stat.S_ISDIR(os.fstat(fd).st_mode), path.read_bytes()))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    write_file(path, b"new", 0o600)
    assert path.read_bytes() == b"new"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert synced == [(False, b"old"), (True, b"new")]
