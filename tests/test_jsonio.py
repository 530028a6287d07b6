"""JSON on the wire is the standard library's, whichever library does the work.

The HTTP tests pin today's answers (they passed on the code before ``jsonio`` existed):
responses are spelled exactly as ``json.dumps(..., separators=(",", ":"))`` spells them
(ASCII escapes, ``1e-05``, ``1e+16``), and edge-case request bodies get the same value
or the same 400 as the standard-library decoder gives. The unit tests compare
``jsonio`` with the standard library directly for what no operation returns today
(non-``str`` keys, objects encoded with ``default=str``, NaN and infinities).
"""

from __future__ import annotations

import dataclasses
import datetime
import decimal
import enum
import json
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from harpsync import jsonio
from harpsync.errors import BadRequestError
from tests.helpers import ADMIN, InProcessNode, harper_error


def stdlib(payload: Any) -> bytes:
    return json.dumps(payload, separators=(",", ":"), default=str).encode()


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    shared = InProcessNode("jsonio", tmp_path_factory.mktemp("jsonio") / "n").start()
    shared.call("create_table", database="dev", table="dog", primary_key="id")
    yield shared
    shared.close()


def raw(node: Any, content: bytes) -> Any:
    return node.client.post(node.url, content=content, auth=ADMIN,
                            headers={"content-type": "application/json"})


# -- through the operations API ---------------------------------------------------------
RECORD = (b'{"id": 7, "small": 1e-05, "tiny": 2.5e-07, "tinier": 0.00001, "big": 1e16, '
          b'"huge": 1.7976931348623157e308, "neg0": -0.0, "plain": 31.5, '
          b'"u64": 18446744073709551615, "i64": -9223372036854775808, '
          b'"text": "caf\\u00e9 \\u007f \\ud83d\\ude00 \\u0001 \\"q\\" \\\\ /", '
          b'"emoji": "\xf0\x9f\x90\xb6", "nested": {"a": [1, 2.0, null, true]}}')


def test_response_bytes_are_the_stdlib_spelling(node):
    """A record with small, big and negative-zero floats, 64-bit integers and non-ASCII
    text comes back spelled byte for byte as ``json.dumps`` spells it."""
    body = (b'{"operation": "insert", "database": "dev", "table": "dog", "records": ['
            + RECORD + b"]}")
    inserted = raw(node, body)
    assert inserted.status_code == 200, inserted.text
    assert inserted.content == stdlib(inserted.json())
    found = raw(node, b'{"operation": "search_by_id", "database": "dev", "table": "dog", '
                      b'"ids": [7], "get_attributes": ["*"]}')
    assert found.status_code == 200, found.text
    assert found.content == stdlib(found.json())
    record = found.json()[0]
    assert record["small"] == 1e-05 and record["tinier"] == 1e-05
    assert record["u64"] == 2**64 - 1 and record["i64"] == -(2**63)
    assert record["text"] == "caf\u00e9 \x7f \U0001f600 \x01 \"q\" \\ /"
    assert b"1e-05" in found.content and b"2.5e-07" in found.content
    assert b"1e+16" in found.content and b"\\u00e9" in found.content
    assert b"\\u007f" in found.content and b"\\ud83d\\ude00" in found.content


@pytest.mark.parametrize("literal", [b"18446744073709551616", b"-9223372036854775809",
                                     b"100000000000000000000000000000"])
def test_integers_beyond_64_bits_stay_integers(node, literal):
    """An integer literal beyond 64 bits is read as that integer (and refused as a
    stored value), never rounded to a float and stored."""
    body = (b'{"operation": "insert", "database": "dev", "table": "dog", '
            b'"records": [{"id": 8, "big": ' + literal + b"}]}")
    response = raw(node, body)
    assert response.status_code == 400, response.text
    assert "records[0]" in response.json()["error"]
    assert node.call("search_by_id", database="dev", table="dog", ids=[8]) == []


@pytest.mark.parametrize("content, message", [
    (b'{"operation": "describe_all", "x": NaN}', "Invalid JSON: NaN is not a JSON value"),
    (b'{"operation": "describe_all", "x": -Infinity}',
     "Invalid JSON: -Infinity is not a JSON value"),
    (b'{"operation": "describe_all", "x": [1e400]}',
     "Invalid JSON: the number 1e400 is out of range"),
    (b'{"operation": "describe_all", "x": "\\udc00"}',
     "Invalid JSON: a string holds an unpaired surrogate escape (\\ud800-\\udfff)"),
    (b'{"operation": "describe_all", "\\ud800": 1}',
     "Invalid JSON: a string holds an unpaired surrogate escape (\\ud800-\\udfff)"),
    (b'\xef\xbb\xbf{"operation": "describe_all"}', "Invalid JSON: Expecting value at position 0"),
    (b'{"operation": "describe_all", "x": "\xff"}', "Request body must be UTF-8 encoded JSON"),
    (b'{"operation": "describe_all",}',
     "Invalid JSON: Expecting property name enclosed in double quotes at position 29"),
    (b'{"operation": "describe_all", "x": 01}',
     "Invalid JSON: Expecting ',' delimiter at position 36"),
])
def test_request_edge_cases_answer_as_before(node, content, message):
    """Bodies the fast decoder refuses get the standard library's exact 400 message."""
    response = raw(node, content)
    assert response.status_code == 400, response.text
    assert harper_error(response.json()) == {"error": message}


def test_duplicate_keys_keep_the_last(node):
    """A key given twice keeps its last value, as the standard library does."""
    response = raw(node, b'{"operation": "insert", "database": "dev", "table": "dog", '
                         b'"records": [{"id": 9, "n": 1, "n": 2}], "records": '
                         b'[{"id": 10, "n": 3, "n": 4}]}')
    assert response.status_code == 200, response.text
    assert response.json()["inserted_hashes"] == [10]
    assert node.call("search_by_id", database="dev", table="dog", ids=[10],
                     get_attributes=["n"]) == [{"n": 4}]


# -- the module against the standard library ---------------------------------------------
class Colour(enum.IntEnum):
    RED = 1


class Name(str):
    pass


@dataclasses.dataclass
class Point:
    x: int


ODD_PAYLOADS = [
    {1: "int key", 2.5: "float key", None: "none key", False: "bool key"},
    {"when": datetime.datetime(2024, 1, 2, 3, 4, 5), "day": datetime.date(2024, 1, 2)},
    {"d": decimal.Decimal("1.10"), "s": {3}, "b": b"x", "p": Point(1)},
    {"enum": Colour.RED, "name": Name("n"), "tuple": (1, 2)},
    [float("nan"), float("inf"), -float("inf"), 1e-05, 2.5e-07, 1e16, -0.0],
    [2**64, -(2**63) - 1, 2**63, "\x7f\u00e9\U0001f600\ud800"],
    {"null": None, "t": True},
]


@pytest.mark.parametrize("payload", ODD_PAYLOADS)
def test_dumps_matches_stdlib(payload):
    assert jsonio.dumps(payload) == stdlib(payload)


def test_dumps_errors_match_stdlib():
    """A circular structure fails as it did (ValueError from the standard library)."""
    loop: list[Any] = []
    loop.append(loop)
    with pytest.raises(ValueError, match="Circular reference"):
        jsonio.dumps(loop)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats() | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12)


def _outcome(fn: Any, raw_body: bytes) -> tuple[str, str]:
    try:
        return "ok", repr(fn(raw_body))
    except BadRequestError as exc:
        return "error", str(exc)


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_same_bytes_and_values_as_stdlib(value):
    """Encoding equals the standard library's; decoding its output, or the same value
    written with raw UTF-8 and NaN/Infinity literals, gives the same value or 400."""
    assert jsonio.dumps(value) == stdlib(value)
    for text in (stdlib(value),
                 json.dumps(value, ensure_ascii=False).encode("utf-8", "surrogatepass")):
        assert _outcome(jsonio.parse_request, text) == _outcome(jsonio.stdlib_parse, text)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=24) | st.text(alphabet='[]{}",:0123456789.eE+-tnul \\x',
                                        min_size=1, max_size=24).map(str.encode))
def test_same_answer_as_stdlib_for_any_bytes(body):
    if not body.strip():
        return
    assert _outcome(jsonio.parse_request, body) == _outcome(jsonio.stdlib_parse, body)
