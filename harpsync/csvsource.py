"""CSV sources for bulk loads: text, a file on the node, or a URL (the only httpx user
on the node side), read as a stream in batches of records.

Nothing is read whole: a file or a download is parsed as it arrives, ``batch_size``
rows at a time but no more than ``max_chars`` characters of cells (a batch becomes one
transaction and one log entry, which a peer must take in one frame), so memory stays
flat whatever the size. Values are typed as Harper's
loader types them: an empty cell is null, ``true``/``false`` are booleans, numbers are
numbers (but text with a leading zero, such as a zip code, stays text), and a cell
holding a JSON array or object is parsed.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import math
import re
import socket
import stat
import threading
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
# A batch's cells, in characters: about one default-sized request body (10 MiB).
BATCH_CHARS = 8 << 20
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

    def __init__(self, text: TextIO, batch_size: int, closer: Any = None,
                 max_chars: int = BATCH_CHARS) -> None:
        self.text = text
        self.batch_size = batch_size
        self.max_chars = max_chars
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
        except UnicodeDecodeError as exc:
            # The decoder reads ahead of the parser: the byte is somewhere after the last
            # line parsed, not necessarily on the next one.
            byte = exc.object[exc.start:exc.start + 1].hex() or "?"
            raise BadRequestError(f"CSV is not UTF-8 text: byte 0x{byte} at or after line "
                                  f"{self.reader.line_num + 1} cannot be decoded (save the "
                                  f"file as UTF-8)") from None

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
        """Up to ``batch_size`` records, and as many as fit in ``max_chars`` characters of
        cells (at least one); empty at the end."""
        batch: list[dict[str, Any]] = []
        header = self.header
        chars = 0
        while len(batch) < self.batch_size and chars < self.max_chars:
            row = self._next_row()
            if row is None:
                break
            self.rows += 1
            if len(row) > len(header):
                raise BadRequestError(f"CSV line {self.reader.line_num} has {len(row)} "
                                      f"fields; the header has {len(header)}")
            chars += sum(len(cell) for cell in row)
            batch.append({name: convert(cell) for name, cell in zip(header, row,
                                                                      strict=False)})
        return batch

    def close(self) -> None:
        self.text.close()
        if self._closer is not None:
            self._closer()


    def check_rest(self, abort: Abort | None = None) -> int:
        """Read every remaining row, checking it as ``next_batch`` would, without typing
        or keeping it; the number of rows. A bad line, a CSV error or a byte that is not
        UTF-8 raises the same 400 that the load would meet; so does ``abort.fire()`` (a
        stopping node does not wait for the pass over a large file)."""
        header = len(self.header)
        while (row := self._next_row()) is not None:
            if abort is not None and abort.fired:
                raise BadRequestError("the load was stopped")
            self.rows += 1
            if len(row) > header:
                raise BadRequestError(f"CSV line {self.reader.line_num} has {len(row)} "
                                      f"fields; the header has {header}")
        return self.rows


def count_rows(source: CsvBatches, abort: Abort | None = None) -> int:
    """The data rows of ``source``, all checked (see ``check_rest``); closes it."""
    try:
        return source.check_rest(abort)
    finally:
        source.close()


def from_text(data: str, batch_size: int, max_chars: int = BATCH_CHARS) -> CsvBatches:
    # A file's byte order mark is dropped on reading it (utf-8-sig); text pasted or read
    # from such a file may still start with one, which would name the first column
    # "\ufeffid" and leave every record without its primary key.
    text = data[1:] if data.startswith("\ufeff") else data
    return CsvBatches(io.StringIO(text, newline=""), batch_size, max_chars=max_chars)


def check_file(path: str) -> Path:
    """The readable regular file at ``path``, or a 400 naming the problem."""
    shown = path if len(path) <= 200 else path[:200] + "..."
    file = Path(path)
    if not file.is_absolute():
        raise BadRequestError(f"'file_path' must be an absolute path, got '{shown}'")
    try:
        mode = file.stat().st_mode
    except (FileNotFoundError, NotADirectoryError, ValueError):  # ValueError: a NUL byte
        raise BadRequestError(f"file '{shown}' does not exist") from None
    except OSError as exc:  # a name too long, a loop of links, a directory not searchable
        raise BadRequestError(f"file '{shown}' cannot be read: {exc.strerror}") from None
    if not stat.S_ISREG(mode):
        raise BadRequestError(f"'{shown}' is not a regular file")
    try:
        with file.open("rb"):
            pass
    except OSError as exc:
        raise BadRequestError(f"file '{shown}' cannot be read: {exc.strerror}") from None
    return file


def open_file(path: Path) -> TextIO:
    return path.open("r", encoding="utf-8-sig", newline="")


def from_file(path: Path, batch_size: int, max_chars: int = BATCH_CHARS) -> CsvBatches:
    text = open_file(path)
    try:
        return CsvBatches(text, batch_size, max_chars=max_chars)
    except BaseException:
        text.close()
        raise


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
    try:  # what httpx itself refuses (a control character, a malformed IDNA host)
        httpx.Request("GET", url)
    except (httpx.InvalidURL, UnicodeError) as exc:
        raise BadRequestError(f"'csv_url' is not a valid URL: {str(exc)[:100]}") from None
    return url


def shown_url(url: str) -> str:
    """``url`` without credentials or query (a signed URL's query is a secret)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return f"{parts.scheme}://{host}{parts.path}"[:200]


class Abort:
    """Lets the event loop stop a download that a worker thread is blocked reading.

    Closing an httpx response from another thread does not wake a thread blocked in
    ``recv`` on it; shutting the socket down does. httpcore reports each connection it
    opens (its ``trace`` extension, followed across redirects), so ``fire()`` reaches
    the socket even while the request still waits for the response headers.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._streams: list[Any] = []
        self.fired = False

    def trace(self, event: str, info: dict[str, Any]) -> None:
        """httpcore's trace callback: note each stream it connects (TCP, then TLS)."""
        if not event.endswith((".connect_tcp.complete", ".start_tls.complete")):
            return
        stream = info.get("return_value")
        if stream is None:
            return
        with self._lock:
            self._streams.append(stream)
            fired = self.fired
        if fired:
            _shut(stream)

    def fire(self) -> None:
        """Shut down every socket the download opened (thread-safe, never blocks)."""
        with self._lock:
            self.fired = True
            streams = list(self._streams)
        for stream in streams:
            _shut(stream)


def _shut(stream: Any) -> None:
    try:
        sock = stream.get_extra_info("socket")
        if isinstance(sock, socket.socket):
            # The plain socket's shutdown, also for TLS: SSLSocket.shutdown drops its SSL
            # object under the thread still reading through it.
            socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except (OSError, ValueError):  # closed already, or the TLS layer refused: it ends
        pass


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


def _encoding(charset: str | None) -> str:
    """The codec for a download: the charset its Content-Type declares (a server that
    says ISO-8859-1 means it), else UTF-8; a byte order mark is dropped either way."""
    if charset:
        try:
            name = codecs.lookup(charset).name
        except LookupError:
            return "utf-8-sig"
        return "utf-8-sig" if name in ("utf-8", "utf-8-sig") else name
    return "utf-8-sig"


def from_url(url: str, batch_size: int, abort: Abort | None = None,
             max_chars: int = BATCH_CHARS) -> CsvBatches:
    """Start the download; records are parsed as the body streams in. ``abort.fire()``
    (from another thread) ends a download blocked on a stalled server at once."""
    abort = abort or Abort()
    client = httpx.Client(timeout=URL_TIMEOUT, follow_redirects=True)
    try:
        request = client.build_request("GET", url, extensions={"trace": abort.trace})
        response = client.send(request, stream=True)
    except httpx.HTTPError as exc:
        client.close()
        if abort.fired:
            raise BadRequestError(f"the download of '{shown_url(url)}' was stopped") from None
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
            if abort.fired:
                raise BadRequestError(f"the download of '{shown_url(url)}' was "
                                      f"stopped") from None
            raise BadRequestError(f"download of '{shown_url(url)}' failed: {exc}") from None

    raw = io.BufferedReader(_ByteStream(chunks()), 65536)
    text = io.TextIOWrapper(raw, encoding=_encoding(response.charset_encoding), newline="")
    try:
        return CsvBatches(text, batch_size, close, max_chars)
    except BaseException:
        close()
        raise
