"""csv_data_load, csv_file_load and csv_url_load: shapes, typing, refusals, failures."""

from __future__ import annotations

from typing import Any

import pytest

from harpsync import csvsource
from harpsync.errors import BadRequestError
from operations.bulk import BATCH
from tests.bulk_jobs.util import TIMES, finished, started
from tests.helpers import wait_for

BREEDS = ("id,name,section,country,image\n"
          "1,ENGLISH POINTER,British and Irish Pointers and Setters,GREAT BRITAIN,"
          "https://www.fci.be/Nomenclature/Illustrations/001g07.jpg\n"
          "2,ENGLISH SETTER,British and Irish Pointers and Setters,GREAT BRITAIN,"
          "https://www.fci.be/Nomenclature/Illustrations/002g07.jpg\n"
          "3,KERRY BLUE TERRIER,Large and medium sized Terriers,IRELAND,\n")


def test_csv_data_load_matches_documented_shapes_and_replicates(mesh):
    """The documented csv_data_load answers at once; get_job reports it; B gets the rows."""
    a, b = mesh
    job_id = started(a.call("csv_data_load", database="dev", action="insert", table="breed",
                            data=BREEDS))
    record = finished(a, job_id)
    assert record["status"] == "COMPLETE", record["error"]
    assert record["message"] == "successfully loaded 3 of 3 records"
    assert record["progress"] == {"records": 3, "total": 3}
    assert record["type"] == "csv_data_load" and record["user"] == "admin"
    assert record["id"] == job_id and record["job_body"] is None
    for key in ("created_datetime", "start_datetime", "end_datetime", *TIMES):
        assert isinstance(record[key], float), key
    assert record["end_datetime_converted"].endswith("Z")
    expected = {"id": 3, "name": "KERRY BLUE TERRIER",
                "section": "Large and medium sized Terriers", "country": "IRELAND",
                "image": None}

    def on_b() -> list[dict[str, Any]]:
        return b.call("search_by_id", database="dev", table="breed", ids=[3],
                      get_attributes=list(expected))

    assert wait_for(lambda: on_b() == [expected], timeout=20, message="the load on B")


def test_csv_file_load_actions_and_typing(mesh, tmp_path):
    """csv_file_load streams a file; upsert merges, update skips unknown ids; cells typed."""
    a, b = mesh
    a.call("create_table", database="dev", table="dog", primary_key="id")
    path = tmp_path / "dogs.csv"
    path.write_text('id,name,age,good,zip,tags,note\n'
                    '1,Penny,7,true,02134,"[""a"", ""b""]","line one\nline two"\n'
                    '2,Kato,6.5,FALSE,,{"x": 1},\n')
    record = finished(a, started(a.call("csv_file_load", database="dev", table="dog",
                                        action="upsert", file_path=str(path))))
    assert record["status"] == "COMPLETE" and record["file_path"] == str(path), record
    found = a.call("search_by_id", database="dev", table="dog", ids=[1, 2],
                   get_attributes=["id", "name", "age", "good", "zip", "tags", "note"])
    assert found == [
        {"id": 1, "name": "Penny", "age": 7, "good": True, "zip": "02134", "tags": ["a", "b"],
         "note": "line one\nline two"},
        {"id": 2, "name": "Kato", "age": 6.5, "good": False, "zip": None, "tags": {"x": 1},
         "note": None}]
    path.write_text("id,age\n2,9\n77,1\n")
    record = finished(a, started(a.call("csv_file_load", database="dev", table="dog",
                                        action="update", file_path=str(path))))
    assert record["message"] == "successfully loaded 1 of 2 records", record
    assert record["result"]["skipped"] == 1
    wait_for(lambda: b.call("search_by_id", database="dev", table="dog", ids=[2],
                            get_attributes=["age", "name"]) == [{"age": 9, "name": "Kato"}],
             timeout=20, message="the update on B")


def test_csv_json_cells_that_are_not_json_stay_text(mesh):
    """A cell that reads as JSON only to Python (NaN, Infinity, 1e400), or nests deeper
    than a request body may (a value nested ~1000 deep cannot be answered), is kept as
    text: never stored as a non-finite number (which reads back as invalid JSON) and
    never a failed job."""
    a, _ = mesh
    a.call("create_table", database="dev", table="cells", primary_key="id")
    deep = "[" * 60_000 + "]" * 60_000  # past the parser's recursion limit
    deeper_than_a_body = "[" * 600 + "]" * 600  # parsed, but over jsonio.MAX_DEPTH
    cells = ["[NaN]", '{"a": Infinity}', "[1e400]", "[-Infinity]", deep, deeper_than_a_body]
    data = "id,v\n" + "".join(f'{i},"{c.replace(chr(34), 2 * chr(34))}"\n'
                               for i, c in enumerate(cells))
    record = finished(a, started(a.call("csv_data_load", database="dev", table="cells",
                                        data=data)))
    assert record["status"] == "COMPLETE", record
    response = a.post({"operation": "search_by_id", "database": "dev", "table": "cells",
                       "ids": list(range(len(cells))), "get_attributes": ["id", "v"]})
    assert [r["v"] for r in response.json()] == cells


def test_csv_cell_longer_than_pythons_default_field_limit_loads(mesh):
    """A cell over 128 KiB (the csv module's default field limit) loads like any other:
    insert takes such a value, so a CSV load must too."""
    a, _ = mesh
    a.call("create_table", database="dev", table="long", primary_key="id")
    text = "x" * 200_000
    record = finished(a, started(a.call("csv_data_load", database="dev", table="long",
                                        data=f"id,text\n1,{text}\n")))
    assert record["status"] == "COMPLETE", record
    found = a.call("search_by_id", database="dev", table="long", ids=[1],
                   get_attributes=["text"])
    assert found == [{"text": text}]


def test_csv_url_load_from_a_local_server(mesh, csv_server):
    """csv_url_load downloads and loads; a 404 fails the job with a message naming it."""
    a, b = mesh
    base, bodies = csv_server
    a.call("create_table", database="dev", table="url", primary_key="id")
    rows = "".join(f"{i},name-{i}\n" for i in range(2500))
    bodies["/big.csv"] = ("id,name\n" + rows).encode()
    record = finished(a, started(a.call("csv_url_load", database="dev", table="url",
                                        csv_url=f"{base}/big.csv?sig=secret")))
    assert record["status"] == "COMPLETE", record["error"]
    assert record["message"] == "successfully loaded 2500 of 2500 records"
    assert record["csv_url"] == f"{base}/big.csv"  # the query (a signature) is not kept
    wait_for(lambda: b.count("url", "dev") == 2500, timeout=20, message="2500 rows on B")
    record = finished(a, started(a.call("csv_url_load", database="dev", table="url",
                                        csv_url=f"{base}/missing.csv")))
    assert record["status"] == "ERROR" and "HTTP 404" in record["error"], record


def test_csv_url_load_reads_the_declared_charset(mesh, csv_server):
    """A download whose Content-Type declares a charset (ISO-8859-1) is read in it; one
    that declares none is UTF-8, and a byte that is not fails the job saying so."""
    a, _ = mesh
    base, bodies = csv_server
    a.call("create_table", database="dev", table="charset", primary_key="id")
    bodies["/latin1.csv"] = "id,name\n1,café\n".encode("latin-1")
    record = finished(a, started(a.call("csv_url_load", database="dev", table="charset",
                                        csv_url=f"{base}/latin1.csv")))
    assert record["status"] == "COMPLETE", record["error"]
    assert a.call("search_by_id", database="dev", table="charset", ids=[1],
                  get_attributes=["name"]) == [{"name": "café"}]
    bodies["/undeclared.csv"] = bodies["/latin1.csv"]
    record = finished(a, started(a.call("csv_url_load", database="dev", table="charset",
                                        csv_url=f"{base}/undeclared.csv")))
    assert record["status"] == "ERROR", record
    assert record["error"].startswith("CSV is not UTF-8 text: byte 0xe9"), record["error"]


@pytest.mark.parametrize(("url", "fragment"), [
    ("http://[::1/x.csv", "http:// or https://"),  # urlsplit: "Invalid IPv6 URL"
    ("http://127.0.0.1:99999/x.csv", "Port out of range"),  # raised by SplitResult.port
    ("http://127.0.0.1:x/x.csv", "Port could not be cast"),
    ("http://127.0.0.1/\x01.csv", "non-printable ASCII character"),  # httpx.InvalidURL
    ("http://xn--/x.csv", "Malformed A-label"),  # an IDNA error, raised on the request
])
def test_csv_url_load_malformed_url_is_400(mesh, url, fragment):
    """A URL that urllib cannot split, whose port is not a port, or that httpx refuses is
    a 400 naming the problem, not a job failing with a Python exception's name."""
    a, _ = mesh
    response = a.post({"operation": "csv_url_load", "database": "dev", "table": "breed",
                       "csv_url": url})
    assert response.status_code == 400, response.text
    assert fragment in response.json()["error"]


def test_bad_loads_are_refused_or_fail_the_job(mesh, tmp_path):
    """Bad requests are 400s before any job; bad CSV content fails its job, naming it."""
    a, _ = mesh
    cases = [
        ({"operation": "csv_data_load", "database": "dev", "table": "nope", "data": "id\n1"},
         "Table 'dev.nope' does not exist"),
        ({"operation": "csv_data_load", "table": "breed", "database": "dev", "data": "x",
          "action": "merge"}, "'action'"),
        ({"operation": "csv_file_load", "database": "dev", "table": "breed",
          "file_path": str(tmp_path / "absent.csv")}, "does not exist"),
        ({"operation": "csv_file_load", "database": "dev", "table": "breed",
          "file_path": "relative.csv"}, "absolute path"),
        ({"operation": "csv_file_load", "database": "dev", "table": "breed",
          "file_path": "/" + "a" * 5000}, "cannot be read: File name too long"),
        ({"operation": "csv_file_load", "database": "dev", "table": "breed",
          "file_path": "/tmp/a\u0000b.csv"}, "does not exist"),
        ({"operation": "csv_url_load", "database": "dev", "table": "breed",
          "csv_url": "file:///etc/passwd"}, "http:// or https://"),
        ({"operation": "csv_data_load", "database": "system", "table": "hdb_user",
          "data": "username\nx"}, "'system' database"),
        ({"operation": "search_jobs_by_start_date", "from_date": "yesterday",
          "to_date": "2030-01-01"}, "'from_date'"),
    ]
    for body, fragment in cases:
        response = a.post(body)
        assert response.status_code == 400, (body, response.text)
        assert fragment in response.json()["error"], (body, response.text)
    assert a.call("get_job", expect=404, id="no-such-job")["error"] == \
        "job 'no-such-job' not found"
    for data, fragment in (("id,name\n1,a,extra\n", "line 2 has 3 fields"),
                           ("id,id\n1,2\n", "names a column twice"),
                           ("id,bad name!\n1,2\n", "attribute name 'bad name!'"),
                           ("", "no header row")):
        record = finished(a, started(a.call("csv_data_load", database="dev", table="breed",
                                            data=data or "\n")))
        assert record["status"] == "ERROR" and fragment in record["error"], record


def test_non_utf8_file_fails_the_job_naming_the_byte(mesh, tmp_path):
    """A file that is not UTF-8 fails its job with a message saying so (no Python
    UnicodeDecodeError text), and nothing of it is loaded."""
    a, _ = mesh
    a.call("create_table", database="dev", table="latin", primary_key="id")
    path = tmp_path / "latin1.csv"
    path.write_bytes(b"id,name\n1,ok\n2,caf\xe9\n")
    record = finished(a, started(a.call("csv_file_load", database="dev", table="latin",
                                        file_path=str(path))))
    assert record["status"] == "ERROR", record
    assert "UnicodeDecodeError" not in record["error"] and "codec" not in record["error"]
    assert record["error"].startswith("CSV is not UTF-8 text: byte 0xe9"), record["error"]
    assert "nothing was loaded" in record["error"]
    assert a.count("latin", "dev") == 0


def test_malformed_line_late_in_a_file_loads_nothing(mesh, tmp_path):
    """A file whose bad line comes after the first batch fails before any write (the
    whole file is checked first): no half-loaded table."""
    a, _ = mesh
    a.call("create_table", database="dev", table="late", primary_key="id")
    path = tmp_path / "late.csv"
    rows = BATCH + 10
    path.write_text("id,name\n" + "".join(f"{i},n{i}\n" for i in range(rows)) + "x,y,z\n")
    record = finished(a, started(a.call("csv_file_load", database="dev", table="late",
                                        file_path=str(path))))
    assert record["status"] == "ERROR", record
    assert record["error"] == (f"CSV line {rows + 2} has 3 fields; the header has 2; "
                               f"nothing was loaded")
    assert a.count("late", "dev") == 0


def test_a_load_failing_midway_says_what_stays(mesh):
    """A record the table refuses after a committed batch fails the job; its error and
    result say which records were written and stay."""
    a, _ = mesh
    a.call("create_table", database="dev", table="midway", primary_key="id")
    data = ("id,name\n" + "".join(f"{i},n{i}\n" for i in range(BATCH + 5))
            + '"{""an"": ""object""}",bad\n')
    record = finished(a, started(a.call("csv_data_load", database="dev", table="midway",
                                        data=data)))
    assert record["status"] == "ERROR", record
    assert record["error"].startswith(f"records {BATCH + 1}-{BATCH + 6}: "), record["error"]
    assert record["error"].endswith(f"; records 1-{BATCH} were written before the failure "
                                    f"and stay ({BATCH} loaded, 0 skipped)")
    assert record["result"]["records"] == BATCH and record["result"]["loaded"] == BATCH
    assert a.count("midway", "dev") == BATCH


def test_large_rows_load_in_batches_a_peer_can_take(node):
    """Batches are bounded by size as well as by count: rows of 1 KiB load even where
    2,000 of them would make a log entry over the limit (set low here)."""
    node.node.storage.max_log_entry = 1 << 20
    node.call("create_table", database="dev", table="wide", primary_key="id")
    rows = BATCH + 500
    data = "id,text\n" + "".join(f"{i},{'x' * 1024}\n" for i in range(rows))
    record = finished(node, started(node.call("csv_data_load", database="dev", table="wide",
                                              data=data)))
    assert record["status"] == "COMPLETE", record["error"]
    assert record["message"] == f"successfully loaded {rows} of {rows} records"
    assert node.count("wide", "dev") == rows


def test_csv_data_starting_with_a_byte_order_mark(node):
    """CSV text that starts with a byte order mark (read from such a file) names its
    first column without it, as a file load does: the primary key is found."""
    node.call("create_table", database="dev", table="bom", primary_key="id")
    record = finished(node, started(node.call("csv_data_load", database="dev", table="bom",
                                              data="\ufeffid,name\n7,a\n")))
    assert record["status"] == "COMPLETE", record["error"]
    assert node.call("search_by_id", database="dev", table="bom", ids=[7],
                     get_attributes=["id", "name"]) == [{"id": 7, "name": "a"}]


def test_the_checking_pass_stops_when_the_load_is_aborted():
    """The pass that checks a whole file before the first write (the long part of a
    large file's load) stops at the next row once the load is aborted (a stopping node
    does not wait for it), and closes its source."""
    abort = csvsource.Abort()
    source = csvsource.from_text("id\n" + "1\n" * 100_000, 1)
    abort.fire()
    with pytest.raises(BadRequestError, match="the load was stopped"):
        csvsource.count_rows(source, abort)
    assert source.text.closed and source.rows == 0
