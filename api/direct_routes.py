"""A direct path for the hot endpoints: POST /predict, /batch_predict, /fingerprint and /stream/{machine_id}.

A monitoring deployment calls these thousands of times a second, and each answer costs 2-3 ms of a
worker's CPU. Under a profile, 27-31% of that was the stack around the endpoint function: FastAPI
matching the path against every route, solving each endpoint's dependencies (its one `request`
argument), the exception middleware and the exit stack it opens per request. These endpoints need
none of it: they take the raw Request, read and validate their own bodies (api/inputs.py) and raise
InputError for every bad input. So the request middleware (api/middleware.py: ids, metrics, shedding,
access log) hands them their Request directly; every other request takes the framework's path.

The contract stays the framework's: the routes are still declared (api/predict_routes.py,
api/stream_routes.py), so /openapi.json and /docs are unchanged, and an answer here is byte for
byte the routed one (tests/test_direct_routes.py compares the two on good and bad bodies).
GCODEFP_DIRECT_ROUTES=0 turns it off (every request routed by FastAPI), to compare or to rule it out.
"""
from __future__ import annotations

from starlette.requests import Request

from . import inputs, predict_routes, stream_routes
from .common import input_error, internal_error

POST_ROUTES = {"/predict": predict_routes.predict, "/batch_predict": predict_routes.batch_predict,
               "/fingerprint": predict_routes.fingerprint}
STREAM_PREFIX = "/stream/"


def route(scope):
    """-> an ASGI callable that serves this request, or None for the framework's path."""
    if scope["method"] != "POST" or scope.get("root_path"):  # under a root path, leave matching to the router
        return None
    path = scope["path"]
    endpoint = POST_ROUTES.get(path)
    if endpoint is not None:
        return lambda s, r, w: _serve(endpoint, {}, s, r, w)
    if path.startswith(STREAM_PREFIX) and len(path) > len(STREAM_PREFIX):
        machine = {"machine_id": path[len(STREAM_PREFIX):]}
        return lambda s, r, w: _serve(stream_routes.stream_post, machine, s, r, w)
    return None


async def _serve(endpoint, params: dict, scope, receive, send) -> None:
    request = Request(scope, receive)
    try:
        response = await endpoint(request, **params)
    except inputs.InputError as exc:
        response = input_error(exc)
    except Exception as exc:  # as the app's catch-all handler answers it (api/app.py)
        response = internal_error(exc)
    await response(scope, receive, send)
