"""Helpers shared by the CSV load, job and transaction log tests."""

from __future__ import annotations

from typing import Any

from tests.helpers import wait_for

TIMES = ("__createdtime__", "__updatedtime__")


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
