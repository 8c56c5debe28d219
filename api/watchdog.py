"""A worker whose event loop stops turning ends itself, so that a fresh one takes its place.

uvicorn's supervisor checks each worker from a side thread of that worker (a ping over a pipe), so
a worker whose event loop is stuck (a deadlock, an endless loop, a blocking call that never
returns) still answers it and keeps accepting connections: every request that reaches it waits
forever, and nothing says so (seen: a deadlock in a metrics callback held one of two workers for
10 minutes). Like gunicorn's worker timeout: a task on the loop notes the time every second; a
thread checks it, and after GCODEFP_LOOP_TIMEOUT_S without a beat it writes where the loop is stuck
(the loop thread's stack) to the log and ends the process. With several workers uvicorn starts a
new one; a single-worker server exits, for its process manager (systemd, compose's restart policy)
to restart. The stuck worker's stream sessions are lost, as they are anyway.

The thread writes its log line straight to stderr (os.write, no logging locks): the stuck loop may
hold any lock, the logging handler's included.
"""
from __future__ import annotations

import asyncio
import os
import sys
import threading
import time
import traceback

import orjson

EXIT_CODE = 70   # EX_SOFTWARE: ended by the watchdog


class LoopWatchdog:
    def __init__(self, timeout: float, on_stall=None, beat: float = 1.0):
        if timeout <= 0:
            raise ValueError("loop watchdog: the timeout must be > 0 seconds")
        self.timeout, self.beat = timeout, min(beat, timeout / 4)
        self.on_stall = on_stall or end_process   # (seconds stuck, the loop thread's stack) -> None
        self.last = time.monotonic()
        self._stopped = threading.Event()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        """On the event loop it watches."""
        self.last, self._loop_thread = time.monotonic(), threading.get_ident()
        self._task = asyncio.get_running_loop().create_task(self._beat())
        threading.Thread(target=self._watch, name="loop-watchdog", daemon=True).start()

    def stop(self) -> None:
        self._stopped.set()
        if self._task is not None:
            self._task.cancel()

    async def _beat(self) -> None:
        while True:
            self.last = time.monotonic()
            await asyncio.sleep(self.beat)

    def _watch(self) -> None:
        while not self._stopped.wait(self.beat):
            stuck = time.monotonic() - self.last
            if stuck > self.timeout and not self._stopped.is_set():
                frame = sys._current_frames().get(self._loop_thread)
                self.on_stall(stuck, "".join(traceback.format_stack(frame)) if frame is not None else "")
                return


def end_process(stuck: float, stack: str) -> None:
    now = time.time()
    line = {"ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z", "level": "CRITICAL", "logger": "api.watchdog", "pid": os.getpid(), "event": "loop_stuck",
            "msg": f"event loop stuck for {stuck:.0f} s: this worker ends (exit {EXIT_CODE}) for a fresh one",
            "stuck_s": round(stuck, 1), "stack": stack}
    os.write(2, orjson.dumps(line) + b"\n")
    os._exit(EXIT_CODE)
