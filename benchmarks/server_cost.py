"""The server's own CPU per request, without sockets or a load generator: a diagnosis, not a headline.

    python benchmarks/server_cost.py --registry artifacts/registry [--requests 2000] [--profile]

benchmarks/serving.py measures what a caller gets, with the load generator on the same 2 cores and a
VM whose speed swings; its server CPU per request mixes both. This script loads the served app
(api.app:app, the package the registry names, the server's defaults) in this process and drives it
through ASGI calls one after the other: no HTTP parsing by uvicorn, no client, no batching partners.
What is left is the app's own work per request (routing, middleware, metrics, parsing, model,
tracker, answer) in process CPU time, comparable between commits run in the same hour. Modes:
- json: POST /predict with the package's sample_request.json;
- binary: POST /predict with the same window as float32;
- stream: POST /stream/{machine} with 4-row chunks, 200 machines in turn (the tracker mode).
With --profile, cProfile splits each mode into the endpoint function and the stack around it, and
lists the functions with the most own time. The access log goes to a file, as `gcodefp serve` runs.
Writes results/server_cost.json and prints a table.
"""
from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import os
import pstats
import sys
import tempfile
import time
from pathlib import Path

import machine_speed  # benchmarks/machine_speed.py: the VM's speed beside the figures
import serving  # benchmarks/serving.py: the request bodies of each mode

ENDPOINTS = {"json": "predict", "binary": "predict", "stream": "stream_post"}
MACHINES = 200


def _body(raw: bytes) -> tuple[str, bytes, bytes]:
    """Raw HTTP request bytes (as serving.py sends them) -> (path, content type, body)."""
    head, body = raw.split(b"\r\n\r\n", 1)
    lines = head.split(b"\r\n")
    ctype = next(v.split(b":", 1)[1].strip() for v in lines if v.lower().startswith(b"content-type:"))
    return lines[0].split()[1].decode(), ctype, body


async def call(app, path: str, ctype: bytes, body: bytes) -> int:
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "", "state": {},
             "headers": [(b"host", b"127.0.0.1"), (b"content-type", ctype),
                         (b"content-length", str(len(body)).encode())],
             "client": ("127.0.0.1", 40000), "server": ("127.0.0.1", 8000)}
    messages = [{"type": "http.request", "body": body, "more_body": False}]
    status = 0

    async def receive():
        if messages:
            return messages.pop()
        await asyncio.sleep(3600)  # a client that stays connected

    async def send(message):
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    await app(scope, receive, send)
    return status


def profile_split(prof: cProfile.Profile, endpoint: str, top: int = 12) -> dict:
    stats = pstats.Stats(prof)
    total = stats.total_tt
    inside = max((v[3] for (f, _, name), v in stats.stats.items() if name == endpoint and "/api/" in f), default=0.0)
    own = sorted(((v[2], f"{Path(f).name}:{name}") for (f, _, name), v in stats.stats.items()), reverse=True)[:top]
    return {"endpoint_share": round(inside / total, 3) if total else 0.0,
            "top_own_time": [{"function": n, "share": round(t / total, 3)} for t, n in own]}


async def measure(app, mode: str, req: dict, n: int, profile: bool) -> dict:
    def request(i: int):
        if mode == "stream":
            return _body(req["stream_chunk"](i % MACHINES, i // MACHINES))
        return _body(req[mode])

    warm = MACHINES * 2 if mode == "stream" else 100
    if mode == "stream":
        for m in range(MACHINES):
            await call(app, *_body(req["stream_first"](m)))
    for i in range(warm):
        assert await call(app, *request(i)) == 200, f"{mode}: warm-up request {i} failed"
    prepared = [request(warm + i) for i in range(n)]
    prof = cProfile.Profile() if profile else None
    errors = 0
    t0, w0 = time.process_time(), time.perf_counter()
    if prof:
        prof.enable()
    for r in prepared:
        errors += await call(app, *r) != 200
    if prof:
        prof.disable()
    cpu, wall = time.process_time() - t0, time.perf_counter() - w0
    out = {"mode": mode, "requests": n, "errors": errors, "cpu_ms_per_request": round(cpu * 1000 / n, 3),
           "wall_ms_per_request": round(wall * 1000 / n, 3)}
    if prof:
        out["profile"] = profile_split(prof, ENDPOINTS[mode])
    return out


async def run(registry: Path, modes: list[str], n: int, profile: bool) -> list[dict]:
    from api.app import app, lifespan  # after the environment is set: the settings are read at import

    package = registry / "packages" / (registry / "CURRENT").read_text().strip()
    req = serving.bodies(package, 8, 4)
    async with lifespan(app):
        return [await measure(app, mode, req, n, profile) for mode in modes]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--registry", type=Path, required=True)
    ap.add_argument("--modes", nargs="+", default=["json", "binary", "stream"], choices=list(ENDPOINTS))
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--output", type=Path, default=Path("results/server_cost.json"))
    args = ap.parse_args()
    if not (args.registry / "CURRENT").is_file():
        raise SystemExit(f"--registry {args.registry}: no CURRENT file (not a registry the pipeline wrote)")
    os.environ["GCODEFP_REGISTRY"] = str(args.registry.resolve())
    os.environ.pop("GCODEFP_PACKAGE", None)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="gcodefp-metrics-")  # as `gcodefp serve`
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    log_path = Path(tempfile.mkstemp(prefix="server_cost_", suffix=".log")[1])
    real_stderr, sys.stderr = sys.stderr, open(log_path, "w")  # the app's JSON logs go to a file
    try:
        package = args.registry / "packages" / (args.registry / "CURRENT").read_text().strip()
        speed = machine_speed.machine_speed(package)
        results = asyncio.run(run(args.registry, args.modes, args.requests, args.profile))
    finally:
        sys.stderr.close()
        sys.stderr = real_stderr
    from api.settings import SETTINGS

    print(f"machine speed: {speed}; direct routes: {SETTINGS.direct_routes}")
    print("| mode | requests | errors | server CPU ms/request | wall ms/request | endpoint share |")
    print("|---|---|---|---|---|---|")
    for r in results:
        share = r.get("profile", {}).get("endpoint_share", "")
        print(f"| {r['mode']} | {r['requests']} | {r['errors']} | {r['cpu_ms_per_request']} | "
              f"{r['wall_ms_per_request']} | {share} |")
        for f in r.get("profile", {}).get("top_own_time", [])[:8]:
            print(f"|   {f['function']} | | | | | {f['share']} |")
    doc = {"registry": str(args.registry), "package": (args.registry / "CURRENT").read_text().strip(),
           "direct_routes": SETTINGS.direct_routes,  # GCODEFP_DIRECT_ROUTES=0: every request through FastAPI's router
           "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine_speed": speed, "results": results,
           "log": str(log_path)}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.output.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    tmp.replace(args.output)
    print(f"wrote {args.output}")
    return 1 if any(r["errors"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
