"""The load generator of benchmarks/serving.py: open-loop and closed-loop HTTP/1.1 on loopback.

It shares the machine's cores with the server, so it is lean: raw keep-alive connections on
asyncio streams (uvloop when installed), a request's bytes built once, no HTTP library per request.
Open loop: request i is due at start + i/rate and its latency counts from that time, so a server
that falls behind shows its queueing (no coordinated omission); a request waiting for a free
connection is waiting too. Closed loop: C connections, each sending its next request when the
previous one is answered. /stream: every machine owns one connection (so its session stays on one
worker) and posts its chunk once a period, staggered over the period.
"""
from __future__ import annotations

import asyncio
from time import perf_counter as clock  # uvloop's loop.time() has 1 ms resolution

import numpy as np


def request_bytes(path: str, body: bytes, content_type: str = "application/json", headers: dict | None = None) -> bytes:
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n{extra}"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


class Connection:
    def __init__(self, reader, writer):
        self.reader, self.writer = reader, writer
        self.last_used = clock()

    @classmethod
    async def open(cls, port: int) -> "Connection":
        return cls(*await asyncio.open_connection("127.0.0.1", port))

    async def send(self, request: bytes) -> tuple[int, bytes]:
        self.last_used = clock()
        self.writer.write(request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n"):
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        return int(head[9:12]), await self.reader.readexactly(length)

    def close(self) -> None:
        self.writer.close()


class Tally:
    def __init__(self):
        self.latencies: list[float] = []
        self.errors: list[str] = []
        self.bodies: list[bytes] = []  # a few answers, to read server-side fields from
        self.versions: dict[str, int] = {}  # answers per model_version (a hot swap's progress)

    def record(self, ms: float, status: int, payload: bytes) -> None:
        self.latencies.append(ms)
        if status != 200:
            self.errors.append(f"HTTP {status}: {payload[:160]!r}")
            return
        if len(self.bodies) < 500:
            self.bodies.append(payload)
        i = payload.find(b'"model_version":"')
        if i >= 0:
            v = payload[i + 17:payload.index(b'"', i + 17)].decode()
            self.versions[v] = self.versions.get(v, 0) + 1

    def summary(self, elapsed: float, **extra) -> dict:
        lat = np.asarray(self.latencies) if self.latencies else np.asarray([np.nan])
        q = np.percentile(lat, [50, 90, 95, 99])
        return {**extra, "requests": len(self.latencies), "achieved_rate": round(len(self.latencies) / elapsed, 1),
                "errors": len(self.errors), "error_samples": self.errors[:3],
                "shed": sum(e.startswith("HTTP 503") and "overloaded" in e for e in self.errors),  # of the errors
                **{f"p{p}_ms": round(float(v), 3) for p, v in zip((50, 90, 95, 99), q)},
                "max_ms": round(float(lat.max()), 3), "versions": self.versions}


IDLE_CLOSED_S = 4.0  # uvicorn closes a keep-alive connection idle for 5 s; one idle this long may be gone


async def _guarded(conn_pool: asyncio.Queue, port: int, request: bytes, due: float, tally: Tally) -> None:
    conn = await conn_pool.get()
    try:
        if clock() - conn.last_used > IDLE_CLOSED_S:  # what an HTTP client does: a fresh connection
            conn.close()
            conn = await Connection.open(port)
        status, payload = await conn.send(request)
        tally.record((clock() - due) * 1000, status, payload)
        conn_pool.put_nowait(conn)
    except Exception as exc:  # a broken connection: count it, replace it
        tally.record((clock() - due) * 1000, 599, repr(exc).encode())
        conn.close()
        conn_pool.put_nowait(await Connection.open(port))


async def open_loop(port: int, request: bytes, rate: float, duration: float, connections: int = 128,
                    at_half=None) -> tuple[dict, "Tally"]:
    pool: asyncio.Queue = asyncio.LifoQueue()  # the most recently used connection first: few stay busy
    conns = [await Connection.open(port) for _ in range(connections)]
    for c in conns:
        pool.put_nowait(c)
    tally, tasks = Tally(), []
    n = int(rate * duration)
    start = clock() + 0.05
    for i in range(n):
        due = start + i / rate
        if (delay := due - clock()) > 0:
            await asyncio.sleep(delay)
        if at_half is not None and i == n // 2:
            at_half()
        tasks.append(asyncio.create_task(_guarded(pool, port, request, due, tally)))
    await asyncio.gather(*tasks)
    elapsed = clock() - start
    while not pool.empty():
        pool.get_nowait().close()
    return tally.summary(elapsed, offered_rate=rate, duration_s=duration), tally


async def closed_loop(port: int, request: bytes, concurrency: int, duration: float) -> tuple[dict, "Tally"]:
    tally = Tally()
    stop = clock() + duration

    async def lane():
        conn = await Connection.open(port)
        while clock() < stop:
            t0 = clock()
            try:
                status, payload = await conn.send(request)
            except Exception as exc:
                status, payload = 599, repr(exc).encode()
                conn.close()
                conn = await Connection.open(port)
            tally.record((clock() - t0) * 1000, status, payload)
        conn.close()

    t0 = clock()
    await asyncio.gather(*(lane() for _ in range(concurrency)))
    return tally.summary(clock() - t0, concurrency=concurrency, duration_s=duration), tally


async def stream_machines(port: int, machines: int, first_chunk, chunk, duration: float,
                          period: float = 1.0) -> tuple[dict, "Tally"]:
    """machines x (one start chunk, untimed; then `chunk(i, k)` bytes every `period` s for `duration` s).
    first_chunk(i) / chunk(i, k) give machine i's request bytes. A machine whose connection idled past
    the server's keep-alive (a slow start phase) reconnects; with several workers that may reach
    another worker, which starts the machine over: counted as `restarted` (not an error)."""
    tally, restarted = Tally(), 0
    conns: list = [None] * machines
    gate = asyncio.Semaphore(64)

    async def prime(i: int):
        async with gate:
            conns[i] = await Connection.open(port)
            status, payload = await conns[i].send(first_chunk(i))
            if status != 200:
                raise RuntimeError(f"stream start failed: HTTP {status} {payload[:200]!r}")

    await asyncio.gather(*(prime(i) for i in range(machines)))
    start = clock() + 0.1
    ticks = int(duration / period)

    async def machine(i: int):
        nonlocal restarted
        conn = conns[i]
        for k in range(ticks):
            due = start + k * period + period * i / machines
            if (delay := due - clock()) > 0:
                await asyncio.sleep(delay)
            if clock() - conn.last_used > IDLE_CLOSED_S:
                conn.close()
                conn = await Connection.open(port)
            try:
                status, payload = await conn.send(chunk(i, k))
                restarted += b'"started":true' in payload
            except Exception as exc:
                status, payload = 599, repr(exc).encode()
                conn.close()
                conn = await Connection.open(port)
            tally.record((clock() - due) * 1000, status, payload)
        conn.close()

    await asyncio.gather(*(machine(i) for i in range(machines)))
    elapsed = clock() - start
    return tally.summary(elapsed, machines=machines, duration_s=duration, restarted=restarted), tally


def run(coro):
    """asyncio.run on uvloop when it is installed (uvicorn[standard] brings it): a cheaper client."""
    try:
        import uvloop
        return uvloop.run(coro)
    except ImportError:
        return asyncio.run(coro)

