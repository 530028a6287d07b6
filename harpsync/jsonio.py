"""JSON for the HTTP layer: request bodies in, responses out (the only orjson import).

orjson is several times faster than the standard library, but it differs from it at
the edges, and the API's behaviour there is fixed (tests pin it). So orjson's answer is
used only when it is certainly the standard library's, and the standard library decides
everything else:

- Decoding: orjson refuses NaN, Infinity, out-of-range numbers (``1e400``), lone
  surrogate escapes, invalid UTF-8 and BOMs; each refusal goes to the standard-library
  decoder, whose answer (a value or the 400 message) is today's. A body nested deeper
  than ``MAX_DEPTH`` is refused by both (see there). Integers beyond 64 bits
  are the one thing orjson accepts differently (it turns them into floats), so a body
  holding a run of 19 or more digits goes to the standard library directly.
- Encoding: ``json.dumps(payload, separators=(",", ":"), default=str)`` is the
  reference. orjson refuses non-``str`` keys and integers beyond 64 bits, and with the
  pass-through options and a refusing ``default`` it refuses every object the standard
  library would turn into text with ``str`` (datetimes, dataclasses, subclasses of
  ``str``, ``int``, ``dict`` and ``list``, sets, bytes, ...); each refusal goes to the
  standard library. Its output is then kept only if it holds none of the spellings
  where the two differ: non-ASCII bytes and DEL (the standard library escapes them),
  ``null`` (orjson writes NaN and infinities as ``null``), and small or negative-
  exponent floats (``0.00001`` and ``2.5e-7`` against ``1e-05`` and ``2.5e-07``).
  A plain ``enum.Enum`` (not a subclass of ``int`` or ``str``) would be written by
  orjson as its value; no response holds one.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

import orjson

from harpsync.errors import BadRequestError

_OPTIONS = (orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_DATACLASS
            | orjson.OPT_PASSTHROUGH_SUBCLASS)
# Output spellings where orjson and ``json.dumps`` differ (see the module docstring);
# checked with bytes methods first, the regular expression only when ``e-`` occurs.
_NEGATIVE_EXPONENT = re.compile(rb"[0-9]e-[0-9]")
# Integer literals orjson would turn into floats (beyond 64 bits need 19+ digits):
# digits map to "0" and everything else to " ", then one substring search.
_DIGITS = bytes(48 if 48 <= i <= 57 else 32 for i in range(256))
_LONG_RUN = b"0" * 19
# A \ud800-\udfff escape may decode to a lone surrogate, which is not text: it cannot
# be encoded as UTF-8 for keys, msgpack or password hashing.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


class _Refused(TypeError):
    pass


def _refuse(_obj: Any) -> Any:
    raise _Refused


def dumps(payload: Any) -> bytes:
    """``payload`` as compact JSON bytes, exactly as ``json.dumps(..., default=str)``."""
    try:
        data = orjson.dumps(payload, default=_refuse, option=_OPTIONS)
    except TypeError:  # orjson.JSONEncodeError and _Refused
        return stdlib_dumps(payload)
    if not data.isascii() or b"\x7f" in data or b"null" in data or b"0.0000" in data \
            or (b"e-" in data and _NEGATIVE_EXPONENT.search(data) is not None):
        return stdlib_dumps(payload)
    return data


def stdlib_dumps(payload: Any) -> bytes:
    """The reference encoding (ASCII, compact, ``str`` for anything else)."""
    return json.dumps(payload, separators=(",", ":"), default=str).encode()


# -- requests ----------------------------------------------------------------------------
def _reject_constant(name: str) -> Any:
    # Python's json accepts NaN and Infinity, which are not JSON and which no client
    # could read back from a search.
    raise BadRequestError(f"Invalid JSON: {name} is not a JSON value")


def _parse_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):  # 1e400: not representable, and unreadable once echoed back
        raise BadRequestError(f"Invalid JSON: the number {text[:40]} is out of range")
    return value


# Built once: json.loads with hooks would build a new decoder on every request.
_DECODER = json.JSONDecoder(parse_constant=_reject_constant, parse_float=_parse_float)


def _reject_lone_surrogates(value: Any) -> None:
    stack = [value]
    while stack:  # iterative: the parsed value may be nested close to the parser's limit
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                raise BadRequestError("Invalid JSON: a string holds an unpaired surrogate "
                                      "escape (\\ud800-\\udfff)") from None
        elif isinstance(item, dict):
            stack.extend(item)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def parse_request(raw: bytes) -> Any:
    """A request body's JSON value, or a 400 naming the problem."""
    if not raw.strip():
        raise BadRequestError("Body cannot be empty when content-type is set to 'application/json'")
    value: Any = _UNPARSED
    if _LONG_RUN not in raw.translate(_DIGITS):
        try:
            value = orjson.loads(raw)
        except orjson.JSONDecodeError:
            pass  # the standard library decides, and names the problem
    if value is _UNPARSED:
        value = stdlib_parse(raw)
    # Fewer brackets than MAX_DEPTH cannot nest deeper (two C-speed counts); otherwise
    # orjson's encoder, which stops past 255 levels, clears all but deep bodies quickly.
    if raw.count(b"[") + raw.count(b"{") > MAX_DEPTH and _deeper_than_orjson(value) \
            and nested_deeper_than(value, MAX_DEPTH):
        raise BadRequestError(f"Invalid JSON: nested deeper than {MAX_DEPTH} levels")
    return value


_UNPARSED = object()
# The deepest nesting a request body may have. orjson reads up to 1024 levels, but the
# standard library's encoder (the fallback of ``dumps``) stops near the recursion limit,
# about 990 levels: a value stored from a body nested 1000 deep could never be answered,
# and every read of its record or scan of its table would fail. Kept well below, since a
# response wraps a stored value a few levels deeper.
MAX_DEPTH = 512


def _deeper_than_orjson(value: Any) -> bool:
    try:
        orjson.dumps(value)
    except TypeError:  # past 255 levels (or an integer beyond 64 bits): look closer
        return True
    return False


def nested_deeper_than(value: Any, limit: int) -> bool:
    """Whether ``value`` has arrays or objects nested more than ``limit`` levels deep."""
    stack = [(value, 1)] if isinstance(value, dict | list) else []
    while stack:  # iterative: the value may be nested close to the parser's limit
        item, depth = stack.pop()
        if depth > limit:
            return True
        children = item.values() if isinstance(item, dict) else item
        stack.extend((child, depth + 1) for child in children
                     if isinstance(child, dict | list))
    return False


def stdlib_parse(raw: bytes) -> Any:
    """The reference decoding of a (non-empty) request body."""
    try:
        value = _DECODER.decode(raw.decode("utf-8"))
        if _SURROGATE_ESCAPE.search(raw):
            _reject_lone_surrogates(value)
        return value
    except UnicodeDecodeError:
        raise BadRequestError("Request body must be UTF-8 encoded JSON") from None
    except json.JSONDecodeError as exc:
        raise BadRequestError(f"Invalid JSON: {exc.msg} at position {exc.pos}") from None
    except RecursionError:
        raise BadRequestError("Invalid JSON: nested too deeply") from None
    except ValueError as exc:  # e.g. an integer literal longer than Python's digit limit
        raise BadRequestError(f"Invalid JSON: {str(exc)[:100]}") from None
