"""Conflict policies for replicated writes, and the conflicts table.

A policy belongs to a subscription (a peer and a table, or the peer, or the node's
``replication.conflict`` default) and decides what happens when a change from that
peer meets a stored record written by another node:

- ``last_writer_wins``: the higher ``(version, origin name)`` is kept (every node ends
  up the same);
- ``source_wins``: the peer's change is applied even if older;
- ``dest_wins``: the peer's change never overwrites a record last written on this
  node; when last-writer-wins would have applied it, it goes to the dead letters;
- ``manual_review``: when the peer's change would overwrite a record last written on
  this node, or lose to it, nothing changes and both versions go to
  ``system.hdb_conflicts`` for an operator to resolve.

A delete of a record deleted here too is no conflict under any policy (nothing is kept
or lost): last-writer-wins picks the tombstone, so the nodes' tombstones agree.

Changes of one origin never conflict with each other: its own log is in version order,
so between two of its versions last-writer-wins always decides (a replay of older
entries cannot roll a record back, whatever the policy).

A resolution (``resolve_job``) is logged with the versions its operator saw
(``RESOLVES``): the conflict's two and the record's stored one. A node receiving it
where its own stored record is one of them applies it by last-writer-wins, whatever
its policy, and drops its own conflicts on that record whose local version the
operator saw (the same conflict seen from the other side): a choice made on one node
then converges everywhere. A record written here that the operator did not see still
meets the resolution as a conflict.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from harpsync import codec
from harpsync.errors import BadRequestError, NotFoundError
from harpsync.storage.database import LOCAL_ORIGIN, Database, Table
from harpsync.storage.errors import NoSuchDatabaseError, NoSuchTableError
from harpsync.storage.hlc import version_to_ms
from harpsync.storage.keys import decode_id, encode_id
from harpsync.storage.records import (
    Stored,
    get_stored,
    put_record,
    put_tombstone,
    remove_record,
    wins,
)
from harpsync.storage.store import SYSTEM, Storage
from harpsync.storage.writer import WriteContext
from harpsync.storage.writes import note_attributes

# The same names as ``harpsync.config.CONFLICT_POLICIES`` (storage never imports config).
POLICIES = ("last_writer_wins", "source_wins", "dest_wins", "manual_review")
LWW, SOURCE_WINS, DEST_WINS, MANUAL_REVIEW = POLICIES
CONFLICTS = "hdb_conflicts"
APPLY, SKIP, REFUSE, CONFLICT = "apply", "skip", "refuse", "conflict"

# (origin name, table) -> policy name
PolicyLookup = Callable[[str, str], str]
# Where a resolution's op (``[table, kind, id, value, incarnation, None, extra]``) keeps
# the versions its operator saw, under ``extra[RESOLVES]``.
EXTRA, RESOLVES = 6, "resolves"


def resolved_versions(op: list[Any]) -> frozenset[int]:
    """The versions a resolution op settles (empty for any other op)."""
    extra = op[EXTRA] if len(op) > EXTRA else None
    seen = extra.get(RESOLVES) if isinstance(extra, dict) else None
    if not isinstance(seen, list):
        return frozenset()
    return frozenset(v for v in seen if isinstance(v, int))


def decide(policy: str, stored: Stored | None, stored_origin: str, version: int,
           origin: str, deleting: bool = False) -> str:
    """What to do with a remote write of ``(version, origin)`` over ``stored``
    (``deleting``: the write is a delete).

    A delete meeting a record already deleted here is decided by last-writer-wins under
    every policy: there is no record to keep or lose, only the two tombstones' versions
    to agree on.

    Returns:
        ``APPLY``, ``SKIP`` (it loses, as under last-writer-wins), ``REFUSE``
        (``dest_wins`` kept a local record the write would have replaced) or
        ``CONFLICT`` (``manual_review``: the write meets a local record).
    """
    if stored is None:
        return APPLY
    lww = APPLY if wins(version, origin, stored[0], stored_origin) else SKIP
    if policy == LWW or stored_origin == origin or (deleting and stored[2] is None):
        return lww
    if policy == SOURCE_WINS:
        return APPLY
    if stored[1] != LOCAL_ORIGIN:
        return lww
    if policy == DEST_WINS:
        return REFUSE if lww == APPLY else SKIP
    return CONFLICT


def entry_id(*parts: Any) -> str:
    """A deterministic id: recording the same event twice (a batch applied again after
    a crash) updates one row instead of adding another."""
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:24]


def iso_ms(ms: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms / 1000)) + \
        f".{int(ms % 1000):03d}Z"


def system_put(ctx: WriteContext, storage: Storage, table_name: str,
               row: dict[str, Any]) -> None:
    """Store a row of a local-only system table (not logged: it never replicates)."""
    system = storage.databases[SYSTEM]
    table = system.tables[table_name]
    version = storage.hlc.now()
    put_record(ctx.txn(system), table, encode_id(row["id"]), version, LOCAL_ORIGIN, row)
    ctx.system_ops.append(["put", table_name, row["id"], version, row])


def system_delete(ctx: WriteContext, storage: Storage, table_name: str, ids: list[str]) -> int:
    """Delete rows of a local-only system table outright (no tombstone: not logged)."""
    system = storage.databases[SYSTEM]
    table = system.tables[table_name]
    txn = ctx.txn(system)
    ctx.system_ops.extend(["delete", table_name, rid] for rid in ids)
    return sum(1 for rid in ids if remove_record(txn, table, encode_id(rid)))


def settle_conflicts(ctx: WriteContext, storage: Storage, database: str, table: str,
                     rid: Any, local_versions: frozenset[int]) -> int:
    """Remove this node's conflicts on one record whose local version is among
    ``local_versions`` (a resolution that saw them landed here); the number removed."""
    system = storage.databases.get(SYSTEM)
    if system is None or CONFLICTS not in system.tables or not local_versions:
        return 0
    txn = ctx.txn(system)
    gone = []
    for _key, raw in txn.cursor(db=system.tables[CONFLICTS].dbi):
        row = codec.unpack(raw)[2]
        if isinstance(row, dict) and row.get("database") == database \
                and row.get("table") == table and row.get("record_id") == rid \
                and (row.get("local") or {}).get("version") in local_versions:
            gone.append(str(row["id"]))
    return system_delete(ctx, storage, CONFLICTS, gone) if gone else 0


def _version(stored: Stored, db: Database) -> dict[str, Any]:
    return {"version": stored[0], "time": iso_ms(version_to_ms(stored[0])),
            "node": db.origin_names.get(stored[1], ""), "record": stored[2]}


@dataclass
class Review:
    """Applies the policies for one apply job and counts what they did."""

    storage: Storage
    peer: str
    policy_for: PolicyLookup
    refuse: Callable[[WriteContext, Database, list[Any], int, str, str], None]
    conflicts: int = 0
    refused: int = 0
    touched: list[str] = field(default_factory=list)
    # A change of an origin at or below the newest version received from it (a replay,
    # a re-copy) was reviewed when it first arrived: it is not held or refused again.
    # Off when reprocessing a dead letter, which was received and is decided anew.
    skip_seen: bool = True

    def admit(self, ctx: WriteContext, db: Database, table: Table, op: list[Any],
              stored: Stored | None, version: int, origin: str) -> bool:
        """Whether the remote ``op`` may be written over ``stored``; records a conflict
        or a refusal (dead letter) when its policy keeps it out."""
        stored_origin = db.origin_names.get(stored[1], "") if stored is not None else ""
        settles = resolved_versions(op)
        if stored is not None and stored[1] == LOCAL_ORIGIN and stored[0] in settles:
            # A resolution made by an operator who saw the record stored here.
            if not wins(version, origin, stored[0], stored_origin):
                return False
            settle_conflicts(ctx, self.storage, db.name, table.name, op[2], settles)
            return True
        verdict = decide(self.policy_for(origin, table.name), stored, stored_origin,
                         version, origin, op[1] == "delete" or op[3] is None)
        if verdict == APPLY:
            return True
        if self.skip_seen and version <= db.origin_hw.get(origin, 0):
            return False  # reviewed when it first arrived (replayed or copied again)
        if verdict == REFUSE:
            self.refused += 1
            self.refuse(ctx, db, op, version, origin,
                        f"refused by the dest_wins policy: the record was last written on "
                        f"this node at {iso_ms(version_to_ms(stored[0]))}"  # type: ignore[index]
                        )
        elif verdict == CONFLICT:
            assert stored is not None
            self.conflicts += 1
            rid = op[2]
            row = {"id": entry_id(db.name, table.name, rid, origin, version, stored[0]),
                   "database": db.name, "table": table.name, "record_id": rid,
                   "incarnation": table.version,
                   "node": origin, "peer": self.peer, "time": iso_ms(time.time() * 1000),
                   "local": _version(stored, db),
                   "remote": {"version": version, "time": iso_ms(version_to_ms(version)),
                              "node": origin, "operation": op[1],
                              "record": None if op[1] == "delete" else op[3]}}
            system_put(ctx, self.storage, CONFLICTS, row)
        return False


def resolve_job(storage: Storage, conflict: dict[str, Any], keep: str | None,
                record: dict[str, Any] | None, user: str | None,
                ) -> Callable[[WriteContext], dict[str, Any]]:
    """A job writing the chosen version as a normal local write (logged, so it
    replicates and beats both versions everywhere), then removing the conflict.

    A conflict whose table was dropped since (or dropped and created anew) is removed
    with nothing written; the job answers ``discarded``.

    Raises:
        NotFoundError: the conflict is gone (resolved meanwhile).
    """
    db_name, table_name = conflict["database"], conflict["table"]
    rid = conflict["record_id"]

    def job(ctx: WriteContext) -> dict[str, Any]:
        system = storage.databases[SYSTEM]
        if get_stored(ctx.txn(system), system.tables[CONFLICTS],
                      encode_id(conflict["id"])) is None:
            # Resolved meanwhile (another request, or a peer's resolution landed).
            raise NotFoundError(f"conflict '{conflict['id']}' does not exist")
        try:
            db, table = storage.table(db_name, table_name)
        except (NoSuchDatabaseError, NoSuchTableError):
            table = None
        incarnation = conflict.get("incarnation")
        if table is None or (isinstance(incarnation, int) and incarnation != table.version):
            # The table it was recorded in was dropped (and maybe created anew): there is
            # nothing left to choose between, and writing the old record would bring it
            # back in a table that never held it.
            system_delete(ctx, storage, CONFLICTS, [conflict["id"]])
            return {"record": None, "version": None, "discarded": True}
        txn = ctx.txn(db)
        key = encode_id(rid)
        stored = get_stored(txn, table, key)
        seen = {int(conflict["local"]["version"]), int(conflict["remote"]["version"])}
        if stored is not None:
            seen.add(stored[0])
        newest = max(seen)
        version = storage.hlc.now_after(newest)
        if record is not None:
            # The record replaces the stored one, but it was created when it was: keep
            # the creation time of a version that held it (every record carries one).
            created = [v.get("__createdtime__") for v in (
                stored[2] if stored is not None else None, conflict["local"]["record"],
                conflict["remote"]["record"]) if isinstance(v, dict)]
            chosen: dict[str, Any] | None = {
                **record, "__createdtime__": next((c for c in created if c is not None),
                                                  version_to_ms(version))}
        else:
            chosen = conflict["local" if keep == "local" else "remote"]["record"]
        if chosen is None:
            put_tombstone(txn, table, key, version, LOCAL_ORIGIN)
            op = [table_name, "delete", rid, None, table.version]
        else:
            chosen = {**chosen, table.primary_key: decode_id(key)}
            chosen["__updatedtime__"] = version_to_ms(version)
            try:
                put_record(txn, table, key, version, LOCAL_ORIGIN, chosen)
            except (OverflowError, ValueError) as exc:
                # msgpack holds integers of at most 64 bits and bounded nesting.
                raise BadRequestError(f"'record' holds a value that cannot be stored: "
                                      f"{exc}") from None
            # Peers learn attributes from the logged record: so does this node.
            note_attributes(ctx, db, table, [chosen], version)
            op = [table_name, "upsert", rid, chosen, table.version]
        # What the operator saw: a peer holding one of these applies the choice.
        op += [None, {RESOLVES: sorted(seen)}]
        storage.append_log(ctx, db, [op], version, LOCAL_ORIGIN, user)
        system_delete(ctx, storage, CONFLICTS, [conflict["id"]])
        return {"record": chosen, "version": version}

    return job
