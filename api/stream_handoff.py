"""A followed machine moves with its monitor's connection between workers (GCODEFP_STREAM_HANDOFF_DIR).

A session lives in one worker's memory, and the kernel picks the worker of a new connection by its
addresses (api/supervisor.py): a monitor that reconnects (a network drop, a client restart, a closed
idle keep-alive) reaches any worker. Without a handoff that worker starts the machine over
("anywhere in any program": about half the exact-line accuracy until the filter locks on again),
and the old worker keeps a stale copy until it is evicted: in a benchmark sweep whose machines
reconnected twice, two workers held 1,066 sessions for 750 machines.

The workers share a folder (`gcodefp serve --workers N` makes one):
- owners/<machine>.pid: the pid of the worker that holds the machine's session, written when a
  worker starts or takes over a session, removed when it ends or evicts it;
- asks/<machine>.<owner pid>.<nonce>.ask: a worker that gets a request for a machine another live
  worker holds asks that worker for it: "send" (the session's state), or "drop" (the client starts a
  new program: the old state is of no use, but the old copy must go);
- states/<machine>.<owner pid>.<nonce>.state: the owner's answer, in api/stream_state's format (temp
  file, then rename).
The owner finishes the machine's request in flight (the session lock), writes the state and
forgets the session. The asking worker holds the machine's own lock meanwhile (its next requests
queue in order) and waits up to GCODEFP_STREAM_HANDOFF_TIMEOUT_MS, then starts the machine afresh
(an owner that is stuck or gone). One loop per worker looks at the folder for both sides (every
POLL_S, BUSY_POLL_S while it has asks to answer or answers to wait for): a waiter per machine, each
looking on its own, made a mass reconnect (1,000 machines, half of them moving) wake the event loop
~50,000 times a second and took chunk p99 to 1.7 s. Only tracker sessions carry a state; a clock
session (older packages) is dropped and starts over, as a restart does.
"""
from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from pathlib import Path

from . import metrics, stream_state

log = logging.getLogger("api.streams")
POLL_S = 0.02          # an owner answers within this (plus its request in flight); an empty listdir costs ~5 us
BUSY_POLL_S = 0.005    # while handoffs are under way
ORPHAN_AGE_S = 60.0    # asks and states nobody took (an owner gone, an asker that gave up) are deleted after this


class Handoff:
    def __init__(self, folder: Path, registry, timeout_s: float, max_age_s: float):
        self.owners, self.asks, self.states = (Path(folder) / sub for sub in ("owners", "asks", "states"))
        for d in (self.owners, self.asks, self.states):
            d.mkdir(parents=True, exist_ok=True)
        self.registry, self.timeout_s, self.max_age_s = registry, timeout_s, max_age_s
        self.pid = os.getpid()
        self._busy: set[str] = set()   # asks being answered
        self._giving: set[asyncio.Task] = set()   # their tasks (the loop keeps only weak references)
        self._waiting: dict[str, asyncio.Future] = {}   # this worker's asks -> whether an answer came
        self._swept = time.monotonic()

    # ---- ownership ----------------------------------------------------------------------------------
    def owner(self, machine_id: str) -> int | None:
        try:
            return int((self.owners / f"{machine_id}.pid").read_text())
        except (OSError, ValueError):
            return None

    def elsewhere(self, machine_id: str) -> int | None:
        """The live worker other than this one that holds the machine, if any."""
        pid = self.owner(machine_id)
        return pid if pid is not None and pid != self.pid and metrics.process_alive(pid) else None

    def claim(self, machine_id: str) -> None:
        """This worker holds the machine now. A folder that cannot be written (removed, full) costs the
        handoff, never the request: the machine's next reconnect then starts it afresh."""
        tmp = self.owners / f".{machine_id}.{self.pid}.tmp"
        try:
            tmp.write_text(str(self.pid))
            tmp.replace(self.owners / f"{machine_id}.pid")
        except OSError as exc:
            log.warning("cannot record who follows %s: %s", machine_id, exc,
                        extra={"event": "stream_handoff_failed", "machine_id": machine_id})

    def release(self, machine_id: str) -> None:
        """This worker no longer holds the machine (ended, evicted, shut down)."""
        if self.owner(machine_id) == self.pid:
            (self.owners / f"{machine_id}.pid").unlink(missing_ok=True)

    # ---- the asking side -------------------------------------------------------------------------------
    async def take(self, session, model, start: bool) -> bool:
        """Before an unstarted session's first chunk (its lock held): take the machine's state from the
        worker that holds it. start=True only tells that worker to drop its copy. -> whether the
        session was filled."""
        owner = self.elsewhere(session.machine_id)
        if owner is None:
            return False
        key = f"{session.machine_id}.{owner}.{uuid.uuid4().hex[:12]}"   # addressed to the owner only: the
        ask, tmp = self.asks / f"{key}.ask", self.asks / f".{key}.tmp"   # asker may hold the machine by the time it is read
        try:
            tmp.write_text("drop" if start else "send")
            tmp.replace(ask)
        except OSError as exc:   # the folder is gone or full: the machine starts afresh here
            log.warning("cannot ask worker %d for %s: %s", owner, session.machine_id, exc,
                        extra={"event": "stream_handoff_failed", "machine_id": session.machine_id})
            return False
        if start:
            return False
        # registered after the ask exists (no await in between): the loop's look at asks/ sees it
        answered = self._waiting[key] = asyncio.get_running_loop().create_future()
        try:
            state = await asyncio.wait_for(answered, self.timeout_s)
        except asyncio.TimeoutError:
            state = None
        finally:
            self._waiting.pop(key, None)
        if state is not None:
            taken = state and stream_state.restore(self.states / f"{key}{stream_state.SUFFIX}", session, model,
                                                   self.max_age_s)
            metrics.STREAM_HANDOFFS.labels("received" if taken else "unavailable").inc()
            if taken:
                log.info("stream session of %s taken over from worker %d", session.machine_id, owner,
                         extra={"event": "stream_handoff", "machine_id": session.machine_id, "from_pid": owner})
            return taken   # no state: a clock session (dropped), or no longer held there
        metrics.STREAM_HANDOFFS.labels("timed_out").inc()
        log.warning("worker %d did not hand %s over within %.0f ms: the machine starts afresh", owner,
                    session.machine_id, self.timeout_s * 1000,
                    extra={"event": "stream_handoff_timeout", "machine_id": session.machine_id, "from_pid": owner})
        return False

    # ---- the owning side --------------------------------------------------------------------------------
    async def serve(self) -> None:
        """Answer other workers' asks for the machines held here, and tell this worker's waiting asks
        whether their answer came; runs for the worker's lifetime."""
        busy = False
        while True:
            await asyncio.sleep(BUSY_POLL_S if busy or self._waiting else POLL_S)
            waiting = list(self._waiting.items())   # before the look: an ask registered later was not in it
            try:
                names = os.listdir(self.asks)
                answers = set(os.listdir(self.states)) if waiting else set()
            except OSError:
                continue
            busy = bool(names)
            present = set(names)
            for key, answered in waiting:   # the owner writes its answer before it deletes the ask
                if not answered.done() and (f"{key}{stream_state.SUFFIX}" in answers or f"{key}.ask" not in present):
                    answered.set_result(f"{key}{stream_state.SUFFIX}" in answers)
            for name in names:
                if name in self._busy or not name.endswith(".ask"):
                    continue
                parts = name[:-4].rsplit(".", 2)   # machine, owner pid, nonce
                if len(parts) != 3 or parts[1] != str(self.pid):
                    continue
                machine_id = parts[0]
                session = self.registry.get(machine_id)
                if session is None:   # no longer held here: an answer without a state, so the asker need not wait
                    (self.asks / name).unlink(missing_ok=True)
                    continue
                self._busy.add(name)
                task = asyncio.create_task(self._give(name, machine_id, session))
                self._giving.add(task)
                task.add_done_callback(self._giving.discard)
            if time.monotonic() - self._swept > ORPHAN_AGE_S / 4:
                self._swept = time.monotonic()
                await asyncio.to_thread(self._sweep)

    async def _give(self, name: str, machine_id: str, session) -> None:
        """Answer one ask, once: whatever happens, the ask is deleted (the asker then stops waiting) and
        this worker's copy is gone (the machine lives where its monitor now is)."""
        ask = self.asks / name
        try:
            async with session.lock:   # after the machine's request in flight here
                mode = ask.read_text().strip()
                if self.registry.get(machine_id) is session:
                    if mode == "send":
                        try:
                            stream_state.write(self.states / f"{name[:-4]}{stream_state.SUFFIX}", session)
                        except OSError as exc:   # a full tmpfs, say: the asker starts the machine afresh
                            log.warning("stream state of %s not handed over: %s", machine_id, exc,
                                        extra={"event": "stream_handoff_failed", "machine_id": machine_id})
                    self.registry.end(session, handed_over=True)   # the owner file is the asker's to rewrite
                    metrics.STREAM_HANDOFFS.labels("given").inc()
        except FileNotFoundError:   # the asker gave up and another worker swept it meanwhile
            pass
        except Exception:   # never let one machine's handoff end the loop that serves them all
            log.exception("stream handoff of %s failed", machine_id, extra={"event": "stream_handoff_failed"})
        finally:
            ask.unlink(missing_ok=True)
            self._busy.discard(name)

    def _sweep(self) -> None:
        """Delete asks and answers older than ORPHAN_AGE_S: nobody will take them any more."""
        now = time.time()
        for d in (self.asks, self.states):
            for entry in os.scandir(d):
                try:
                    if now - entry.stat().st_mtime > ORPHAN_AGE_S:
                        os.unlink(entry.path)
                except OSError:
                    pass

    def close(self, sessions) -> None:
        """At shutdown: the machines held here are no longer anyone's (a restart's state folder takes over)."""
        for s in sessions:
            self.release(s.machine_id)
