"""Job records: get_job, search_jobs_by_start_date, who sees them, pruning, stops."""

from __future__ import annotations

import threading
import time

import pytest

from operations.bulk import BATCH
from tests.bulk_jobs.util import finished, started
from tests.helpers import wait_for


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
