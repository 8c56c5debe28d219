"""Prometheus metrics, correct across several uvicorn workers.

With several workers each process counts its own requests; prometheus-client's multiprocess mode
keeps every process's values in files under $PROMETHEUS_MULTIPROC_DIR and /metrics sums them, so a
scrape that lands on any worker sees the whole server. The variable must be set (to an empty folder)
before prometheus_client is imported, i.e. before uvicorn starts the workers: `gcodefp serve` does
it; with plain `uvicorn api.app:app --workers N`, set it yourself. Without it, values are per process.
"""
from __future__ import annotations

import asyncio
import gc
import os
import time
from collections import deque
from pathlib import Path

from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram,
                               disable_created_metrics, generate_latest)

from .settings import SETTINGS

disable_created_metrics()  # the *_created series double the scrape size and nobody graphs them

MULTIPROCESS = bool(SETTINGS.metrics_dir)
LATENCY_BUCKETS = (.0001, .00025, .0005, .00075, .001, .002, .003, .005, .0075, .01, .015, .02, .03, .05, .1, .25,
                   .5, 1.0, 2.5)

REQUESTS = Counter("gcodefp_http_requests_total", "HTTP requests by endpoint, method and status",
                   ["endpoint", "method", "status"])
REQUEST_LATENCY = Histogram("gcodefp_http_request_duration_seconds", "Request latency (server side)",
                            ["endpoint", "status"], buckets=LATENCY_BUCKETS)
IN_FLIGHT = Gauge("gcodefp_http_requests_in_flight", "Requests being served", multiprocess_mode="livesum")
AUTH_REFUSED = Counter("gcodefp_auth_refused_total", "Requests refused for their client token (api/auth.py): "
                       "missing, invalid, expired, or a machine the token may not stream", ["endpoint", "reason"])
SHED = Counter("gcodefp_http_requests_shed_total", "Requests refused with 503 because the worker already held "
               "GCODEFP_MAX_IN_FLIGHT requests (overload)", ["endpoint"])
INFERENCE_LATENCY = Histogram("gcodefp_inference_duration_seconds", "Model time per call (run + decode; a "
                              "micro-batched call counts once per request)",
                              ["endpoint", "variant"], buckets=LATENCY_BUCKETS)
PARSE_LATENCY = Histogram("gcodefp_parse_duration_seconds", "Request body parsing and validation",
                          ["format"], buckets=LATENCY_BUCKETS)
NORMALISE_LATENCY = Histogram("gcodefp_normalise_duration_seconds", "Normalising a model call's windows (the "
                              "training transform; once per micro-batched call)", ["endpoint"], buckets=LATENCY_BUCKETS)
QUEUE_LATENCY = Histogram("gcodefp_queue_duration_seconds", "Time windows waited for the inference thread "
                          "(micro-batching: from submit to the start of their graph call)", ["endpoint"],
                          buckets=LATENCY_BUCKETS)
BATCH_WINDOWS = Histogram("gcodefp_batched_call_windows", "Windows per micro-batched graph call (all endpoints)",
                          buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
# Per graph call, counted once however many requests shared it: their ratio is the model time per window
# (the micro-batched calls' time spread over their windows), what the bare predict at batch 1 is compared with.
GRAPH_SECONDS = Counter("gcodefp_graph_call_seconds", "Model time summed over graph calls, each call once")
GRAPH_WINDOWS = Counter("gcodefp_graph_call_windows", "Windows summed over graph calls")
BATCH_SIZE = Histogram("gcodefp_batch_size", "Windows per inference call", ["endpoint"],
                       buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
MODEL_INFO = Gauge("gcodefp_model_info", "1 for the model version a worker serves (one series per worker)",
                   ["version", "variant"], multiprocess_mode="liveall")
RELOADS = Counter("gcodefp_model_reloads_total", "Package loads by trigger and result", ["trigger", "result"])
LOAD_FAILURES = Counter("gcodefp_model_load_failures_total", "Packages refused (checksum, load or warm-up failed)")
# Stream sessions live in each worker's memory: "livesum" adds up the live workers' counts.
STREAM_SESSIONS = Gauge("gcodefp_stream_sessions", "Machine stream sessions held (POST /stream/{machine_id})",
                        multiprocess_mode="livesum")
STREAM_HANDOFFS = Counter("gcodefp_stream_handoffs_total", "Machines whose monitor reconnected to another worker: "
                          "received (its state was taken over), given, timed_out and unavailable (a clock session, "
                          "another model's tracker, or no longer held: started afresh)", ["result"])
STREAM_REPLAYS = Counter("gcodefp_stream_replays_total", "Stream chunks sent again with the Idempotency-Key of "
                         "the last chunk applied: replayed (its answer sent again, its rows not applied again) or "
                         "conflict (the key reused for other rows: refused)", ["result"])
STREAM_EXPIRED = Counter("gcodefp_stream_expired_total", "Stream sessions forgotten after GCODEFP_STREAM_IDLE_S "
                         "without a chunk")
STREAM_EVICTIONS = Counter("gcodefp_stream_evictions_total", "Stream sessions evicted (GCODEFP_MAX_STREAMS reached)")
WORKERS_LOST = Counter("gcodefp_workers_lost_total", "Workers that ended without shutting down (ended by the loop "
                       "watchdog, crashed or killed), counted by the worker or scrape that noticed")


GC_PAUSE = Histogram("gcodefp_gc_pause_seconds", "Python garbage-collector passes by generation; the event loop "
                     "waits for each (a full pass, generation 2, over a loaded worker took 40-100 ms before the "
                     "worker froze what it loads)", ["generation"],
                     buckets=(.0001, .0005, .001, .0025, .005, .01, .025, .05, .1, .25))
_GC_BY_GENERATION = [GC_PAUSE.labels(str(g)) for g in range(3)]
_gc_started = [0.0]
_gc_pauses: deque = deque(maxlen=4096)   # (generation, seconds) of passes not yet published


def _time_gc(phase: str, info: dict) -> None:
    """A gc callback. The collector starts at any allocation, including one that prometheus-client
    makes while it holds its value lock (a plain Lock: not reentrant), e.g. creating a label's child;
    observing a metric here would then wait on that lock forever and freeze the worker (seen under
    load). So the callback only notes the pause; publish_gc_pauses / render publish it."""
    if phase == "start":
        _gc_started[0] = time.perf_counter()
    else:
        _gc_pauses.append((info["generation"], time.perf_counter() - _gc_started[0]))


def flush_gc() -> None:
    """Publish the collector passes noted so far (outside any metric's lock: a pass meanwhile is noted too)."""
    while _gc_pauses:
        generation, seconds = _gc_pauses.popleft()
        _GC_BY_GENERATION[generation].observe(seconds)


async def publish_gc_pauses(every: float = 1.0) -> None:
    """A worker's task: publish its noted collector passes every `every` seconds (a scrape of another
    worker sees them at most that late)."""
    while True:
        await asyncio.sleep(every)
        flush_gc()


def watch_gc() -> None:
    """Note every collector pass of this process for GC_PAUSE (once per process)."""
    if _time_gc not in gc.callbacks:
        gc.callbacks.append(_time_gc)


def graph_call(seconds: float, windows: int) -> None:
    GRAPH_SECONDS.inc(seconds)
    GRAPH_WINDOWS.inc(windows)


def set_model(version: str, variant: str, old: tuple[str, str] | None) -> None:
    if old is not None and old != (version, variant):
        MODEL_INFO.labels(*old).set(0)
    MODEL_INFO.labels(version, variant).set(1)


def forget_dead_workers() -> list[int]:
    """Drop the live gauges (in-flight, model info, stream sessions) of workers that ended without
    worker_exit: killed, crashed or ended by the loop watchdog (api/watchdog.py). Their files would
    keep counting them in every scrape: a stuck worker's in-flight requests and sessions forever.
    Each such worker is counted once in WORKERS_LOST (by whichever process removes its files).
    -> the pids dropped here."""
    if not MULTIPROCESS:
        return []
    dropped = set()
    for path in Path(SETTINGS.metrics_dir).glob("gauge_live*_*.db"):
        pid = path.stem.rsplit("_", 1)[1]
        if not pid.isdigit() or int(pid) == os.getpid() or process_alive(int(pid)):
            continue
        try:
            path.unlink()
        except FileNotFoundError:   # another worker got there first
            continue
        dropped.add(int(pid))
    lost = [pid for pid in dropped if _first_to_report(pid)]
    if lost:
        WORKERS_LOST.inc(len(lost))
    return sorted(dropped)


def _first_to_report(pid: int) -> bool:
    """Whether this process is the first to count that dead worker: a worker has two live-gauge files, and
    two processes cleaning up at once (a scrape and a worker start) may each remove one."""
    try:
        os.close(os.open(Path(SETTINGS.metrics_dir) / f"lost_{pid}.marker", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def render() -> tuple[bytes, str]:
    """The exposition text for GET /metrics (all workers in multiprocess mode)."""
    flush_gc()
    forget_dead_workers()
    if MULTIPROCESS:
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    from prometheus_client import REGISTRY

    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


def worker_exit() -> None:
    """Drop this process's live gauges (in-flight, model info, stream sessions) from the shared files."""
    if MULTIPROCESS:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(os.getpid())
