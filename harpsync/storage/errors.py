"""The storage layer's own errors: names the catalog does not hold, and a database
that cannot open another table.

Storage raises these in its own terms and picks no HTTP status; they derive from
``harpsync.errors.MissingError`` (404), and the operations that Harper answers with 400
(writes, loads, conflict resolution) say so at their edge with
``harpsync.errors.missing_is_bad_request``.
"""

from __future__ import annotations

from harpsync.errors import BadRequestError, MissingError


class NoSuchDatabaseError(MissingError):
    """The database does not exist (or was dropped while it was being read)."""

    def __init__(self, database: str) -> None:
        super().__init__(f"database '{database}' does not exist")
        self.database = database


class NoSuchTableError(MissingError):
    """The table does not exist in its database."""

    def __init__(self, database: str, table: str) -> None:
        super().__init__(f"Table '{database}.{table}' does not exist")
        self.database = database
        self.table = table


class NoSuchAttributeError(MissingError):
    """A table has no attribute of that name."""

    def __init__(self, attribute: str) -> None:
        super().__init__(f"attribute '{attribute}' does not exist")
        self.attribute = attribute


class TooManyTablesError(BadRequestError):
    """A database's environment has no room for another table's sub-databases."""

    def __init__(self, database: str, limit: int) -> None:
        super().__init__(
            f"database '{database}' cannot hold another table: it has opened the most "
            f"tables it can ({limit}, counting tables dropped since the node started); "
            "use another database, or drop tables and restart the node")
        self.database = database
