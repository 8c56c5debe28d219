"""The micro-batcher (api/batcher.py) over the real tiny package: requests that arrive together share a
graph call, each gets its own answer (the same as alone), errors stay per request, models never mix."""
from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest

from api import inputs
from api.batcher import Batcher
from api.model_store import LoadedModel


@pytest.fixture(scope="module")
def windows(api_registry, predictor):
    """Five different raw windows (the sample request, shifted) in the package's feature order."""
    doc = json.loads((api_registry / "packages" / "v1" / "sample_request.json").read_text())
    cont, cat = inputs.parse_sensor_data(doc["sensor_data"], predictor.features, predictor.window)
    rng = np.random.default_rng(0)
    return [(cont[None] + rng.normal(0, 0.5 * (i + 1), cont.shape), cat[None]) for i in range(5)]


def loaded(predictor, version: str) -> LoadedModel:
    return LoadedModel(predictor, version, predictor.variant, None, {}, 0.0)


class CountingPredict:
    """The predict routes' batched function, counting its calls and the windows of each."""

    def __init__(self):
        self.calls: list[tuple[str, int]] = []

    def __call__(self, model, cont, cat):
        self.calls.append((model.version, len(cont)))
        return model.predictor.predict(*inputs.model_inputs(model.spec, cont, cat))


def alone(model, cont, cat) -> dict:
    return model.predictor.predict(*inputs.model_inputs(model.spec, cont, cat))[0]


async def submit_all(batcher: Batcher, items) -> list:
    """Submit every item before the batcher runs (requests that arrived together)."""
    batcher.start()
    futures = [batcher.submit(m, key, fn, c, k) for m, key, fn, c, k in items]
    out = await asyncio.gather(*futures, return_exceptions=True)
    await batcher.stop()
    return out


def test_requests_arriving_together_share_one_call_and_get_their_own_answer(predictor, windows):
    model, fn = loaded(predictor, "v1"), CountingPredict()
    answers = asyncio.run(submit_all(Batcher(max_windows=64, max_delay_ms=0),
                                     [(model, ("predict",), fn, c, k) for c, k in windows]))
    assert fn.calls == [("v1", 5)]
    for (c, k), answer in zip(windows, answers):
        assert answer.batch_windows == 5 and len(answer.result) == 1
        mine, ref = answer.result[0], alone(model, c, k)
        assert mine["gcode"] == ref["gcode"] and mine["operation"] == ref["operation"]
        assert np.allclose(mine["fingerprint"], ref["fingerprint"], atol=1e-4)
    assert len({a.result[0]["operation_confidence"] for a in answers}) > 1  # not five copies of one answer


def test_a_call_never_mixes_models_keys_or_exceeds_max_windows(predictor, windows):
    old, new, fn = loaded(predictor, "old"), loaded(predictor, "new"), CountingPredict()
    items = [(old, ("predict",), fn, *windows[0]), (new, ("predict",), fn, *windows[1]),
             (old, ("predict",), fn, *windows[2]), (old, ("other",), fn, *windows[3]),
             (old, ("predict",), fn, *windows[4])]
    answers = asyncio.run(submit_all(Batcher(max_windows=2, max_delay_ms=0), items))
    assert all(not isinstance(a, BaseException) for a in answers)
    assert sorted(fn.calls) == sorted([("old", 2), ("new", 1), ("old", 1), ("old", 1)])
    assert all(n <= 2 for _, n in fn.calls)


def test_a_failing_request_fails_alone(predictor, windows):
    model, fn = loaded(predictor, "v1"), CountingPredict()
    c, k = windows[0]
    bad = (c[:, :, :-1], k)  # one continuous column short: its batch cannot be built, nor its own call run
    answers = asyncio.run(submit_all(Batcher(), [(model, ("predict",), fn, c, k), (model, ("predict",), fn, *bad),
                                                 (model, ("predict",), fn, *windows[1])]))
    assert isinstance(answers[1], Exception)
    assert answers[0].result[0]["gcode"] == alone(model, c, k)["gcode"]
    assert answers[2].result[0]["gcode"] == alone(model, *windows[1])["gcode"]


def test_stream_answers_are_sliced_per_request(predictor, windows):
    """/stream's batched function returns arrays by name; each request gets its own rows of them."""
    from api import streams

    model = loaded(predictor, "v1")
    normalised = [inputs.model_inputs(model.spec, np.repeat(c, n, 0), np.repeat(k, n, 0))
                  for (c, k), n in zip(windows[:3], (1, 3, 2))]
    answers = asyncio.run(submit_all(Batcher(), [(model, ("stream",), streams.predict, c, k) for c, k in normalised]))
    for (c, k), answer in zip(normalised, answers):
        ref = streams.predict(model, c, k)
        assert answer.batch_windows == 6 and len(answer.result["line"]) == len(c)
        assert np.array_equal(answer.result["line"], ref["line"])
        assert np.allclose(answer.result["op_logits"], ref["op_logits"], atol=1e-4)


def test_settings_refuse_a_bad_batcher():
    with pytest.raises(ValueError):
        Batcher(max_windows=0)


def test_a_lone_request_on_an_idle_worker_runs_at_once(predictor, windows):
    model, fn = loaded(predictor, "v1"), CountingPredict()
    batcher = Batcher()
    c, k = windows[0]
    answer = batcher.run_now(model, ("predict",), fn, c, k)  # no batch task running: nothing queued, none arriving
    assert fn.calls == [("v1", 1)] and answer.result[0]["gcode"] == alone(model, c, k)["gcode"]
    with batcher.arriving():  # another request is being parsed: this one must queue to share its call
        assert batcher.run_now(model, ("predict",), fn, c, k) is None
    with pytest.raises(ValueError):  # its own error, raised in its own request
        batcher.run_now(model, ("predict",), fn, c[:, :, :-1], k)


def test_requests_received_together_are_batched_by_the_routes(api_registry, sample_request, predictor):
    """Through the real app (in process, one event loop): requests whose bodies have all arrived are parsed
    one after another without suspending, so each would find the batcher idle and run alone; the route
    gives the loop one turn after parsing, so the others arrive meanwhile and share one call."""
    import httpx

    from api import streams
    from api.app import app
    from api.model_store import ModelStore

    sd = sample_request["sensor_data"]
    docs = [{"sensor_data": {"continuous": (np.asarray(sd["continuous"], float) * (1 + 0.1 * i)).tolist(),
                             "categorical": sd["categorical"]}} for i in range(6)]
    sizes: list[int] = []

    async def scenario():
        store = ModelStore(package=api_registry / "packages" / "v1")
        await store.reload(trigger="test")
        batcher = Batcher(max_windows=32, max_delay_ms=200)
        call = batcher._call
        batcher._call = lambda group: (sizes.append(sum(len(i.cont) for i in group)), call(group))[1]
        app.state.store, app.state.streams, app.state.batcher = store, streams.StreamRegistry(), batcher
        batcher.start()
        try:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gcodefp") as client:
                return await asyncio.gather(*(client.post("/predict", json=doc) for doc in docs))
        finally:
            await batcher.stop()
            for name in ("store", "streams", "batcher"):  # the module's app, left as imported
                delattr(app.state, name)

    answers = asyncio.run(scenario())
    assert max(sizes) > 1 and sum(sizes) == len(docs)
    for doc, got in zip(docs, answers):
        cont, cat = inputs.parse_sensor_data(doc["sensor_data"], predictor.features, predictor.window)
        ref = predictor.predict(*inputs.model_inputs(predictor.features, cont[None], cat[None]))[0]
        assert got.status_code == 200
        assert got.json()["gcode_sequence"] == ref["gcode"] and got.json()["operation"]["name"] == ref["operation"]


@pytest.mark.slow
def test_server_with_batching_answers_each_request_as_alone(api_registry, sample_request, predictor, tmp_path):
    """GCODEFP_BATCHING=1 end to end: concurrent /predict requests and a /stream machine, each answered as alone."""
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    from api_fixtures import start_uvicorn

    server = start_uvicorn(tmp_path, GCODEFP_PACKAGE=api_registry / "packages" / "v1", GCODEFP_BATCHING=1,
                           GCODEFP_BATCH_MAX_DELAY_MS=5)
    try:
        base = httpx.post(f"{server.url}/predict", json=sample_request, timeout=60).json()
        sd = sample_request["sensor_data"]
        docs = [{"sensor_data": {"continuous": (np.asarray(sd["continuous"], float) * (1 + 0.1 * i)).tolist(),
                                 "categorical": sd["categorical"]}} for i in range(8)]

        def post(doc):
            return httpx.post(f"{server.url}/predict", json=doc, timeout=60).json()

        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(post, docs * 3))
        for doc, got in zip(docs * 3, answers):
            cont, cat = inputs.parse_sensor_data(doc["sensor_data"], predictor.features, predictor.window)
            ref = predictor.predict(*inputs.model_inputs(predictor.features, cont[None], cat[None]))[0]
            assert got["gcode_sequence"] == ref["gcode"] and got["operation"]["name"] == ref["operation"]
        assert base["model_version"] == "v1"
        w = predictor.window
        r = httpx.post(f"{server.url}/stream/m1", json={"sensor_data": {"continuous": sd["continuous"][:w],
                                                                        "categorical": sd["categorical"][:w]},
                                                        "start": True, "every": 1}, timeout=60).json()
        assert r["rows_since_start"] == w and r["mode"] == "tracker" and len(r["predictions"]) == w  # one per row
        text = httpx.get(f"{server.url}/metrics", timeout=10).text
        assert "gcodefp_batched_call_windows_count" in text and "gcodefp_queue_duration_seconds" in text
    finally:
        server.stop()


def test_held_stream_chunks_wait_for_company_and_never_hold_up_others(predictor, windows):
    """On a congested worker a stream chunk's windows wait (up to `hold`) for other machines' to share a
    call; on a worker with room a chunk runs at once; requests of another key never wait behind them."""
    model, fn = loaded(predictor, "v1"), CountingPredict()
    hold = 5.0  # far longer than the test: the held calls must be released by filling a call, not by the clock
    congested = [False]

    async def scenario():
        batcher = Batcher(max_windows=3, max_delay_ms=0, busy=lambda: congested[0])
        batcher.start()
        c, k = windows[0]
        first = batcher.run_now(model, ("stream",), fn, c, k, hold=hold)  # room: runs at once
        assert first is not None and fn.calls == [("v1", 1)]
        congested[0] = True
        assert batcher.run_now(model, ("stream",), fn, c, k, hold=hold) is None  # congested: it must queue
        assert batcher.run_now(model, ("predict",), fn, c, k) is not None  # not held: still at once
        held = [batcher.submit(model, ("stream",), fn, *windows[i], hold=hold) for i in (1, 2)]
        other = batcher.submit(model, ("predict",), fn, *windows[3])
        done, _ = await asyncio.wait([other, *held], timeout=2.0, return_when=asyncio.FIRST_COMPLETED)
        assert done == {other} and fn.calls[-1] == ("v1", 1)  # ran alone, not behind the held chunks
        held.append(batcher.submit(model, ("stream",), fn, *windows[4], hold=hold))  # the third fills a call
        answers = await asyncio.wait_for(asyncio.gather(*held), 2.0)
        await batcher.stop()
        return answers

    answers = asyncio.run(scenario())
    assert fn.calls[-1] == ("v1", 3) and all(a.batch_windows == 3 for a in answers)
    for i, answer in zip((1, 2, 4), answers):
        assert answer.result[0]["gcode"] == alone(model, *windows[i])["gcode"]


def test_a_held_chunk_runs_alone_when_no_company_comes(predictor, windows):
    model, fn = loaded(predictor, "v1"), CountingPredict()

    async def scenario():
        batcher = Batcher(max_windows=16, max_delay_ms=0)
        batcher.start()
        answer = await asyncio.wait_for(batcher.submit(model, ("stream",), fn, *windows[0], hold=0.05), 5.0)
        await batcher.stop()
        return answer

    answer = asyncio.run(scenario())
    assert fn.calls == [("v1", 1)] and answer.batch_windows == 1 and answer.queue_ms > 0


class FailingOnce(Batcher):
    """A batcher whose scheduling fails once (a bug), then works."""

    failed = False

    def _take_group(self, first):
        if not self.failed:
            self.failed = True
            raise RuntimeError("a bug in the batcher")
        return super()._take_group(first)


def test_a_failure_of_the_batcher_itself_fails_the_requests_it_held_and_the_next_ones_are_answered(predictor, windows):
    model, fn = loaded(predictor, "v1"), CountingPredict()

    async def scenario():
        batcher = FailingOnce(max_windows=64, max_delay_ms=0)
        batcher.start()
        first = [batcher.submit(model, ("predict",), fn, c, k) for c, k in windows[:2]]
        failed = await asyncio.wait_for(asyncio.gather(*first, return_exceptions=True), 10)
        later = await asyncio.wait_for(batcher.submit(model, ("predict",), fn, *windows[2]), 10)
        await batcher.stop()
        return failed, later

    failed, later = asyncio.run(scenario())
    assert all(isinstance(f, RuntimeError) and "batcher_failed" in str(f) for f in failed)
    assert later.batch_windows == 1 and fn.calls == [("v1", 1)]
