"""The OpenAPI document is the contract: a bounded `schemathesis run --checks all` against a served tiny
package on loopback finds no failure and no server error.

Bounded: a few examples per operation and phase (GCODEFP_CONTRACT_EXAMPLES, default 8), one worker,
so the run stays around a minute. The admin endpoint is off on this server (no token), so it answers
its documented 404. The JUnit report lands in the test's temporary folder.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from api_fixtures import start_uvicorn

pytestmark = pytest.mark.slow
EXAMPLES = int(os.environ.get("GCODEFP_CONTRACT_EXAMPLES", "8"))


def schemathesis_bin() -> str | None:
    exe = Path(sys.executable).with_name("schemathesis")
    return str(exe) if exe.exists() else shutil.which("schemathesis")


@pytest.fixture(scope="module")
def contract_server(api_registry, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("contract")
    server = start_uvicorn(tmp, GCODEFP_PACKAGE=api_registry / "packages" / "v1", GCODEFP_MAX_BATCH=4,
                           GCODEFP_MAX_STREAMS=50)
    server.tmp = tmp
    yield server
    server.stop()


def test_openapi_documents_real_responses(contract_server):
    import httpx

    doc = httpx.get(f"{contract_server.url}/openapi.json", timeout=30).json()
    ops = {(path, method): op for path, item in doc["paths"].items() for method, op in item.items()}
    for key in [("/predict", "post"), ("/batch_predict", "post"), ("/fingerprint", "post")]:
        assert {"200", "413", "422", "503"} <= set(ops[key]["responses"]), key
    assert {"200", "404"} <= set(ops[("/stream/{machine_id}", "get")]["responses"])
    assert "text/plain" in ops[("/metrics", "get")]["responses"]["200"]["content"]
    assert {"200", "400", "404"} <= set(ops[("/v2/models/{name}/infer", "post")]["responses"])
    window = doc["paths"]["/predict"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    rows = window["properties"]["sensor_data"]["properties"]["continuous"]
    assert rows["minItems"] == rows["maxItems"] > 1  # the served model's window, filled in


def test_schemathesis_finds_nothing(contract_server):
    exe = schemathesis_bin()
    if exe is None:
        pytest.skip("schemathesis is not installed (pip install -e '.[dev]')")
    junit = contract_server.tmp / "schemathesis.xml"
    cmd = [exe, "--config-file", str(Path(__file__).with_name("schemathesis.toml")), "run",
           f"{contract_server.url}/openapi.json", "--checks", "all", "--max-examples", str(EXAMPLES),
           "--workers", "1", "--seed", "1", "--report", "junit", "--report-junit-path", str(junit),
           "--request-timeout", "30", "--suppress-health-check", "all", "--no-color"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=contract_server.tmp,  # its cache
                         env={**os.environ, "SCHEMATHESIS_HOOKS": ""})
    text = out.stdout + out.stderr
    print(text[-6000:])
    assert out.returncode == 0, text[-6000:]
    suite = ET.parse(junit).getroot()
    failures = sum(int(s.get("failures", 0)) + int(s.get("errors", 0)) for s in suite.iter("testsuite"))
    assert failures == 0 and int(suite.find("testsuite").get("tests", 0)) > 10, text[-3000:]
    assert "Server error" not in text
