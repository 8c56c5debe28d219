"""Several uvicorn workers, each with its own listening socket (SO_REUSEPORT), on Linux.

uvicorn's supervisor binds one socket and every worker accepts from it. Whichever worker's loop
wakes first accepts a whole burst of waiting connections, so long-lived connections split unevenly,
and they stay where they landed: 1,000 keep-alive connections opened at once on two idle workers
split up to 632 / 368 (benchmarks/connection_spread.py). A /stream monitor keeps one connection per
machine for hours, so after a restart, when every monitor reconnects, one worker can draw two thirds
of the machines and saturate while the other idles. With a socket per worker the kernel spreads new
connections by a hash of their addresses, about evenly whatever each worker is doing (537 / 463 at
worst in the same benchmark). The price: a worker whose event loop is stuck keeps receiving its
share of new connections until its watchdog ends it (api/watchdog.py).

Everything else is uvicorn's: the same supervisor starts, health-checks and replaces workers. Each
worker (and each replacement) binds its own socket to the same address as it starts and listens
once its startup (the model load) is done; the kernel drops a worker's socket from the group when
that worker exits. The parent keeps a bound socket that never listens (it takes no connections), so
that a port already taken fails at once.
"""
from __future__ import annotations

import logging
import socket

from uvicorn.supervisors import multiprocess

log = logging.getLogger("uvicorn.error")


def reuse_port_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to (host, port) with SO_REUSEPORT; not listening yet."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


class ReusePortWorker(multiprocess.Process):
    """A uvicorn worker that serves on a socket of its own, bound to the address the parent holds."""

    def target(self, sockets: list[socket.socket] | None = None) -> None:  # runs in the worker process
        own = []
        for shared in sockets or []:
            host, port = shared.getsockname()[:2]
            own.append(reuse_port_socket(host, port))
            shared.close()   # the parent's copy stays bound, and never listens
        super().target(own)


def supported() -> bool:
    return hasattr(socket, "SO_REUSEPORT")


def run(config) -> None:
    """uvicorn.run's multi-worker path with ReusePortWorker as the worker class: `config` is a
    uvicorn.Config with workers > 1 and an import string for the app."""
    try:
        placeholder = reuse_port_socket(config.host, config.port)
    except OSError as exc:
        raise ValueError(f"--host/--port: cannot listen on {config.host}:{config.port}: {exc.strerror}") from None
    host, port = placeholder.getsockname()[:2]
    log.info("Uvicorn running on http://%s:%d with %d workers, a socket each (Press CTRL+C to quit)",
             host, port, config.workers)
    # uvicorn's supervisor creates every worker (first start, replacement, restart) through this
    # module-level name; this process is the supervisor and nothing else, so the change stays here.
    multiprocess.Process = ReusePortWorker
    try:
        multiprocess.Multiprocess(config, sockets=[placeholder]).run()
    finally:
        placeholder.close()
