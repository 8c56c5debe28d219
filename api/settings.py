"""The server's settings: every environment variable it reads, in one place, read once per process.

| variable                  | default   | meaning                                                          |
|---------------------------|-----------|------------------------------------------------------------------|
| GCODEFP_REGISTRY          | -         | registry folder: serve its CURRENT package, follow promotions    |
| GCODEFP_PACKAGE           | -         | serve this one package folder (instead of a registry)            |
| GCODEFP_POLL_SECONDS      | 1.0       | how often a worker looks for a new CURRENT                        |
| GCODEFP_INTRA_OP_THREADS  | 1         | onnxruntime threads per graph call                                |
| GCODEFP_MAX_BODY_BYTES    | 8388608   | larger request bodies are refused with 413                        |
| GCODEFP_MAX_BATCH         | 64        | windows per /batch_predict                                        |
| GCODEFP_MAX_STREAM_ROWS   | 4096      | rows per POST /stream/{machine_id}                                |
| GCODEFP_MAX_STREAMS       | 1000      | stream sessions a worker keeps (least recently used evicted)      |
| GCODEFP_STREAM_IDLE_S     | 600       | a followed machine that posts nothing this long is forgotten (its next chunk starts afresh; 0 = never) |
| GCODEFP_MAX_IN_FLIGHT     | 256       | requests a worker holds at once; more get 503 + Retry-After at once (0 = no limit) |
| GCODEFP_STREAM_STATE_DIR  | -         | a folder: followed machines' tracker state is written there at shutdown and taken over after a restart (api/stream_state.py); `gcodefp serve --workers N` sets one for its own lifetime (worker restarts) |
| GCODEFP_STREAM_STATE_MAX_AGE_S | 600  | saved state older than this is ignored (the machine has moved on) |
| GCODEFP_STREAM_HANDOFF_DIR | -        | set by `gcodefp serve --workers N`: a folder the workers share, so that a machine whose monitor reconnects to another worker is handed over, not started again (api/stream_handoff.py) |
| GCODEFP_STREAM_HANDOFF_TIMEOUT_MS | 250 | how long a worker waits for another worker to hand a machine over before it starts the machine afresh |
| GCODEFP_STREAM_EVERY      | 4         | a tracked machine's rows judged and answered: every Nth, counted back from each chunk's last row (a request's "every" overrides) |
| GCODEFP_KEEP_PREVIOUS     | 1         | keep the previous version loaded after a swap (pin it via /v2 versions); 0 frees its memory |
| GCODEFP_KEEP_PREVIOUS_MIN_FREE_MB | 512 | ... but only while this much memory is available (MemAvailable) |
| GCODEFP_MONITOR_EVERY     | 1         | input monitoring looks at one window in N (1 = all, 0 = off; api/monitoring.py) |
| GCODEFP_DRIFT_HALF_LIFE   | 256       | windows after which a window's weight in the rolling drift score halves |
| GCODEFP_ADMIN_TOKEN       | -         | bearer token of POST /admin/reload (the endpoint is off without)  |
| GCODEFP_API_TOKENS_FILE   | -         | client tokens: the data endpoints (/predict, /batch_predict, /fingerprint, /stream/*, v2 infer) need one, a token may be limited to some machines (api/auth.py; `gcodefp token add`) |
| GCODEFP_BATCHING          | 1         | 1: micro-batching (api/batcher.py); 0: each request's own call   |
| GCODEFP_BATCH_MAX_WINDOWS | 16        | windows per micro-batched graph call                              |
| GCODEFP_BATCH_MAX_DELAY_MS| 1.0       | how long a call waits for requests already being parsed to join   |
| GCODEFP_STREAM_BATCH_DELAY_MS | 10    | on a congested worker, how long a /stream chunk's windows wait for other machines' to share a call |
| GCODEFP_DIRECT_ROUTES     | 1         | 1: the hot POST endpoints skip the framework's routing (api/direct_routes.py); 0: all routed |
| GCODEFP_SOCKET_PER_WORKER | 1         | with several workers, each listens on its own socket (SO_REUSEPORT): connections spread evenly (api/supervisor.py); 0: one shared socket |
| GCODEFP_LOOP_TIMEOUT_S    | 30        | a worker whose event loop is stuck this long logs where and exits, for a fresh one (api/watchdog.py; 0 = off) |
| GCODEFP_HEAP_TRIM_KB      | 2048      | free memory at the top of the heap that a worker keeps instead of returning it to the OS (glibc M_TRIM_THRESHOLD; api/app.py) |
| GCODEFP_LOG_LEVEL         | INFO      | log level of the JSON logs                                        |
| PROMETHEUS_MULTIPROC_DIR  | -         | set by `gcodefp serve`: several workers' metrics summed from files |
A value that does not parse is refused at start-up, naming the variable.
"""
from __future__ import annotations

import os
from dataclasses import dataclass


def _get(name: str, default, kind=str, minimum=None):
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = kind(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r}: expected {kind.__name__}") from None
    if minimum is not None and value < minimum:
        raise ValueError(f"{name}={raw!r}: must be >= {minimum}")
    return value


@dataclass(frozen=True)
class Settings:
    registry: str | None
    package: str | None
    poll_seconds: float
    intra_op_threads: int
    max_body_bytes: int
    max_batch: int
    max_stream_rows: int
    max_streams: int
    max_in_flight: int
    stream_every: int
    stream_state_dir: str | None
    stream_state_max_age_s: float
    stream_handoff_dir: str | None
    stream_idle_s: float
    stream_handoff_timeout_ms: float
    admin_token: str | None
    api_tokens_file: str | None
    keep_previous: bool
    keep_previous_min_free_mb: int
    monitor_every: int
    drift_half_life: float
    batching: bool
    batch_max_windows: int
    batch_max_delay_ms: float
    stream_batch_delay_ms: float
    direct_routes: bool
    socket_per_worker: bool
    loop_timeout_s: float
    heap_trim_kb: int
    log_level: str
    metrics_dir: str | None

    @classmethod
    def from_env(cls) -> "Settings":
        return cls(registry=_get("GCODEFP_REGISTRY", None), package=_get("GCODEFP_PACKAGE", None),
                   poll_seconds=_get("GCODEFP_POLL_SECONDS", 1.0, float, 0.01),
                   intra_op_threads=_get("GCODEFP_INTRA_OP_THREADS", 1, int, 1),
                   max_body_bytes=_get("GCODEFP_MAX_BODY_BYTES", 8 * 1024 * 1024, int, 1024),
                   max_batch=_get("GCODEFP_MAX_BATCH", 64, int, 1),
                   max_stream_rows=_get("GCODEFP_MAX_STREAM_ROWS", 4096, int, 1),
                   max_streams=_get("GCODEFP_MAX_STREAMS", 1000, int, 1),
                   max_in_flight=_get("GCODEFP_MAX_IN_FLIGHT", 256, int, 0),
                   stream_every=_get("GCODEFP_STREAM_EVERY", 4, int, 1),
                   stream_state_dir=_get("GCODEFP_STREAM_STATE_DIR", None),
                   stream_state_max_age_s=_get("GCODEFP_STREAM_STATE_MAX_AGE_S", 600.0, float, 0.0),
                   stream_handoff_dir=_get("GCODEFP_STREAM_HANDOFF_DIR", None),
                   stream_idle_s=_get("GCODEFP_STREAM_IDLE_S", 600.0, float, 0.0),
                   stream_handoff_timeout_ms=_get("GCODEFP_STREAM_HANDOFF_TIMEOUT_MS", 250.0, float, 0.0),
                   admin_token=_get("GCODEFP_ADMIN_TOKEN", None),
                   api_tokens_file=_get("GCODEFP_API_TOKENS_FILE", None),
                   keep_previous=bool(_get("GCODEFP_KEEP_PREVIOUS", 1, int, 0)),
                   keep_previous_min_free_mb=_get("GCODEFP_KEEP_PREVIOUS_MIN_FREE_MB", 512, int, 0),
                   monitor_every=_get("GCODEFP_MONITOR_EVERY", 1, int, 0),
                   drift_half_life=_get("GCODEFP_DRIFT_HALF_LIFE", 256.0, float, 1.0),
                   batching=_get("GCODEFP_BATCHING", 1, int, 0) != 0,
                   batch_max_windows=_get("GCODEFP_BATCH_MAX_WINDOWS", 16, int, 1),
                   batch_max_delay_ms=_get("GCODEFP_BATCH_MAX_DELAY_MS", 1.0, float, 0.0),
                   stream_batch_delay_ms=_get("GCODEFP_STREAM_BATCH_DELAY_MS", 10.0, float, 0.0),
                   direct_routes=_get("GCODEFP_DIRECT_ROUTES", 1, int, 0) != 0,
                   socket_per_worker=_get("GCODEFP_SOCKET_PER_WORKER", 1, int, 0) != 0,
                   loop_timeout_s=_get("GCODEFP_LOOP_TIMEOUT_S", 30.0, float, 0.0),
                   heap_trim_kb=_get("GCODEFP_HEAP_TRIM_KB", 2048, int, 0),
                   log_level=_get("GCODEFP_LOG_LEVEL", "INFO").upper(),
                   metrics_dir=_get("PROMETHEUS_MULTIPROC_DIR", None))


SETTINGS = Settings.from_env()
