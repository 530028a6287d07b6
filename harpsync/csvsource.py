"""CSV sources for bulk loads: text, a file on the node, or a URL (the only httpx user
on the node side), read as a stream in batches of records.

Nothing is read whole: a file or a download is parsed as it arrives, ``batch_size``
rows at a time, so memory stays flat whatever the size. Values are typed as Harper's
loader types them: an empty cell is null, ``true``/``false`` are booleans, numbers are
numbers (but text with a leading zero, such as a zip code, stays text), and a cell
holding a JSON array or object is parsed.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlsplit

import httpx

from harpsync import jsonio
from harpsync.errors import BadRequestError
from harpsync.validation import check_attribute_names

_NUMBER = re.compile(r"-?(0|[1-9]\d*)(\.\d+)?([eE][-+]?\d+)?")
_INT64 = 1 << 63
URL_TIMEOUT = 30.0
# The csv module refuses a field over 128 KiB by default, but a record value may be far
# larger (insert takes one up to the request body limit, 10 MiB by default). Still
# bounded, so an unclosed quote in a large file cannot grow one field without limit.
MAX_FIELD = 64 << 20
csv.field_size_limit(max(csv.field_size_limit(), MAX_FIELD))


def convert(cell: str) -> Any:
    """One CSV cell as a JSON value."""
    if cell == "":
        return None
    if cell in ("true", "TRUE", "True"):
        return True
    if cell in ("false", "FALSE", "False"):
        return False
    if _NUMBER.fullmatch(cell):
        if "." not in cell and "e" not in cell and "E" not in cell:
            number = int(cell)
            return number if -_INT64 <= number < _INT64 else cell
        value = float(cell)
        return value if value not in (float("inf"), float("-inf")) else cell
    if cell[0] in "[{":
        try:
            value = _JSON_CELL.decode(cell)
        except (ValueError, RecursionError):  # not JSON, or nested past the parser
            return cell
        # Bounded as a request body is: a value nested ~1000 deep can be parsed here
        # but not answered (see jsonio.MAX_DEPTH).
        return cell if jsonio.nested_deeper_than(value, jsonio.MAX_DEPTH) else value
    return cell


def _not_json(text: str) -> Any:
    # Python's json reads NaN, Infinity and 1e400 (as inf); none is JSON, and a stored
    # non-finite number would read back as invalid JSON: such a cell stays text.
    raise ValueError(f"{text} is not a JSON value")


def _finite(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"{text} is out of range")
    return value


_JSON_CELL = json.JSONDecoder(parse_constant=_not_json, parse_float=_finite)


class CsvBatches:
    """Records from a CSV text stream whose first row names the attributes."""

    def __init__(self, text: TextIO, batch_size: int, closer: Any = None) -> None:
        self.text = text
        self.batch_size = batch_size
        self._closer = closer
        self.reader = csv.reader(text)
        self.rows = 0
        self.header = self._header()

    def _next_row(self) -> list[str] | None:
        try:
            while True:
                row = next(self.reader)
                if row and any(cell != "" for cell in row):
                    return row
        except StopIteration:
            return None
        except csv.Error as exc:
            raise BadRequestError(f"CSV error at line {self.reader.line_num}: {exc}") from None
        except UnicodeDecodeError:
            raise BadRequestError(f"CSV is not UTF-8 text (near line "
                                  f"{self.reader.line_num + 1})") from None

    def _header(self) -> list[str]:
        header = self._next_row()
        if header is None:
            raise BadRequestError("CSV has no header row")
        header = [name.strip() for name in header]
        if any(name == "" for name in header):
            raise BadRequestError("CSV header has an empty column name")
        if len(set(header)) != len(header):
            raise BadRequestError("CSV header names a column twice")
        check_attribute_names(header, "CSV header")
        return header

    def next_batch(self) -> list[dict[str, Any]]:
        """Up to ``batch_size`` records; empty at the end."""
        batch: list[dict[str, Any]] = []
        header = self.header
        while len(batch) < self.batch_size:
            row = self._next_row()
            if row is None:
                break
            self.rows += 1
            if len(row) > len(header):
                raise BadRequestError(f"CSV line {self.reader.line_num} has {len(row)} "
                                      f"fields; the header has {len(header)}")
            batch.append({name: convert(cell) for name, cell in zip(header, row,
                                                                      strict=False)})
        return batch

    def close(self) -> None:
        self.text.close()
        if self._closer is not None:
            self._closer()


def count_rows(text: TextIO) -> int:
    """Data rows (non-empty, after the header) in a CSV stream; closes it."""
    reader = csv.reader(text)
    with text:
        try:
            rows = sum(1 for row in reader if row and any(c != "" for c in row))
        except csv.Error as exc:
            raise BadRequestError(f"CSV error at line {reader.line_num}: {exc}") from None
    return max(0, rows - 1)


def from_text(data: str, batch_size: int) -> CsvBatches:
    return CsvBatches(io.StringIO(data, newline=""), batch_size)


def check_file(path: str) -> Path:
    """The readable regular file at ``path``, or a 400 naming the problem."""
    file = Path(path)
    if not file.is_absolute():
        raise BadRequestError(f"'file_path' must be an absolute path, got '{path}'")
    if not file.exists():
        raise BadRequestError(f"file '{path}' does not exist")
    if not file.is_file():
        raise BadRequestError(f"'{path}' is not a regular file")
    try:
        with file.open("rb"):
            pass
    except OSError as exc:
        raise BadRequestError(f"file '{path}' cannot be read: {exc.strerror}") from None
    return file


def open_file(path: Path) -> TextIO:
    return path.open("r", encoding="utf-8-sig", newline="")


def from_file(path: Path, batch_size: int) -> CsvBatches:
    return CsvBatches(open_file(path), batch_size)


def check_url(url: str) -> str:
    """An http(s) URL with a host, or a 400."""
    try:
        parts = urlsplit(url)
        _ = parts.port  # raises for a port that is not a number or out of range
    except ValueError as exc:  # e.g. "Invalid IPv6 URL" for http://[::1
        raise BadRequestError(f"'csv_url' must be an http:// or https:// URL: "
                              f"{str(exc)[:100]}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise BadRequestError(f"'csv_url' must be an http:// or https:// URL, got "
                              f"'{shown_url(url)}'")
    return url


def shown_url(url: str) -> str:
    """``url`` without credentials or query (a signed URL's query is a secret)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return f"{parts.scheme}://{host}{parts.path}"[:200]


class _ByteStream(io.RawIOBase):
    """A file-like view of a byte iterator, so ``csv`` reads a download like a file."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._buffer = b""

    def readable(self) -> bool:
        return True

    def readinto(self, target: Any) -> int:
        while not self._buffer:
            try:
                self._buffer = next(self._chunks)
            except StopIteration:
                return 0
        size = min(len(target), len(self._buffer))
        target[:size] = self._buffer[:size]
        self._buffer = self._buffer[size:]
        return size


def from_url(url: str, batch_size: int) -> CsvBatches:
    """Start the download; records are parsed as the body streams in."""
    client = httpx.Client(timeout=URL_TIMEOUT, follow_redirects=True)
    try:
        response = client.send(client.build_request("GET", url), stream=True)
    except httpx.HTTPError as exc:
        client.close()
        raise BadRequestError(f"cannot fetch '{shown_url(url)}': {exc}") from None
    if response.status_code != 200:
        response.close()
        client.close()
        raise BadRequestError(f"fetching '{shown_url(url)}' answered HTTP "
                              f"{response.status_code}")

    def close() -> None:
        response.close()
        client.close()

    def chunks() -> Iterator[bytes]:
        try:
            yield from response.iter_bytes()  # as it arrives: a slow body still flows
        except httpx.HTTPError as exc:
            raise BadRequestError(f"download of '{shown_url(url)}' failed: {exc}") from None

    raw = io.BufferedReader(_ByteStream(chunks()), 65536)
    text = io.TextIOWrapper(raw, encoding="utf-8-sig", newline="")
    try:
        return CsvBatches(text, batch_size, close)
    except BaseException:
        close()
        raise
