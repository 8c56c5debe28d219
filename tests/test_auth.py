"""Client tokens (api/auth.py): with GCODEFP_API_TOKENS_FILE set, the data endpoints need a bearer token,
a token limited to some machines cannot stream others, probes and scrapes stay open, and the file is
re-read without a restart (a broken file keeps the last good tokens)."""
from __future__ import annotations

import re
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone

import httpx
import pytest
from api_fixtures import REPO, start_uvicorn
from test_stream_api import N_ROWS, matrix, run_rows  # noqa: F401 (a fixture)

from api import auth
from api.client import APIAuthError, GCodeAPIClient

def utc_today():
    return datetime.now(timezone.utc).date()


# ---- the file -------------------------------------------------------------------------------------


def test_a_bad_line_is_refused_naming_the_file_and_line(tmp_path):
    good = f"a  sha256:{'0' * 64}  mill-*\n"
    for text, said in [("a sha256:abc\n", "64 lower-case hex"), ("a\n", "got 1 fields"),
                       (good + f"a  sha256:{'1' * 64}\n", "already used"),
                       (good + f"b  sha256:{'0' * 64}\n", "the same token as 'a'"),
                       (f"a  sha256:{'0' * 64}  mill/3\n", "machine glob"),
                       (f"a  b  sha256:{'0' * 64}  x  y\n", "NAME sha256:HEX")]:
        with pytest.raises(ValueError, match=re.escape(said)) as err:
            auth.parse("# tokens\n" + text, "tokens.txt")
        assert re.match(r"tokens\.txt:\d+: ", str(err.value))
    assert auth.parse("# only a comment\n\n" + good, "t") == {"0" * 64: auth.Token("a", ("mill-*",))}
    dated = auth.parse(f"a  sha256:{'0' * 64}  expires=2027-03-01\nb  sha256:{'1' * 64}  m-*  expires=2027-03-02\n", "t")
    assert [(t.name, t.machines, str(t.expires)) for t in dated.values()] == [("a", (), "2027-03-01"),
                                                                               ("b", ("m-*",), "2027-03-02")]
    with pytest.raises(ValueError, match=r"t:1: expires='2027-13-01': expected a day"):
        auth.parse(f"a  sha256:{'0' * 64}  expires=2027-13-01\n", "t")


def test_add_list_revoke_keep_digests_only_and_write_whole_files(tmp_path):
    path = tmp_path / "conf" / "tokens"
    monitor = auth.add(path, "line3-monitor", ["mill-3*", "lathe-07"])
    notebook = auth.add(path, "notebook")
    text = path.read_text()
    assert monitor not in text and notebook not in text and auth.digest(monitor) in text
    assert path.stat().st_mode & 0o077 == 0   # only its owner reads it
    assert [(t.name, t.machines) for t in auth.listing(path)] == [("line3-monitor", ("mill-3*", "lathe-07")),
                                                                   ("notebook", ())]
    with pytest.raises(ValueError, match="already used"):
        auth.add(path, "notebook")
    with pytest.raises(ValueError, match="token name"):
        auth.add(path, "two words")
    assert path.read_text() == text   # a refused add wrote nothing
    auth.revoke(path, "line3-monitor")
    assert [t.name for t in auth.listing(path)] == ["notebook"]
    with pytest.raises(KeyError):
        auth.revoke(path, "line3-monitor")
    assert sorted(p.name for p in path.parent.iterdir()) == ["tokens"]   # no temp file left behind


def test_the_table_follows_the_file_and_keeps_the_last_good_tokens(tmp_path, monkeypatch):
    monkeypatch.setattr(auth, "RECHECK_S", 0.0)
    path = tmp_path / "tokens"
    first = auth.add(path, "first", ["mill-*"])
    table = auth.TokenTable(path)
    assert table.check(f"Bearer {first}", "/stream/mill-1").name == "first"
    assert table.check(f"bearer {first}", "/predict").name == "first"   # the scheme is case-insensitive
    assert table.check(f"Bearer {first}", "/stream/lathe-1").reason == "machine"
    assert table.check(None, "/predict").reason == "missing"
    assert table.check(f"Basic {first}", "/predict").reason == "invalid"
    later = auth.add(path, "later", expires=utc_today() + timedelta(days=30))
    assert table.check(f"Bearer {later}", "/predict").name == "later"
    path.write_text(path.read_text().replace(f"expires={utc_today() + timedelta(days=30)}",
                                             f"expires={utc_today() - timedelta(days=1)}"))
    gone = table.check(f"Bearer {later}", "/predict")
    assert gone.reason == "expired" and "'later' expired on" in gone.message
    with pytest.raises(ValueError, match="a day after today"):
        auth.add(path, "already-over", expires=utc_today())
    second = auth.add(path, "second")
    assert table.check(f"Bearer {second}", "/stream/lathe-1").name == "second"   # picked up without a restart
    path.write_text(path.read_text() + "not a token line\n")
    assert table.check(f"Bearer {second}", "/predict").name == "second"  # broken: the last good tokens stay
    path.unlink()
    assert table.check(f"Bearer {first}", "/predict").name == "first"    # gone: likewise
    with pytest.raises(ValueError, match="no such file"):
        auth.TokenTable(path)


def test_which_paths_need_a_token():
    assert all(auth.protected(p) for p in ("/predict", "/batch_predict", "/fingerprint", "/stream/m1",
                                           "/v2/models/gcodefp/infer", "/v2/models/gcodefp/versions/v1/infer"))
    assert not any(auth.protected(p) for p in ("/", "/health", "/ready", "/info", "/metrics", "/docs", "/openapi.json",
                                               "/admin/reload", "/v2", "/v2/health/ready", "/v2/models/gcodefp",
                                               "/v2/models/gcodefp/ready"))


# ---- a server that asks for tokens -------------------------------------------------------------------
@pytest.fixture(scope="module")
def tokens_server(api_registry, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("auth")
    path = tmp / "tokens"
    server = None
    keys = {"monitor": auth.add(path, "monitor", ["mill-3*"]), "any": auth.add(path, "any")}
    try:
        server = start_uvicorn(tmp, GCODEFP_REGISTRY=api_registry, GCODEFP_API_TOKENS_FILE=path)
        server.tokens_path, server.keys = path, keys
        yield server
    finally:
        if server is not None:
            server.stop()


def bearer(token: str) -> dict:
    return {"authorization": f"Bearer {token}"}


def refused(server, endpoint: str, reason: str) -> float:
    text = httpx.get(f"{server.url}/metrics").text
    m = re.search(rf'^gcodefp_auth_refused_total\{{endpoint="{re.escape(endpoint)}",reason="{reason}"\}} (\S+)', text, re.M)
    return float(m.group(1)) if m else 0.0


slow = pytest.mark.slow


@slow
def test_data_endpoints_need_a_token_and_probes_do_not(tokens_server, sample_request):
    s, keys = tokens_server, tokens_server.keys
    with httpx.Client(base_url=s.url, timeout=30) as http:
        for path in ("/health", "/ready", "/info", "/metrics", "/openapi.json", "/v2", "/v2/health/ready"):
            assert http.get(path).status_code == 200, path
        assert http.get("/info").json()["client_tokens"] is True   # a client can tell before it calls
        missing = refused(s, "/predict", "missing")
        r = http.post("/predict", json=sample_request)
        assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
        assert "Authorization: Bearer" in r.json()["error"] and "x-request-id" in r.headers
        assert refused(s, "/predict", "missing") == missing + 1
        assert http.post("/predict", json=sample_request, headers=bearer("not-a-token")).status_code == 401
        assert http.post("/v2/models/gcodefp/infer", json={}).status_code == 401
        for key in keys.values():
            r = http.post("/predict", json=sample_request, headers=bearer(key))
            assert r.status_code == 200 and r.json()["gcode_sequence"]
        # a token does not reach the admin endpoint, which keeps its own token
        assert http.post("/admin/reload", headers=bearer(keys["any"])).status_code in (401, 403, 404)

        doc = http.get("/openapi.json").json()
        assert doc["components"]["securitySchemes"]["clientToken"]["scheme"] == "bearer"
        assert doc["paths"]["/predict"]["post"]["security"] == [{"clientToken": []}]
        assert "security" not in doc["paths"]["/health"]["get"]


@slow
def test_a_token_limited_to_some_machines_streams_only_those(tokens_server, run_rows):
    s, keys = tokens_server, tokens_server.keys
    cont, cat = run_rows
    doc = {"sensor_data": matrix(cont, cat, 0, 16), "start": True}
    with httpx.Client(base_url=s.url, timeout=30) as http:
        assert http.post("/stream/mill-3a", json=doc, headers=bearer(keys["monitor"])).status_code == 200
        r = http.post("/stream/mill-9", json=doc, headers=bearer(keys["monitor"]))
        assert r.status_code == 403 and "mill-9" in r.json()["error"] and "mill-3*" in r.json()["error"]
        assert http.get("/stream/mill-9", headers=bearer(keys["monitor"])).status_code == 403
        # a path that only looks like one of its machines reaches no other machine
        for sneaky in ("/stream/mill-3a%2F..%2Fmill-9", "/stream/mill-3%2A"):
            assert http.post(sneaky, json=doc, headers=bearer(keys["monitor"])).status_code == 422
        # the refused rows were never applied: the machine has no session
        assert http.get("/stream/mill-9", headers=bearer(keys["any"])).status_code == 404
        assert http.get("/stream/mill-3a", headers=bearer(keys["monitor"])).json()["rows_since_start"] == 16
        assert refused(s, "/stream/{machine_id}", "machine") >= 2
    # the access log says which token posted a machine's rows, and which was refused for which machine
    logged = s.log_records()
    assert any(r.get("event") == "request" and r["path"] == "/stream/mill-3a" and r["method"] == "POST"
               and r.get("token") == "monitor" for r in logged)
    assert any(r.get("event") == "auth_refused" and r["path"] == "/stream/mill-9" and r["reason"] == "machine"
               and "'monitor'" in r["error"] for r in logged)


@slow
def test_the_client_sends_its_token_and_raises_auth_errors(tokens_server, sample_request, run_rows, monkeypatch):
    s, keys = tokens_server, tokens_server.keys
    cont, cat = run_rows
    window = sample_request["sensor_data"]
    with GCodeAPIClient(s.url, token=keys["monitor"]) as api:
        assert api.predict(window["continuous"], window["categorical"])["gcode_sequence"]
        assert api.stream("mill-3b", cont[:8], cat[:8], start=True)["rows_since_start"] == 8
        with pytest.raises(APIAuthError) as err:
            api.stream("lathe-1", cont[:8], cat[:8], start=True)
        assert err.value.status == 403
    monkeypatch.setenv("GCODEFP_API_TOKEN", keys["any"])
    with GCodeAPIClient(s.url) as api:   # the environment's token
        assert api.stream("lathe-1", cont[:8], cat[:8], start=True)["rows_since_start"] == 8
    monkeypatch.delenv("GCODEFP_API_TOKEN")
    with GCodeAPIClient(s.url) as api, pytest.raises(APIAuthError, match="HTTP 401"):
        api.predict(window["continuous"], window["categorical"])


@slow
def test_tokens_change_without_a_restart(tokens_server, sample_request):
    s = tokens_server
    late = auth.add(s.tokens_path, "late")

    def status(token: str) -> int:
        return httpx.post(f"{s.url}/predict", json=sample_request, headers=bearer(token), timeout=30).status_code

    def settles(token: str, want: int) -> bool:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if status(token) == want:
                return True
            time.sleep(0.2)
        return False

    assert settles(late, 200)
    auth.revoke(s.tokens_path, "late")
    assert settles(late, 401)
    good = s.tokens_path.read_text()
    try:
        s.tokens_path.write_text(good + "garbage\n")   # a broken edit: the last good tokens stay
        deadline = time.monotonic() + 10
        while "api_tokens_invalid" not in s.log_text() and time.monotonic() < deadline:
            status(s.keys["any"])
            time.sleep(0.2)
        assert "api_tokens_invalid" in s.log_text() and status(s.keys["any"]) == 200
    finally:
        s.tokens_path.write_text(good)


def test_serve_refuses_a_bad_tokens_file_in_one_line(tmp_path, api_registry):
    bad = tmp_path / "tokens"
    bad.write_text("monitor  not-a-digest\n")
    done = subprocess.run([sys.executable, "-m", "gcodefp_core.cli", "serve", "--registry", str(api_registry),
                           "--tokens", str(bad), "--port", "1"], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode != 0 and f"{bad}:1:" in done.stderr and "Traceback" not in done.stderr


def test_the_token_command_prints_a_token_once_and_lists_names(tmp_path):
    path = tmp_path / "tokens"
    run = lambda *a: subprocess.run([sys.executable, "-m", "gcodefp_core.cli", "token", *a, "--file", str(path)],  # noqa: E731
                                    capture_output=True, text=True, cwd=REPO, timeout=120)
    added = run("add", "line3-monitor", "--machines", "mill-3*")
    assert added.returncode == 0, added.stderr
    token = added.stdout.strip()
    assert auth.TokenTable(path).check(f"Bearer {token}", "/stream/mill-31").name == "line3-monitor"
    assert run("list").stdout.split() == ["line3-monitor", "mill-3*", "never"]
    dated = run("add", "notebook", "--days", "30")
    assert dated.returncode == 0, dated.stderr
    assert run("list").stdout.split()[3:] == ["notebook", "*", str(utc_today() + timedelta(days=30))]
    assert run("revoke", "notebook").returncode == 0
    assert token not in run("list").stdout + path.read_text()
    assert run("revoke", "line3-monitor").returncode == 0 and auth.listing(path) == []
    gone = run("revoke", "line3-monitor")
    assert gone.returncode == 2 and "no token named" in gone.stderr and "Traceback" not in gone.stderr
