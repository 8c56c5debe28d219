"""Streaming endpoints: POST/GET/DELETE /stream/{machine_id} (sessions live in api/streams.py)."""
from __future__ import annotations

import asyncio
import time
from contextlib import nullcontext

from fastapi import APIRouter, Request
from fastapi.responses import Response

from . import inputs, metrics, monitoring, stream_replay, stream_state, streams
from .common import current, respond, run_windows
from .settings import SETTINGS
from .schemas import OPENAPI_STREAM, STREAM_END_RESPONSES, STREAM_POST_RESPONSES, STREAM_STATE_RESPONSES

router = APIRouter()
STREAM_KEYS = {"sensor_data", "start", "every"}


@router.post("/stream/{machine_id:path}", openapi_extra=OPENAPI_STREAM, responses=STREAM_POST_RESPONSES)
async def stream_post(request: Request, machine_id: str):
    streams.check_machine_id(machine_id)
    streams.require_line_head(current(request))  # before anything else, so that a 409 holds no session
    key = request.headers.get("idempotency-key")
    if key is not None:
        stream_replay.check_key(key)
    body = await inputs.read_body(request)
    doc = inputs.parse_json_object(body, STREAM_KEYS)
    start = doc.get("start", False)
    if not isinstance(start, bool):
        raise inputs.InputError("start", "must be true or false")
    every = doc.get("every", SETTINGS.stream_every)
    if isinstance(every, float) and every.is_integer():  # 4.0 is the integer 4 in JSON
        every = int(every)
    if isinstance(every, bool) or not isinstance(every, int) or not 1 <= every <= inputs.MAX_STREAM_ROWS:
        raise inputs.InputError("every", f"must be a whole number of rows, 1..{inputs.MAX_STREAM_ROWS}")
    if "sensor_data" not in doc:
        raise inputs.InputError("sensor_data", "required")
    registry: streams.StreamRegistry = request.app.state.streams
    session = registry.acquire(machine_id)
    try:
        async with session.lock:  # this machine's requests apply one at a time, in arrival order
            model = current(request)  # taken under the lock: a request queued across a swap uses the new model
            streams.require_line_head(model)
            unstarted = session.version is None
            resumed = unstarted and await resume(request, session, model, start)
            if key is not None and (answer := stream_replay.replayed(session, key, body)) is not None:
                return Response(answer, media_type="application/json", headers=stream_replay.REPLAYED_HEADERS)
            t0 = time.perf_counter()
            batcher = request.app.state.batcher
            with batcher.arriving() if batcher is not None else nullcontext():
                cont, cat = inputs.parse_rows(doc["sensor_data"], model.spec, inputs.MAX_STREAM_ROWS,
                                              plain=inputs.plain_numbers(body, doc))
                metrics.PARSE_LATENCY.labels("json").observe(time.perf_counter() - t0)
                if batcher is not None:  # let other machines' chunks already received join this call
                    await asyncio.sleep(0)  # (see predict_routes.predict_windows)

            async def run(wc, wk):  # micro-batched with other machines' windows (api/batcher.py); a monitor
                # posting once a second can wait a few ms for other machines' chunks to share the graph call
                return await run_windows(request, model, "/stream", ("stream",), streams.predict, wc, wk,
                                         hold=SETTINGS.stream_batch_delay_ms / 1000)

            result = await streams.post_rows(session, model, cont, cat, start, run, every)
            if unstarted and not resumed and (handoff := getattr(request.app.state, "handoff", None)) is not None:
                handoff.claim(machine_id)
            monitoring.observe_stream(model, cont, result)
            response = respond(result)
            if key is not None:
                stream_replay.remember(session, key, body, response.body)
            return response
    finally:
        registry.release(session)


async def resume(request: Request, session: streams.Session, model, start: bool) -> bool:
    """A machine new to this worker (its session unstarted, its lock held) picks up where it was: held by
    another worker (its monitor reconnected here), else saved when a worker stopped. start=True starts it
    afresh (and has the other worker drop its copy). A machine picked up is this worker's from then on,
    whatever the request does next (a retried chunk's answer, a GET). -> whether it was picked up."""
    handoff = getattr(request.app.state, "handoff", None)
    taken = handoff is not None and await handoff.take(session, model, start)
    if not taken and not start and SETTINGS.stream_state_dir:
        taken = stream_state.restore(stream_state.file_for(SETTINGS.stream_state_dir, session.machine_id), session,
                                     model, SETTINGS.stream_state_max_age_s)
    if taken and handoff is not None:
        handoff.claim(session.machine_id)
    return taken


async def stream_session(request: Request, machine_id: str) -> streams.Session:
    """A started session of the machine, taken over from another worker (or a restart's state) if need be."""
    registry: streams.StreamRegistry = request.app.state.streams
    session = registry.get(streams.check_machine_id(machine_id))
    handoff = getattr(request.app.state, "handoff", None)
    saved = bool(SETTINGS.stream_state_dir) and stream_state.file_for(SETTINGS.stream_state_dir, machine_id).exists()
    if session is None and (saved or (handoff is not None and handoff.elsewhere(machine_id))):
        taking = registry.acquire(machine_id)
        try:
            async with taking.lock:
                if taking.version is None:
                    await resume(request, taking, current(request), start=False)
        finally:
            registry.release(taking)
        session = registry.get(machine_id)
    if session is None:
        raise inputs.InputError("machine_id", f"no stream session for {machine_id!r} (never started, ended, or "
                                              "evicted)", 404, location="path")
    return session


@router.get("/stream/{machine_id:path}", responses=STREAM_STATE_RESPONSES)
async def stream_get(request: Request, machine_id: str):
    return respond(streams.state(await stream_session(request, machine_id)))


@router.delete("/stream/{machine_id:path}", responses=STREAM_END_RESPONSES)
async def stream_delete(request: Request, machine_id: str):
    session = await stream_session(request, machine_id)
    async with session.lock:  # after the machine's requests already queued, not in the middle of one
        request.app.state.streams.end(session)
    return respond({"machine_id": machine_id, "ended": True, "rows_since_start": session.rows_since_start,
                    "windows": session.windows})
