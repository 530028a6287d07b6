"""CSV loads as jobs (csv_data_load, csv_file_load, csv_url_load), get_job,
search_jobs_by_start_date and the transaction log (read_transaction_log,
delete_transaction_logs_before), on two replicating nodes; a job across a crash.

Shapes follow Harper's bulk-operations, jobs and logs documentation (4.7).
"""

from __future__ import annotations

import http.server
import math
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from harpsync import csvsource
from harpsync.errors import BadRequestError
from operations.bulk import BATCH
from tests.helpers import ADMIN, InProcessNode, wait_for

BREEDS = ("id,name,section,country,image\n"
          "1,ENGLISH POINTER,British and Irish Pointers and Setters,GREAT BRITAIN,"
          "https://www.fci.be/Nomenclature/Illustrations/001g07.jpg\n"
          "2,ENGLISH SETTER,British and Irish Pointers and Setters,GREAT BRITAIN,"
          "https://www.fci.be/Nomenclature/Illustrations/002g07.jpg\n"
          "3,KERRY BLUE TERRIER,Large and medium sized Terriers,IRELAND,\n")
READER = {"super_user": False,
          "dev": {"tables": {"breed": {"read": True, "insert": False, "update": False,
                                       "delete": False, "attribute_permissions": []}}}}
TIMES = ("__createdtime__", "__updatedtime__")


class _CsvHandler(http.server.BaseHTTPRequestHandler):
    """Serves ``bodies``; a path starting ``/stall`` sends its body, then hangs until
    the server stops or the body is removed (a download that never ends); a path
    holding ``latin1`` is declared ISO-8859-1."""

    bodies: dict[str, bytes] = {}
    release = threading.Event()

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        path = self.path.split("?")[0]
        body = self.bodies.get(path)
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        charset = "; charset=ISO-8859-1" if "latin1" in path else ""
        self.send_header("Content-Type", f"text/csv{charset}")
        if not path.startswith("/stall"):
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        self.wfile.flush()
        if path.startswith("/stall"):
            deadline = time.monotonic() + 60
            while path in self.bodies and not self.release.wait(0.05) \
                    and time.monotonic() < deadline:
                pass

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def csv_server() -> Iterator[tuple[str, dict[str, bytes]]]:
    """A local HTTP server on 127.0.0.1 (port chosen by the OS) serving CSV bodies."""
    bodies: dict[str, bytes] = {}
    release = threading.Event()
    handler = type("Handler", (_CsvHandler,), {"bodies": bodies, "release": release})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", bodies
    release.set()
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, Any]]:
    """A and B replicating, ``dev.breed`` on both, and a read-only user bob."""
    root: Path = tmp_path_factory.mktemp("bulk")
    a = InProcessNode("bulk-a", root / "a").start()
    b = InProcessNode("bulk-b", root / "b").start()
    try:
        a.call("add_node", hostname=b.name, url=b.repl_url, verify_tls=False,
               authorization={"username": ADMIN[0], "password": ADMIN[1]})
        a.call("create_table", database="dev", table="breed", primary_key="id")
        a.call("add_role", role="reader", permission=READER)
        a.call("add_user", role="reader", username="bob", password="bobpw", active=True)
        wait_for(lambda: b.post({"operation": "describe_table", "database": "dev",
                                 "table": "breed"}).status_code == 200, timeout=20,
                 message="dev.breed on B")
        yield a, b
    finally:
        b.close()
        a.close()


def finished(node: Any, job_id: str) -> dict[str, Any]:
    """The job record once it is no longer in progress."""
    def done() -> dict[str, Any] | None:
        (record,) = node.call("get_job", id=job_id)
        return record if record["status"] != "IN_PROGRESS" else None

    return wait_for(done, timeout=30, message=f"job {job_id} to finish")


def started(response: dict[str, Any]) -> str:
    """The job id of Harper's ``Starting job with id ...`` answer."""
    assert set(response) == {"message", "job_id"}
    assert response["message"] == f"Starting job with id {response['job_id']}"
    return str(response["job_id"])


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


def test_job_permissions(mesh):
    """A role needs the action's table permission; file/URL loads and searches are for
    super users; another user's job cannot be read."""
    a, _ = mesh
    bob = ("bob", "bobpw")
    response = a.post({"operation": "csv_data_load", "database": "dev", "table": "breed",
                       "data": "id\n9"}, auth=bob)
    assert response.status_code == 403
    assert response.json()["unauthorized_access"][0]["required_table_permissions"] == [
        "insert"]
    response = a.post({"operation": "csv_data_load", "database": "dev", "table": "breed",
                       "action": "upsert", "data": "id\n9"}, auth=bob)
    assert response.json()["unauthorized_access"][0]["required_table_permissions"] == [
        "insert", "update"]
    for body in ({"operation": "csv_file_load", "table": "breed", "file_path": "/etc/hosts"},
                 {"operation": "csv_url_load", "table": "breed", "csv_url": "http://x/"},
                 {"operation": "search_jobs_by_start_date", "from_date": 0, "to_date": 1}):
        assert a.post(body, auth=bob).status_code == 403, body
    job_id = started(a.call("csv_data_load", database="dev", table="breed", data="id\n10"))
    finished(a, job_id)
    assert a.post({"operation": "get_job", "id": job_id}, auth=bob).status_code == 404


def test_search_jobs_by_start_date(mesh):
    """Jobs started in the window are listed oldest first; outside it they are not."""
    a, _ = mesh
    before = time.time() * 1000
    first = started(a.call("csv_data_load", database="dev", table="breed", data="id\n20"))
    second = started(a.call("csv_data_load", database="dev", table="breed", data="id\n21"))
    finished(a, first)
    finished(a, second)
    found = a.call("search_jobs_by_start_date", from_date=before, to_date=time.time() * 1000)
    assert [j["id"] for j in found] == [first, second]
    assert all(j["status"] == "COMPLETE" and "start_datetime_converted" in j for j in found)
    assert a.call("search_jobs_by_start_date", from_date="2020-01-01T00:00:00.000+0000",
                  to_date="2020-01-02T00:00:00Z") == []


# -- the transaction log ---------------------------------------------------------------
def _plain(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k not in TIMES} for r in records]


def cutoff_after(entry: dict[str, Any]) -> float:
    """A whole millisecond after ``entry``'s timestamp, once the clock has passed it by
    one more: a write from now on is stamped after the cutoff, and none shares its
    millisecond (a wall-clock reading could share one with the write just before it)."""
    cutoff = float(math.floor(entry["timestamp"]) + 1)
    wait_for(lambda: time.time() * 1000 >= cutoff + 1, timeout=5, interval=0.001,
             message="the clock passes the cutoff")
    return cutoff


def test_read_transaction_log_shape_and_filters(mesh):
    """Each write to the table is one entry, in order, with user, timestamp and records;
    from/to/limit filter; other tables stay out; only super users may read it."""
    node, _ = mesh
    node.call("create_table", database="dev", table="logdog", primary_key="id")
    node.call("create_table", database="dev", table="cat", primary_key="id")
    node.call("insert", database="dev", table="logdog",
              records=[{"id": 1, "dog_name": "Penny"}, {"id": 2, "dog_name": "Harper"}])
    node.call("insert", database="dev", table="cat", records=[{"id": 1}])
    middle = cutoff_after(node.call("read_transaction_log", database="dev", table="logdog")[-1])
    node.call("update", database="dev", table="logdog", records=[{"id": 1, "dog_name": "Penny B"}])
    node.call("sql", sql="DELETE FROM dev.logdog WHERE id = 2")
    log = node.call("read_transaction_log", schema="dev", table="logdog")
    assert [(e["operation"], e["user"]) for e in log] == [
        ("insert", "admin"), ("update", "admin"), ("delete", "admin")]
    assert _plain(log[0]["records"]) == [{"id": 1, "dog_name": "Penny"},
                                         {"id": 2, "dog_name": "Harper"}]
    assert all(isinstance(t, float) for r in log[0]["records"] for t in
               (r["__createdtime__"], r["__updatedtime__"]))
    assert _plain(log[1]["records"]) == [{"id": 1, "dog_name": "Penny B"}]
    assert log[2]["hash_values"] == [2] and log[2]["records"] == [{"id": 2}]
    stamps = [e["timestamp"] for e in log]
    assert stamps == sorted(stamps) and all(isinstance(s, float) for s in stamps)
    assert stamps[0] < middle <= stamps[1]
    later = node.call("read_transaction_log", database="dev", table="logdog", **{"from": middle})
    assert [e["operation"] for e in later] == ["update", "delete"]
    assert [e["operation"] for e in node.call("read_transaction_log", database="dev",
                                              table="logdog", to=middle)] == ["insert"]
    assert len(node.call("read_transaction_log", database="dev", table="logdog", limit=2)) == 2
    assert node.call("read_transaction_log", database="dev", table="logdog",
                     **{"from": middle, "to": middle - 1}, expect=400)["error"] == \
        "'to' is before 'from'"
    assert node.call("read_transaction_log", database="dev", table="nope",
                     expect=404)["error"] == "Table 'dev.nope' does not exist"
    for body in ({"operation": "read_transaction_log", "database": "dev", "table": "dog"},
                 {"operation": "delete_transaction_logs_before", "database": "dev",
                  "table": "dog", "timestamp": 1}):
        assert node.post(body, auth=("bob", "bobpw")).status_code == 403, body


def test_pruned_log_sends_a_lagging_peer_to_resync(mesh):
    """delete_transaction_logs_before prunes only what is older, answers with a job, and
    a peer that was down past the pruned point repairs itself to every record."""
    a, b = mesh
    a.call("create_table", database="dev", table="t", primary_key="id")
    a.call("insert", database="dev", table="t", records=[{"id": i} for i in range(1, 51)])
    wait_for(lambda: b.post({"operation": "describe_table", "database": "dev", "table": "t"})
             .status_code == 200 and b.count("t", "dev") == 50, timeout=20,
             message="50 records on B")
    b.stop()
    for start in range(51, 91, 10):
        a.call("insert", database="dev", table="t",
               records=[{"id": i} for i in range(start, start + 10)])
    cutoff = cutoff_after(a.call("read_transaction_log", database="dev", table="t")[-1])
    a.call("insert", database="dev", table="t", records=[{"id": 91}])
    response = a.call("delete_transaction_logs_before", schema="dev", table="t",
                      timestamp=cutoff)
    assert response["message"] == f"Starting job with id {response['job_id']}"
    record = finished(a, response["job_id"])
    # The table's create and its first five inserts; the insert after the cutoff stays.
    assert record["status"] == "COMPLETE" and record["result"]["removed"] == 6, record
    remaining = a.call("read_transaction_log", database="dev", table="t")
    assert [[r["id"] for r in e["records"]] for e in remaining] == [[91]]
    b.start()
    wait_for(lambda: b.count("t", "dev") == 91, timeout=40, message="B repaired to 91 records")
    a.call("insert", database="dev", table="t", records=[{"id": 92}])
    wait_for(lambda: b.count("t", "dev") == 92, timeout=20, message="streaming after the repair")


def test_delete_transaction_logs_before_a_huge_timestamp_deletes_all(node):
    """A timestamp past any version (even 1e308 ms) prunes the whole log; the job does
    not fail on the conversion to a version."""
    node.call("create_table", database="dev", table="t", primary_key="id")
    node.call("insert", database="dev", table="t", records=[{"id": 1}])
    record = finished(node, started(node.call("delete_transaction_logs_before",
                                              database="dev", table="t", timestamp=1e308)))
    assert record["status"] == "COMPLETE", record
    assert record["result"]["removed"] == 2, record
    assert node.call("read_transaction_log", database="dev", table="t") == []


def test_a_job_the_node_died_under_reads_as_failed(node_factory, csv_server):
    """After a SIGKILL mid-load, the restarted node reports the job failed (interrupted),
    with the progress it had made: every committed batch is saved in the record."""
    base, bodies = csv_server
    node = node_factory("jobs-crash", process=True)
    node.call("create_table", database="dev", table="big", primary_key="id")
    # The download stalls after one and a half batches: the first batch commits, then the
    # job waits for the rest.
    rows = BATCH + BATCH // 2
    bodies["/stall.csv"] = ("id,name\n" + "".join(f"{i},n{i}\n" for i in range(rows))).encode()
    job_id = started(node.call("csv_url_load", database="dev", table="big",
                               csv_url=f"{base}/stall.csv"))

    def loading() -> bool:
        (record,) = node.call("get_job", id=job_id)
        assert record["status"] == "IN_PROGRESS", record
        return record["progress"]["records"] == BATCH

    wait_for(loading, timeout=30, message="the first batch of the load")
    node.kill()
    node.start()
    (record,) = node.call("get_job", id=job_id)
    assert record["status"] == "ERROR", record
    assert "interrupted" in record["error"] and record["end_datetime"] is not None
    assert node.count("big", "dev") == BATCH
    assert record["progress"]["records"] == BATCH, record


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


@pytest.mark.timeout(60)
def test_stopping_the_node_ends_a_stalled_download(node, csv_server, monkeypatch):
    """A node stopping under a download that stalls stops at once (the worker thread
    blocked on the socket is woken), not after the download's read timeout; the job
    reads as interrupted, with the records written before."""
    monkeypatch.setattr("harpsync.csvsource.URL_TIMEOUT", 3600.0)
    base, bodies = csv_server
    node.call("create_table", database="dev", table="stalled", primary_key="id")
    bodies["/stall-stop.csv"] = ("id\n" + "".join(f"{i}\n" for i in range(BATCH + 5))).encode()
    job_id = started(node.call("csv_url_load", database="dev", table="stalled",
                               csv_url=f"{base}/stall-stop.csv"))
    wait_for(lambda: node.call("get_job", id=job_id)[0]["progress"]["records"] == BATCH,
             timeout=20, message="the first batch")
    stopping = threading.Thread(target=node.stop, daemon=True)
    stopping.start()
    try:
        wait_for(lambda: not stopping.is_alive(), timeout=15, message="the node to stop")
    finally:
        bodies.pop("/stall-stop.csv")  # if it failed: the download ends, the node stops
    node.start()
    (record,) = node.call("get_job", id=job_id)
    assert record["status"] == "ERROR" and "interrupted" in record["error"], record
    assert record["result"]["records"] == BATCH, record


def test_finished_job_records_are_pruned_by_count_and_age(node, monkeypatch):
    """Job records are bounded: past KEEP_JOBS (and a tenth more) the oldest finished
    ones go; at a restart, those that ended longer than KEEP_FOR_MS ago go too."""
    monkeypatch.setattr("harpsync.jobs.KEEP_JOBS", 3, raising=False)
    node.call("create_table", database="dev", table="kept", primary_key="id")
    since = time.time() * 1000
    ids = [finished(node, started(node.call("csv_data_load", database="dev", table="kept",
                                            data=f"id\n{i}\n")))["id"] for i in range(6)]
    listed = [j["id"] for j in node.call("search_jobs_by_start_date", from_date=since,
                                         to_date=time.time() * 1000)]
    assert 3 <= len(listed) <= 4 and listed == ids[-len(listed):], (listed, ids)
    assert node.call("get_job", id=ids[0], expect=404)["error"] == f"job '{ids[0]}' not found"
    monkeypatch.setattr("harpsync.jobs.KEEP_FOR_MS", 0.0, raising=False)
    node.restart()
    assert node.call("search_jobs_by_start_date", from_date=since,
                     to_date=time.time() * 1000) == []


def test_read_transaction_log_leaves_out_a_dropped_incarnation(node):
    """A table dropped and created again under the same name shows only its own
    writes: the dropped table's entries are another table's history."""
    node.call("create_table", database="dev", table="again", primary_key="id")
    node.call("insert", database="dev", table="again", records=[{"id": 1, "old": True}])
    node.call("drop_table", database="dev", table="again")
    node.call("create_table", database="dev", table="again", primary_key="id")
    node.call("insert", database="dev", table="again", records=[{"id": 2}])
    log = node.call("read_transaction_log", database="dev", table="again")
    assert [[r["id"] for r in e["records"]] for e in log] == [[2]], log


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


def test_a_load_stopped_midway_counts_the_batch_being_written(node):
    """A node stopping under a load lets the batch handed to the writer land and counts
    it: the interrupted job's counts are the rows in the table, not one batch fewer."""
    node.call("create_table", database="dev", table="counted", primary_key="id")
    data = "id,name\n" + "".join(f"{i},name-{i}\n" for i in range(BATCH * 40))
    job_id = started(node.call("csv_data_load", database="dev", table="counted", data=data))
    wait_for(lambda: node.call("get_job", id=job_id)[0]["progress"]["records"] >= BATCH,
             timeout=30, interval=0.005, message="the first batch")
    node.stop()
    node.start()
    (record,) = node.call("get_job", id=job_id)
    assert record["status"] == "ERROR" and "interrupted" in record["error"], record
    in_table = node.count("counted", "dev")
    assert record["result"]["records"] == record["progress"]["records"] == in_table, \
        (record["result"], record["progress"], in_table)


def test_delete_transaction_logs_before_takes_an_older_entry_that_arrived_late(mesh):
    """An entry older than the timestamp goes even when it reached the log after a newer
    one (a peer's write that arrived late): the log is not in time order."""
    a, b = mesh
    a.call("create_table", database="dev", table="late_log", primary_key="id")
    wait_for(lambda: b.post({"operation": "describe_table", "database": "dev",
                             "table": "late_log"}).status_code == 200, timeout=20,
             message="dev.late_log on B")
    a.call("pause_replication", hostname=b.name, database="dev")
    try:
        b.call("insert", database="dev", table="late_log", records=[{"id": "from-b"}])
        cutoff = cutoff_after(b.call("read_transaction_log", database="dev",
                                     table="late_log")[-1])
        a.call("insert", database="dev", table="late_log", records=[{"id": "from-a"}])
    finally:
        a.call("resume_replication", hostname=b.name, database="dev")
    wait_for(lambda: a.count("late_log", "dev") == 2, timeout=20, message="B's write on A")
    log = a.call("read_transaction_log", database="dev", table="late_log")
    assert [e["records"][0]["id"] for e in log] == ["from-a", "from-b"]  # newer one first
    record = finished(a, started(a.call("delete_transaction_logs_before", database="dev",
                                        table="late_log", timestamp=cutoff)))
    assert record["status"] == "COMPLETE", record
    log = a.call("read_transaction_log", database="dev", table="late_log")
    assert [e["records"][0]["id"] for e in log] == ["from-a"], log


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


def test_an_unreadable_job_store_is_set_aside(tmp_path):
    """A job store LMDB cannot read (progress is written unflushed: a power loss may
    leave it torn) is moved aside and a fresh one started, so the node still starts."""
    from harpsync.jobs import JobManager

    path = tmp_path / "jobs"
    JobManager.open(path).store.close()
    data = path / "data.mdb"
    data.write_bytes(b"\xff" * data.stat().st_size)
    manager = JobManager.open(path)
    try:
        assert list(manager.store.all()) == []
        assert [p.name.split("-")[0] for p in tmp_path.iterdir() if p != path] == \
            ["jobs.unreadable"]
    finally:
        manager.store.close()


def test_a_recreated_username_does_not_see_the_old_users_jobs(mesh):
    """A job belongs to the user who started it, not to whoever holds the name later."""
    a, _ = mesh
    a.call("add_role", role="loader", permission={
        "super_user": False, "dev": {"tables": {"breed": {
            "read": True, "insert": True, "update": False, "delete": False,
            "attribute_permissions": []}}}})
    a.call("add_user", role="loader", username="carol", password="first", active=True)
    response = a.post({"operation": "csv_data_load", "database": "dev", "table": "breed",
                       "data": "id\n300\n"}, auth=("carol", "first"))
    job_id = started(response.json())
    finished(a, job_id)
    assert a.post({"operation": "get_job", "id": job_id},
                  auth=("carol", "first")).status_code == 200
    a.call("drop_user", username="carol")
    a.call("add_user", role="reader", username="carol", password="second", active=True)
    assert a.post({"operation": "get_job", "id": job_id},
                  auth=("carol", "second")).status_code == 404


@pytest.mark.timeout(60)
def test_a_table_dropped_and_created_again_during_a_load_gets_none_of_its_rest(node,
                                                                              csv_server):
    """A load writes into the table it began with: after a drop and re-create under the
    same name, the rest of the file is not written into the new table."""
    base, bodies = csv_server
    node.call("create_table", database="dev", table="reborn", primary_key="id")
    bodies["/stall-reborn.csv"] = ("id\n" + "".join(f"{i}\n" for i in range(BATCH + 5))).encode()
    try:
        job_id = started(node.call("csv_url_load", database="dev", table="reborn",
                                   csv_url=f"{base}/stall-reborn.csv"))
        wait_for(lambda: node.call("get_job", id=job_id)[0]["progress"]["records"] == BATCH,
                 timeout=20, message="the first batch")
        node.call("drop_table", database="dev", table="reborn")
        node.call("create_table", database="dev", table="reborn", primary_key="id")
    finally:
        bodies.pop("/stall-reborn.csv")  # the download ends: its last rows are written
    record = finished(node, job_id)
    assert record["status"] == "ERROR", record
    assert "dropped and created again" in record["error"], record
    assert node.count("reborn", "dev") == 0
