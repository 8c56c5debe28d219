"""Every monitor reconnects at once: what following machines through a network drop costs.

`gcodefp serve --workers 2` on the registry's current package. N machines post 4-row chunks once a
second on a connection each (as benchmarks/serving.py's /stream sweep), then every machine closes its
connection at the same moment and opens a new one, as after a network drop or a client restart, and
goes on posting. A new connection reaches either worker (api/supervisor.py), so about half of the
machines land on a worker that does not hold them, which takes each over from the worker that does
(api/stream_handoff.py). Reported per N: the chunks' latency before and in the seconds after the
reconnect (p50 / p99, from each chunk's due time), errors, how many machines kept their place (the
first chunk after the reconnect continues the row count) and how many started again, the server's
handoff counts, and the sessions held at the end (one per machine: no stale copies).

--retry-last: each monitor is unsure whether its last chunk before the drop was applied (its answer may
have been lost with the connection) and sends it again on the new connection, with its Idempotency-Key,
as api.client does. Counted: retries answered with the original answer byte for byte (`replayed`), and
the machines whose rows were still counted once.

    .venv/bin/python benchmarks/stream_reconnect.py --registry artifacts/registry [--machines 250 500 1000]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
import http_load  # noqa: E402
import serving  # noqa: E402
from http_load import clock  # noqa: E402


async def follow(port: int, req: dict, machines: int, before_s: float, after_s: float,
                 retry_last: bool = False) -> dict:
    """machines x (a start chunk; a chunk a second for before_s; all reconnect at once; a chunk a second
    for after_s) -> latencies before / after, errors, and each machine's first answer after the reconnect."""
    conns: list = [None] * machines
    gate = asyncio.Semaphore(64)

    async def prime(i: int):
        async with gate:
            conns[i] = await http_load.Connection.open(port)
            status, payload = await conns[i].send(req["stream_first"](i))
            if status != 200:
                raise RuntimeError(f"stream start failed: HTTP {status} {payload[:200]!r}")

    await asyncio.gather(*(prime(i) for i in range(machines)))
    lat = {"before": [], "after": []}
    errors, first_after, replayed = [], [None] * machines, 0
    start = clock() + 0.1
    ticks_before, ticks = int(before_s), int(before_s) + int(after_s)
    reconnect_at = start + ticks_before

    async def machine(i: int):
        nonlocal replayed
        conn, last = conns[i], None
        for k in range(ticks):
            due = start + k + i / machines
            if (delay := due - clock()) > 0:
                await asyncio.sleep(delay)
            if k == ticks_before:   # the drop: every machine on a new connection, at once
                conn.close()
                conn = await http_load.Connection.open(port)
                if retry_last and last is not None:   # the last chunk again, same bytes, same key
                    status, payload = await conn.send(last[0])
                    replayed += status == 200 and payload == last[1]
                    if status != 200:
                        errors.append(f"retry: HTTP {status}: {payload[:160]!r}")
            try:
                last = [req["stream_chunk"](i, k), None]
                status, payload = await conn.send(last[0])
                last[1] = payload
            except Exception as exc:
                status, payload = 599, repr(exc).encode()
                conn.close()
                conn = await http_load.Connection.open(port)
            phase = "after" if k >= ticks_before else "before"
            lat[phase].append((clock() - due) * 1000)
            if status != 200:
                errors.append(f"HTTP {status}: {payload[:160]!r}")
            elif k == ticks_before:
                first_after[i] = json.loads(payload)
        conn.close()

    await asyncio.gather(*(machine(i) for i in range(machines)))
    kept = sum(1 for a in first_after if a and not a["started"] and a["rows_since_start"] == 4 * (ticks_before + 2))
    restarted = sum(1 for a in first_after if a and a["started"])

    def pct(xs, q):
        return round(float(np.percentile(xs, q)), 2) if xs else None

    # the seconds right after the drop: every machine's first chunks there
    return {"machines": machines, "reconnect_at_s": round(reconnect_at - start, 1), "errors": len(errors),
            "error_samples": errors[:3], "kept_their_place": kept, "started_again": restarted,
            "retried_last": machines if retry_last else 0, "replayed": replayed,
            "before_p50_ms": pct(lat["before"], 50), "before_p99_ms": pct(lat["before"], 99),
            "after_p50_ms": pct(lat["after"], 50), "after_p99_ms": pct(lat["after"], 99),
            "after_max_ms": round(max(lat["after"]), 1) if lat["after"] else None}


def handoffs(metrics_text: str) -> dict:
    out = {}
    for line in metrics_text.splitlines():
        if line.startswith("gcodefp_stream_handoffs_total{"):
            out[line.split('result="')[1].split('"')[0]] = int(float(line.split()[-1]))
        elif line.startswith("gcodefp_stream_sessions "):
            out["sessions_held"] = int(float(line.split()[-1]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--registry", type=Path, required=True)
    ap.add_argument("--machines", type=int, nargs="+", default=[250, 500, 1000])
    ap.add_argument("--before", type=float, default=5.0, help="seconds of chunks before the reconnect")
    ap.add_argument("--after", type=float, default=6.0, help="seconds of chunks after it")
    ap.add_argument("--retry-last", action="store_true", help="every monitor sends its last chunk again after the drop")
    ap.add_argument("--output", type=Path, default=None, help="default results/stream_reconnect[_retry].json")
    args = ap.parse_args()
    version = (args.registry / "CURRENT").read_text().strip()
    package = args.registry / "packages" / version
    req = serving.bodies(package, 8, 4)
    steps = []
    for n in args.machines:   # a fresh server per step: its handoff counts and sessions are the step's own
        with tempfile.TemporaryDirectory() as tmp:
            server = serving.Server(args.registry, 2, Path(tmp) / "server.log")
            try:
                step = http_load.run(follow(server.port, req, n, args.before, args.after, args.retry_last))
                step |= handoffs(server.metrics())
            finally:
                server.stop()
        steps.append(step)
        print(json.dumps(step), flush=True)
    head = ("machines", "kept_their_place", "started_again", "replayed", "received", "timed_out", "sessions_held", "errors",
            "before_p99_ms", "after_p50_ms", "after_p99_ms", "after_max_ms")
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for s in steps:
        print("| " + " | ".join(str(s.get(h, 0)) for h in head) + " |")
    result = {"package": version, "date": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "workers": 2,
              "retry_last": args.retry_last,
              "steps": steps}
    args.output = args.output or REPO / "results" / f"stream_reconnect{'_retry' if args.retry_last else ''}.json"
    args.output.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.output.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(args.output)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
