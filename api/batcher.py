"""Adaptive micro-batching: windows of concurrent requests run as one graph call (one per worker).

The idea of Triton's dynamic batcher: a graph call on 16 windows costs far less than 16 calls on
one. Requests submit their windows and await their own slice of the answer; one task per worker
drains the queue, one call at a time:

- adaptive: while a call runs, new requests queue up and become the next call, so the batch
  grows with the load; on an idle worker a lone request runs at once, in its own task (run_now);
- before a call, it waits up to GCODEFP_BATCH_MAX_DELAY_MS for requests that have started but
  not yet submitted (the route marks them with `arriving()`), never for requests that may come;
- one call holds up to GCODEFP_BATCH_MAX_WINDOWS windows of one group: the same model object and
  the same `key` (the route's function and options), so a batch never mixes two models across a
  hot swap, nor two kinds of answer;
- errors stay per request: if a batched call raises, its requests are retried one by one and each
  gets its own answer or its own error.
Calls run on the event loop, not in a thread: measured under load, an inference thread fighting
the event loop for the GIL (the interpreter hands it over every 5 ms) made calls 10-40x slower
than the graph. Several workers use several cores.

On by default (GCODEFP_BATCHING=0 turns it off). A request whose body has fully arrived is read and
parsed without suspending, so the routes give the loop one turn after parsing (`await sleep(0)` inside
`arriving()`): requests received meanwhile parse too and join the call. Without that turn every
request found the batcher idle and ran alone, even at 64 concurrent clients. Measured on the 2-core
machine (benchmarks/serving.py, package v20261202-025329-7c3b16a0, int8_static; the predict graph
costs ~0.6 ms at batch 1 and ~0.19 ms per window at batch 16), 16 closed-loop clients on 2 workers:
JSON /predict 813-873 req/s on against 634 off, binary 1,235-1,329 against 872; the highest
open-loop rate held at p99 <= 10 ms on 1 worker rose from 200 to 300 req/s (JSON) and from 200 to
400 (binary, one of two runs). Per-window cost hardly falls past 16 windows while a call's time
keeps growing, hence GCODEFP_BATCH_MAX_WINDOWS=16.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from . import metrics

log = logging.getLogger("api.batcher")


@dataclass(eq=False)
class Item:
    model: object
    key: tuple
    fn: object                 # fn(model, cont [n, W, F], cat [n, W, C]) -> list or dict of per-window arrays
    cont: np.ndarray
    cat: np.ndarray
    future: asyncio.Future
    prepare: object = None     # prepare(model, cont, cat) -> (cont, cat) before fn (normalisation), or None
    hold: float = 0.0          # seconds it may wait for company (requests of its group that have not come yet)
    queued_at: float = field(default_factory=time.perf_counter)

    def due(self, now: float) -> bool:
        return now >= self.queued_at + self.hold


@dataclass
class Answer:
    result: object             # this request's slice of the call's result
    queue_ms: float            # from submit to the start of its call
    inference_ms: float        # fn's call (every request of a batch shares it)
    batch_windows: int         # windows in that call
    prepare_ms: float = 0.0    # prepare's call on the batch (normalisation)


def _part(result, a: int, b: int):
    return {k: v[a:b] for k, v in result.items()} if isinstance(result, dict) else result[a:b]


class Batcher:
    def __init__(self, max_windows: int = 32, max_delay_ms: float = 1.0, busy=None):
        if max_windows < 1 or max_delay_ms < 0:
            raise ValueError("batching: max windows must be >= 1 and the max delay >= 0")
        self.max_windows, self.max_delay = max_windows, max_delay_ms / 1000
        self._queue: deque[Item] = deque()
        self.busy = busy or (lambda: False)   # () -> whether the worker is congested (held requests wait then)
        self._arriving = 0
        self._group: list[Item] = []          # the items of the call being made
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    # ---- the routes' side ------------------------------------------------------------------------
    def arriving(self) -> "_Arrival":
        """`with batcher.arriving():` around reading and parsing a request that will submit."""
        return _Arrival(self)

    def run_now(self, model, key: tuple, fn, cont: np.ndarray, cat: np.ndarray, prepare=None,
                hold: float = 0.0) -> Answer | None:
        """A lone request on an idle worker (nothing queued, nobody being parsed) runs at once, in the
        caller's task: no hand-over to the batch task. -> its Answer, or None when it must queue (submit).
        hold > 0 (seconds; a latency-tolerant caller such as a stream chunk): on a congested worker
        (`busy()`: requests pile up) it queues and waits up to `hold` for later requests of its key to
        share its call, trading a few ms for fewer calls; on a worker with room it runs at once."""
        if hold and self.busy():
            return None
        if self._queue or self._arriving:
            return None
        metrics.BATCH_WINDOWS.observe(len(cont))
        answer = self._call([Item(model, key, fn, cont, cat, None, prepare)])[0]
        if isinstance(answer, BaseException):
            raise answer
        return answer

    def submit(self, model, key: tuple, fn, cont: np.ndarray, cat: np.ndarray, prepare=None,
               hold: float = 0.0) -> asyncio.Future:
        """Queue windows [n, W, .] for model; await the future for this request's Answer. Items of one
        `key` must be answerable by one fn call on their concatenation (fn and prepare of the first item run).
        hold: seconds this item may wait for later items of its group (see run_now)."""
        item = Item(model, key, fn, cont, cat, asyncio.get_running_loop().create_future(), prepare, hold)
        self._queue.append(item)
        self._wake.set()
        return item.future

    # ---- the worker's side -----------------------------------------------------------------------
    async def _run(self) -> None:
        """The worker's batch task, for its lifetime: a bug in it fails the requests it holds (each
        gets an error) instead of ending the task and leaving every later request waiting forever."""
        while True:
            try:
                await self._drain()
            except Exception as exc:
                log.error("micro-batcher failed; the requests it held get an error and it goes on", exc_info=exc,
                          extra={"event": "batcher_failed"})
                held, self._queue, self._group = [*self._group, *self._queue], deque(), []
                for item in held:
                    if not item.future.done():
                        item.future.set_exception(RuntimeError("micro-batcher failed (logged as batcher_failed)"))

    async def _drain(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                first = self._next_due()
                if first is None:  # only held items, none full nor due: wait for company or the earliest deadline
                    self._wake.clear()
                    left = min(i.queued_at + i.hold for i in self._queue) - time.perf_counter()
                    try:
                        await asyncio.wait_for(self._wake.wait(), max(left, 0.0))
                    except TimeoutError:
                        pass
                    continue
                deadline = first.queued_at + self.max_delay
                while (not first.hold and self._arriving and self._group_windows(first) < self.max_windows
                       and (left := deadline - time.perf_counter()) > 0):
                    self._wake.clear()
                    try:
                        await asyncio.wait_for(self._wake.wait(), left)
                    except TimeoutError:
                        break
                group = self._group = self._take_group(first)   # held outside the queue until answered
                started = time.perf_counter()
                try:
                    answers = self._call(group)
                except Exception as exc:  # a bug here must fail these requests, not every later one
                    log.error("micro-batched call failed", exc_info=exc, extra={"event": "batch_failed"})
                    answers = [exc] * len(group)
                for item, answer in zip(group, answers):
                    if item.future.done():  # the request was cancelled (client gone)
                        continue
                    if isinstance(answer, BaseException):
                        item.future.set_exception(answer)
                    else:
                        answer.queue_ms = round((started - item.queued_at) * 1000, 3)
                        item.future.set_result(answer)
                self._group = []
                for _ in range(3):  # let requests read meanwhile start (read events, then their handlers)
                    await asyncio.sleep(0)

    def _group_windows(self, first: Item) -> int:
        return sum(len(i.cont) for i in self._queue if i.model is first.model and i.key == first.key)

    def _next_due(self) -> Item | None:
        """The oldest item that may run now: not held, past its hold, or whose group fills a call."""
        now = time.perf_counter()
        for item in self._queue:
            if item.due(now) or self._group_windows(item) >= self.max_windows:
                return item
        return None

    def _take_group(self, first: Item) -> list[Item]:
        """`first` and every queued item of its group, up to max_windows (FIFO within the group). The
        queue changes only once the group is complete (nothing is lost if this fails midway)."""
        group, n = [first], len(first.cont)
        for item in self._queue:
            if (item is not first and item.model is first.model and item.key == first.key
                    and n + len(item.cont) <= self.max_windows):
                group.append(item)
                n += len(item.cont)
        metrics.BATCH_WINDOWS.observe(n)
        taken = {id(i) for i in group}
        self._queue = deque(i for i in self._queue if id(i) not in taken)
        return group

    @staticmethod
    def _call(group: list[Item]) -> list:
        """One call for the group (-> an Answer per item), or, if that call
        fails, one call per item (-> each item's Answer or exception)."""
        first = group[0]
        t0 = time.perf_counter()
        try:
            if len(group) == 1:
                cont, cat = first.cont, first.cat
            else:
                cont, cat = np.concatenate([i.cont for i in group]), np.concatenate([i.cat for i in group])
            if first.prepare is not None:
                cont, cat = first.prepare(first.model, cont, cat)
            t1 = time.perf_counter()
            result = first.fn(first.model, cont, cat)
        except Exception as exc:
            return [exc] if len(group) == 1 else [Batcher._call([item])[0] for item in group]
        t2 = time.perf_counter()
        metrics.graph_call(t2 - t1, len(cont))
        prep, ms = round((t1 - t0) * 1000, 3), round((t2 - t1) * 1000, 3)
        out, a = [], 0
        for item in group:
            b = a + len(item.cont)
            out.append(Answer(_part(result, a, b), 0.0, ms, len(cont), prep))
            a = b
        return out


class _Arrival:
    def __init__(self, batcher: Batcher):
        self.batcher = batcher

    def __enter__(self):
        self.batcher._arriving += 1

    def __exit__(self, *exc):
        self.batcher._arriving -= 1
        self.batcher._wake.set()  # one fewer to wait for
