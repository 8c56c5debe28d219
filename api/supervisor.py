"""Several uvicorn workers, each with its own listening socket (SO_REUSEPORT), on Linux.

uvicorn's supervisor binds one socket and every worker accepts from it. Whichever worker's loop
wakes first accepts a whole burst of waiting connections, so long-lived connections split unevenly,
and they stay where they landed: 1,000 keep-alive connections opened at once on two idle workers
split up to 701 / 299 (benchmarks/connection_spread.py). A /stream monitor keeps one connection per
machine for hours, so after a restart, when every monitor reconnects, one worker can draw two thirds
of the machines and saturate while the other idles. With a socket per worker the kernel spreads new
connections by a hash of their addresses, about evenly whatever each worker is doing (520 / 480 at
worst in the same benchmark).

The sockets belong to worker *slots* held by this supervisor, not to the workers: a worker that
ends (a rolling restart, a crash, the loop watchdog) leaves its slot's socket listening, the
connections the kernel queued on it wait there, and the worker that takes the slot over accepts
them. Sockets that the workers owned were closed with their queues when a worker ended, which
reset a connection now and then during a rolling restart (1 of 1,791 requests in one test run).
The price of a slot: the connections hashed to it wait while its worker is stuck or restarting
(a stuck worker's until its watchdog ends it, api/watchdog.py), where a shared socket lets the
other workers take them.

Everything else is uvicorn's supervisor (health checks, replacing dead workers, SIGHUP to restart
each worker in turn, SIGTTIN / SIGTTOU to add or remove one); the methods below differ from
uvicorn 0.54's only in giving each worker its slot's socket.
"""
from __future__ import annotations

import logging
import socket

from uvicorn.config import STARTUP_FAILURE
from uvicorn.supervisors.multiprocess import Multiprocess, Process

log = logging.getLogger("uvicorn.error")


def reuse_port_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to (host, port) with SO_REUSEPORT; its first worker makes it listen."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


def supported() -> bool:
    return hasattr(socket, "SO_REUSEPORT")


class SocketPerWorker(Multiprocess):
    """uvicorn's Multiprocess supervisor with one listening socket per worker slot."""

    def __init__(self, config, address: tuple[str, int]):
        super().__init__(config, sockets=[])
        self.address = address
        self.slots = [reuse_port_socket(*address) for _ in range(self.processes_num)]

    def _start(self, slot: int) -> Process:
        process = Process(self.config, [self.slots[slot]])
        process.start()
        return process

    def init_processes(self) -> None:
        for slot in range(self.processes_num):
            self.processes.append(self._start(slot))

    def restart_all(self) -> None:
        """Each worker in turn: its replacement serves (on the same slot) before the old one retires."""
        for idx, old_process in enumerate(self.processes):
            if self.should_exit.is_set():
                return
            new_process = self._start(idx)
            if not new_process.wait_until_ready(self.config.timeout_worker_healthcheck, self.should_exit):
                new_process.kill()
                new_process.join()
                if not self.should_exit.is_set():
                    log.error(f"New child process [{new_process.pid}] was not ready in time; "
                              f"keeping worker [{old_process.pid}] and aborting the restart.")
                return
            old_process.terminate()
            old_process.join()
            self.processes[idx] = new_process

    def keep_subprocess_alive(self) -> None:
        if self.should_exit.is_set():
            return
        for idx, process in enumerate(self.processes):
            if process.is_alive(timeout=self.config.timeout_worker_healthcheck):
                continue
            process.kill()  # hung: kill it
            process.join()
            if process.exitcode == STARTUP_FAILURE:  # the app cannot start: every restart would fail alike
                log.error(f"Child process [{process.pid}] failed to start, stopping the parent process.")
                self.should_exit.set()
                return
            if self.should_exit.is_set():
                return
            log.info(f"Child process [{process.pid}] died")
            self.processes[idx] = self._start(idx)

    def handle_ttin(self) -> None:
        log.info("Received SIGTTIN, increasing the number of processes.")
        self.processes_num += 1
        self.slots.append(reuse_port_socket(*self.address))
        self.processes.append(self._start(len(self.slots) - 1))

    def handle_ttou(self) -> None:
        log.info("Received SIGTTOU, decreasing number of processes.")
        if self.processes_num <= 1:
            log.info("Already reached one process, cannot decrease the number of processes anymore.")
            return
        self.processes_num -= 1
        process = self.processes.pop()
        process.terminate()
        process.join()
        self.slots.pop().close()   # no worker will accept from it again

    def run(self) -> None:
        try:
            super().run()
        finally:
            for sock in self.slots:
                sock.close()


def run(config) -> None:
    """uvicorn.run's multi-worker path with a socket per worker: `config` is a uvicorn.Config with
    workers > 1 and an import string for the app."""
    try:
        probe = reuse_port_socket(config.host, config.port)   # a port in use fails here, before any worker
    except OSError as exc:
        raise ValueError(f"--host/--port: cannot listen on {config.host}:{config.port}: {exc.strerror}") from None
    host, port = probe.getsockname()[:2]
    try:
        supervisor = SocketPerWorker(config, (host, port))
    finally:
        probe.close()
    log.info("Uvicorn running on %s://%s:%d with %d workers, a socket each (Press CTRL+C to quit)",
             "https" if config.is_ssl else "http", host, port, config.workers)
    supervisor.run()
