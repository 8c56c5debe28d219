"""Several uvicorn workers, each with its own listening socket (SO_REUSEPORT), on Linux.

uvicorn's supervisor binds one socket and every worker accepts from it. Whichever worker's loop
wakes first accepts a whole burst of waiting connections, so long-lived connections split unevenly,
and they stay where they landed: 1,000 keep-alive connections opened at once went 486 / 514,
547 / 453 and 336 / 664 to two idle workers (three tries, 2026-12-04). A /stream monitor keeps one
connection per machine for hours, so the worker that drew two thirds of them saturates while the
other idles. With a socket per worker the kernel spreads new connections by a hash of their
addresses, about evenly whatever each worker is doing.

Everything else is uvicorn's: the same supervisor starts, health-checks and replaces workers; each
worker (and each replacement) binds its own socket to the same address just before it starts
serving, and the kernel drops a worker's socket from the group when that worker exits. The parent
keeps a bound socket (never listening: it takes no connections) so that a taken port fails at once.
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
