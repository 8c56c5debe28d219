"""A served worker's memory between requests: what a request frees stays in the worker's heap for the
next one instead of going back to the OS and being faulted in again (api/app.py, GCODEFP_HEAP_TRIM_KB)."""
from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest
from api_fixtures import start_uvicorn


def minor_faults(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[7])


def faults_per_request(server, body: bytes, n: int = 60) -> float:
    headers = {"content-type": "application/json"}
    with httpx.Client(base_url=server.url, timeout=30, headers=headers) as c:
        for _ in range(20):   # warm-up: the first requests grow the heap for good
            assert c.post("/predict", content=body).status_code == 200
        before = minor_faults(server.proc.pid)
        for _ in range(n):
            assert c.post("/predict", content=body).status_code == 200
            time.sleep(0.005)   # a caller's pace, not back to back
        return (minor_faults(server.proc.pid) - before) / n


@pytest.mark.parametrize("trim_kb, expect_churn", [(None, False), (128, True)])
def test_a_request_does_not_fault_its_memory_back_in(api_registry, tmp_path, sample_request, trim_kb, expect_churn):
    """The package's sample request, one window: its body and its parsed and normalised arrays are a few
    hundred KB freed each time, each block under the 1 MB that goes to a mapping of its own. With
    the server's default trim threshold a worker takes almost no page faults per request; at glibc's 128 KB (the
    setting before) it returned that memory after every request and faulted it in again."""
    env = {"GCODEFP_REGISTRY": api_registry}
    if trim_kb is not None:
        env["GCODEFP_HEAP_TRIM_KB"] = trim_kb
    server = start_uvicorn(tmp_path, **env)
    try:
        per_request = faults_per_request(server, json.dumps(sample_request).encode())
    finally:
        server.stop()
    if expect_churn:   # shows the test can tell: the old setting faults the freed memory back in
        assert per_request > 5, per_request
    else:
        assert per_request < 2, per_request
