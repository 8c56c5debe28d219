"""/stream served by the program tracker (a real uvicorn server): a monitor attached mid-run, lost
and repeated rows, the rows judged, the row-count clock kept for packages whose predict graph lacks
line_logits, hot swaps (to the clock, to a tracker of the same programs, to one of other states),
and the tracker's trip from the checkpoint through model.json."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from api_fixtures import ADMIN_TOKEN, start_uvicorn, tracked_windows
from gcodefp_core import package as pkg
from gcodefp_core.runtime import OnnxPredictor
from gcodefp_core.runtime.program_tracker import ProgramTracker
from gcodefp_core.synthetic import generate_run

pytestmark = pytest.mark.slow
N_ROWS = 140


def copy_export(src, dst, edit_meta=None, drop_line_logits=False):
    """A copy of an export; drop_line_logits: its predict graph as exported before the tracker."""
    import onnx

    shutil.copytree(src, dst)
    meta = json.loads((dst / "model.json").read_text())
    if drop_line_logits:
        path = dst / meta["files"]["predict"]
        graph = onnx.load(str(path))
        keep = [o for o in graph.graph.output if o.name != "line_logits"]
        del graph.graph.output[:]
        graph.graph.output.extend(keep)
        onnx.save(graph, str(path))
        outputs = meta["graphs"]["predict"]["outputs"]
        meta["graphs"]["predict"]["outputs"] = [o for o in outputs if o["name"] != "line_logits"]
    if edit_meta:
        edit_meta(meta)
    (dst / "model.json").write_text(json.dumps(meta))
    return dst


def with_evidence(dataset, kind: str, weight: float):
    """A model.json edit: the tracker carries operation evidence of the dataset's training runs, of one
    kind ("templates" or "spread"), with this weight."""
    from gcodefp_core.dataset import load_dataset
    from gcodefp_core.fit_spread import fit_operation_spread
    from gcodefp_core.fit_templates import fit_operation_templates

    def edit(meta):
        tracker = meta["program_tracker"]
        ds = load_dataset(dataset)
        assert ds.operations == tracker["operations"]
        fitted = (fit_operation_templates(ds, tracker["operation_program"]) if kind == "templates"
                  else fit_operation_spread(ds))
        tracker[kind] = fitted.to_dict()
        tracker["params"] |= {"window_weight": 0.0, "window_weight_start": 0.0, EVIDENCE_WEIGHT[kind]: weight}
    return edit


EVIDENCE_WEIGHT = {"templates": "template_weight", "spread": "spread_weight"}


@pytest.fixture(scope="module")
def server(tiny_export, synthetic_dataset, tmp_path_factory):
    """A server whose registry holds `tracked` (CURRENT: the tiny model with its tracker, the window's
    own line never preferred, so every line is the tracker's), `old` (the same model exported
    before the tracker: no line_logits, so it streams with the clock), `retrained` (a tracker with
    the same states and other emission weights, as a retrained model of the same programs has) and
    `reshaped` (a tracker whose first program is one row offset shorter: other states)."""
    tmp = tmp_path_factory.mktemp("tracker_server")

    def tracker_only(meta):
        meta["program_tracker"]["params"] |= {"window_weight": 0.0, "window_weight_start": 0.0}

    def retrained(meta):
        meta["program_tracker"]["params"] |= {"window_weight": 0.0, "window_weight_start": 0.0, "line_weight": 0.5,
                                              "op_weight": 0.2}

    def reshaped(meta):
        tracker_only(meta)
        for key in ("timeline_line", "timeline_share"):
            meta["program_tracker"][key][0] = meta["program_tracker"][key][0][:-1]

    pkg.build_package(copy_export(tiny_export, tmp / "tracked", tracker_only), tmp / "reg", version="tracked")
    pkg.build_package(copy_export(tiny_export, tmp / "retrained", retrained), tmp / "reg", version="retrained")
    pkg.build_package(copy_export(tiny_export, tmp / "reshaped", reshaped), tmp / "reg", version="reshaped")
    pkg.build_package(copy_export(tiny_export, tmp / "old", drop_line_logits=True), tmp / "reg", version="old")
    for kind, weight in (("templates", 3.0), ("spread", 1.0)):
        pkg.build_package(copy_export(tiny_export, tmp / kind, with_evidence(synthetic_dataset, kind, weight)),
                          tmp / "reg", version=kind)
    pkg.promote(tmp / "reg", "tracked")
    srv = start_uvicorn(tmp, GCODEFP_REGISTRY=tmp / "reg", GCODEFP_ADMIN_TOKEN=ADMIN_TOKEN)
    srv.registry = tmp / "reg"
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    import httpx

    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def rows(tiny_export):
    """N_ROWS raw rows of an unseen synthetic run, in feature order (NaN: a board it lacks)."""
    f = json.loads((tiny_export / "model.json").read_text())["features"]
    frame = generate_run("adaptive", run_index=5, seed=13, machine_id=2).iloc[:N_ROWS]
    cont = np.stack([frame[c].to_numpy(float) if c in frame else np.full(len(frame), np.nan)
                     for c in f["continuous"]], axis=1)
    return cont, np.stack([frame[c].to_numpy() for c in f["categorical"]], axis=1).astype(float)


def body(cont, cat, start=None, every=1) -> dict:
    """A /stream body; every=1 (every row answered) unless None (the server's default)."""
    c = cont.astype(object)
    c[np.isnan(cont)] = None
    doc = {"sensor_data": {"continuous": c.tolist(), "categorical": cat.tolist()}}
    doc |= {} if every is None else {"every": every}
    return doc if start is None else doc | {"start": start}


def post(client, machine, cont, cat, start=None, every=1) -> dict:
    r = client.post(f"/stream/{machine}", json=body(cont, cat, start, every))
    assert r.status_code == 200, r.text
    return r.json()


def tracked_reference(predictor, cont, cat, at_program_start=False, judged=None, session=None):
    """The tracker's answers at the judged rows (default: every row) of these received rows
    (api_fixtures.tracked_windows), each with the window's path-named line where the position lies on
    the tool path."""
    out, steps, repeated = tracked_windows(predictor, cont, cat, at_program_start, judged, session)
    judged = range(len(cont)) if judged is None else judged
    path = [(int(out["line"][j]), float(out["line_confidence"][j])) if out["on_path"][j] else None for j in judged]
    return list(zip(steps, path)), repeated


def matches(predictor, predictions, steps) -> None:
    for p, (s, path) in zip(predictions, steps, strict=True):
        line, conf, source = (s.line, s.line_confidence, "tracker") if path is None else (*path, "path")
        assert p["line_source"] == source and p["gcode_sequence"] == predictor.lines[line]
        assert p["operation"]["name"] == predictor.operations[s.operation]
        assert p["operation"]["confidence"] == pytest.approx(s.operation_confidence, abs=1e-5)
        assert p["line_confidence"] == pytest.approx(conf, abs=1e-5)
        assert p["paused"] == pytest.approx(s.paused, abs=1e-5) and p["program_offset"] == s.offset
        assert p["entropy"] == pytest.approx(s.entropy, abs=1e-3)


def test_a_monitor_attached_mid_run_gets_tracker_answers_without_start(server, client, rows):
    cont, cat = rows
    predictor = OnnxPredictor.load(server.registry / "packages" / "tracked")
    first = post(client, "late-mill", cont[60:63], cat[60:63])   # no start, no row counter: rows 60.. of a run
    rest = post(client, "late-mill", cont[63:100], cat[63:100])
    assert first["mode"] == "tracker" and first["started"] is True and rest["started"] is False
    assert [p["row"] for p in first["predictions"] + rest["predictions"]] == list(range(40))
    steps, _ = tracked_reference(predictor, cont[60:100], cat[60:100])
    matches(predictor, first["predictions"] + rest["predictions"], steps)
    state = client.get("/stream/late-mill").json()
    assert state["mode"] == "tracker" and state["windows"] == 40 and state["clock"] is True
    # start=true is optional information: the filter starts at a program's first row instead of anywhere
    started = post(client, "late-mill", cont[:20], cat[:20], start=True)
    assert started["started"] is True and [p["row"] for p in started["predictions"]] == list(range(20))
    matches(predictor, started["predictions"], tracked_reference(predictor, cont[:20], cat[:20], True)[0])


def test_lost_and_repeated_rows_are_taken_and_the_session_keeps_going(server, client, rows):
    cont, cat = rows
    predictor = OnnxPredictor.load(server.registry / "packages" / "tracked")
    received = [i for i in range(30, 90) if i % 5]                     # every 5th row lost in transit
    received = received[:20] + [received[19]] * 8 + received[20:]      # then a stall: one row 8 more times
    c, k = cont[received], cat[received]
    got = []
    for lo in range(0, len(received), 13):                             # chunks that split windows and the stall
        got += post(client, "lossy-mill", c[lo:lo + 13], k[lo:lo + 13])["predictions"]
    steps, repeated = tracked_reference(predictor, c, k)
    assert repeated[20:28].all() and repeated.sum() >= 8               # the stall reached the tracker as repeats
    matches(predictor, got, steps)
    assert [p["row"] for p in got] == list(range(len(received)))
    state = client.get("/stream/lossy-mill").json()
    assert state["rows_since_start"] == state["windows"] == len(received)
    assert client.delete("/stream/lossy-mill").json()["ended"] is True


def test_by_default_a_chunk_is_judged_at_its_last_row_and_every_4th_before_it(server, client, rows):
    """A monitor posting 4 rows a second gets one answer a second and costs one window: the tracker
    moves over the rows between judged ones, and counts the stalled rows among them as pause evidence."""
    cont, cat = rows
    predictor = OnnxPredictor.load(server.registry / "packages" / "tracked")
    received = [i for i in range(30, 90) if i % 5]
    received = (received[:20] + [received[19]] * 8 + received[20:])[:32]   # lost rows, then a stall
    c, k = cont[received], cat[received]
    got, lo = [], 0
    for n in (5, 13, 4, 1, 9):
        answer = post(client, "sparse-mill", c[lo:lo + n], k[lo:lo + n], every=None)
        assert answer["predictions"][-1]["row"] == lo + n - 1              # the newest row always answered
        got += answer["predictions"]
        lo += n
    judged = [0, 4, 5, 9, 13, 17, 21, 22, 23, 27, 31]
    assert [p["row"] for p in got] == judged
    steps, repeated = tracked_reference(predictor, c, k, judged=judged)
    assert repeated[20:28].all()                                           # the stall falls between judged rows
    matches(predictor, got, steps)
    state = client.get("/stream/sparse-mill").json()
    assert state["rows_since_start"] == 32 and state["windows"] == len(judged)
    # every=1 in a request: that chunk's every row
    tail = post(client, "sparse-mill", cont[90:93], cat[90:93], every=1)["predictions"]
    assert [p["row"] for p in tail] == [32, 33, 34]


def batched_calls(client) -> tuple[float, float]:
    """(windows, calls) of the micro-batched graph calls so far (api/batcher.py)."""
    text = client.get("/metrics").text
    value = lambda name: sum(float(line.split()[-1]) for line in text.splitlines()  # noqa: E731
                             if line.startswith(f"gcodefp_batched_call_windows_{name} "))
    return value("sum"), value("count")


def test_machines_arriving_all_at_once_share_graph_calls_and_each_gets_its_own_answers(server, rows):
    """Sixteen monitors post at the same moment (a fleet after a network outage): their windows share
    graph calls, and every machine's answers are those of its own rows alone."""
    import asyncio

    import httpx

    cont, cat = rows
    predictor = OnnxPredictor.load(server.registry / "packages" / "tracked")
    machines = {f"fleet-{i}": slice(4 * i, 4 * i + 40) for i in range(16)}   # each attached at another row

    async def fleet() -> dict:
        got = {m: [] for m in machines}
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as c:
            for half in (slice(0, 20), slice(20, 40)):
                answers = await asyncio.gather(*(c.post(f"/stream/{m}", json=body(
                    cont[rows][half], cat[rows][half], every=None)) for m, rows in machines.items()))
                for m, r in zip(machines, answers):
                    assert r.status_code == 200, r.text
                    got[m] += r.json()["predictions"]
        return got

    with httpx.Client(base_url=server.url, timeout=60) as c:
        windows_before, calls_before = batched_calls(c)
        got = asyncio.run(fleet())
        windows_after, calls_after = batched_calls(c)
    judged = list(range(3, 40, 4))   # each 20-row chunk: its last row and every 4th before it
    for m, rows_of in machines.items():
        assert [p["row"] for p in got[m]] == judged
        steps, _ = tracked_reference(predictor, cont[rows_of], cat[rows_of], judged=judged)
        matches(predictor, got[m], steps)
    # 32 chunks of 5 judged windows each; calls holding several machines' windows make fewer calls
    assert windows_after - windows_before == 32 * 5 and calls_after - calls_before < 32


def test_a_package_without_line_logits_streams_with_the_clock_and_a_swap_drops_the_evidence(server, client, rows):
    cont, cat = rows
    old = OnnxPredictor.load(server.registry / "packages" / "old")
    assert old.bundle.program_tracker is not None and old.program_tracker is None   # the graph lacks line_logits
    auth = {"authorization": f"Bearer {ADMIN_TOKEN}"}
    w = old.window
    post(client, "swap-mill", cont[:40], cat[:40], start=True)
    try:
        assert client.post("/admin/reload", json={"version": "old"}, headers=auth).status_code == 200
        swapped = post(client, "swap-mill", cont[40:50], cat[40:50])
        assert swapped["model_changed"] is True and swapped["mode"] == "clock" and swapped["predictions"] == []
        clocked = post(client, "clock-mill", cont[:w + 4], cat[:w + 4], start=True)
        assert clocked["mode"] == "clock" and [p["row"] for p in clocked["predictions"]] == list(range(w - 1, w + 4))
        assert {p["line_source"] for p in clocked["predictions"]} <= {"clock", "window"}
        assert all("program_offset" not in p for p in clocked["predictions"])
        assert client.get("/stream/clock-mill").json()["mode"] == "clock"
        r = client.post("/stream/clock-mill", json=body(cont[:2], cat[:2], start="yes"))
        assert r.status_code == 422 and r.json()["error"].startswith("start")
    finally:
        assert client.post("/admin/reload", json={"version": "tracked"}, headers=auth).status_code == 200
    back = post(client, "swap-mill", cont[50:55], cat[50:55])
    assert back["model_changed"] is True and back["mode"] == "tracker" and len(back["predictions"]) == 5


def test_a_swap_to_a_tracker_of_the_same_programs_keeps_where_the_machine_is(server, client, rows):
    """Scheduled retraining swaps the served model under machines being followed: where in which
    program a machine is belongs to the machine, so a tracker with the same states carries the
    posterior over (the buffered rows still go: the new model may normalise otherwise); a tracker
    of other states starts from anywhere."""
    cont, cat = rows
    load = {v: OnnxPredictor.load(server.registry / "packages" / v) for v in ("tracked", "retrained", "reshaped")}
    auth = {"authorization": f"Bearer {ADMIN_TOKEN}"}
    before = load["tracked"].program_tracker.start(at_program_start=True)
    tracked_windows(load["tracked"], cont[:40], cat[:40], session=before)
    post(client, "retrain-mill", cont[:40], cat[:40], start=True)
    try:
        assert client.post("/admin/reload", json={"version": "retrained"}, headers=auth).status_code == 200
        carried = post(client, "retrain-mill", cont[40:50], cat[40:50])
        assert carried["model_changed"] is True and carried["rows_since_start"] == 50
        resumed = load["retrained"].program_tracker.resume(before)
        matches(load["retrained"], carried["predictions"],
                tracked_reference(load["retrained"], cont[40:50], cat[40:50], session=resumed)[0])
        assert client.post("/admin/reload", json={"version": "reshaped"}, headers=auth).status_code == 200
        assert load["reshaped"].program_tracker.resume(resumed) is None
        fresh = post(client, "retrain-mill", cont[50:60], cat[50:60])
        assert fresh["model_changed"] is True
        matches(load["reshaped"], fresh["predictions"], tracked_reference(load["reshaped"], cont[50:60], cat[50:60])[0])
    finally:
        assert client.post("/admin/reload", json={"version": "tracked"}, headers=auth).status_code == 200


@pytest.mark.parametrize("kind", ["templates", "spread"])
def test_operation_evidence_in_the_package_takes_part_in_every_judged_row(server, client, rows, kind):
    """A tracker that carries operation evidence from the readings (templates, or the spread model):
    the server scores each judged window's readings as the in-process reference does (also when chunks
    split the windows), and the evidence moves the answer: the same rows without it give other
    operation confidences."""
    cont, cat = rows
    carrying = OnnxPredictor.load(server.registry / "packages" / kind)
    tracker = carrying.program_tracker
    assert (tracker.uses_templates, tracker.uses_spread) == (kind == "templates", kind == "spread")
    auth = {"authorization": f"Bearer {ADMIN_TOKEN}"}
    try:
        assert client.post("/admin/reload", json={"version": kind}, headers=auth).status_code == 200
        served = [p for a, b in ((0, 37), (37, 80)) for p in
                  post(client, f"{kind}-mill", cont[a:b], cat[a:b], start=True if a == 0 else None)["predictions"]]
    finally:
        assert client.post("/admin/reload", json={"version": "tracked"}, headers=auth).status_code == 200
    steps, _ = tracked_reference(carrying, cont[:80], cat[:80], at_program_start=True)
    matches(carrying, served, steps)
    without = ProgramTracker.from_dict(tracker.to_dict())
    without.set_params(**{EVIDENCE_WEIGHT[kind]: 0.0})
    plain, _ = tracked_reference(carrying, cont[:80], cat[:80], session=without.start(at_program_start=True))
    assert max(abs(a.operation_confidence - b.operation_confidence) for (a, _), (b, _) in zip(steps, plain)) > 1e-3


def test_followed_machines_pick_up_where_they_were_after_a_restart(server, rows, tmp_path):
    """With GCODEFP_STREAM_STATE_DIR, a worker that stops writes each tracker session; after the restart
    a machine's next chunk continues its filter and its buffered rows, as if nothing had happened. A
    state too old, or unreadable, starts the machine afresh."""
    import httpx

    cont, cat = rows
    predictor = OnnxPredictor.load(server.registry / "packages" / "tracked")
    state_dir = tmp_path / "state"
    env = dict(GCODEFP_REGISTRY=server.registry, GCODEFP_STREAM_STATE_DIR=state_dir)
    first = start_uvicorn(tmp_path, **env)
    try:
        with httpx.Client(base_url=first.url, timeout=60) as c:
            for machine in ("kept-mill", "old-mill", "broken-mill"):
                before = post(c, machine, cont[30:70], cat[30:70])        # attached mid-run
    finally:
        first.stop()
    assert {f.name for f in state_dir.iterdir()} == {"kept-mill.state", "old-mill.state", "broken-mill.state"}
    (state_dir / "broken-mill.state").write_bytes(b"not a state file")
    second = start_uvicorn(tmp_path, **env, GCODEFP_STREAM_STATE_MAX_AGE_S=3600)
    try:
        with httpx.Client(base_url=second.url, timeout=60) as c:
            found = c.get("/stream/kept-mill")   # asking where it is finds it too
            after = post(c, "kept-mill", cont[70:100], cat[70:100])
            broken = post(c, "broken-mill", cont[70:100], cat[70:100])
    finally:
        second.stop()
    assert found.status_code == 200 and found.json()["rows_since_start"] == 40
    assert after["started"] is False and after["rows_since_start"] == 70
    assert [p["row"] for p in after["predictions"]] == list(range(40, 70))
    steps, _ = tracked_reference(predictor, cont[30:100], cat[30:100])
    matches(predictor, before["predictions"] + after["predictions"], steps)   # the same as one uninterrupted session
    assert broken["started"] is True and broken["predictions"][0]["row"] == 0
    # the second worker followed kept-mill and broken-mill and wrote them again at its shutdown; old-mill
    # was never asked for and waits
    assert {f.name for f in state_dir.iterdir()} == {"kept-mill.state", "old-mill.state", "broken-mill.state"}
    third = start_uvicorn(tmp_path, **env, GCODEFP_STREAM_STATE_MAX_AGE_S=0)   # old-mill's state is now too old
    try:
        with httpx.Client(base_url=third.url, timeout=60) as c:
            stale = post(c, "old-mill", cont[70:100], cat[70:100])
    finally:
        third.stop()
    assert stale["started"] is True and stale["rows_since_start"] == 30
    assert "stream_restored" in second.log_text() and "stream_state_unreadable" in second.log_text()


def test_gcodefp_track_follows_a_log_offline_as_the_server_does(server, client, tmp_path):
    """`gcodefp track` (a log file, no server) answers as POST /stream does for the same rows sent as
    one chunk: the same judged rows, lines, operations and confidences."""
    from gcodefp_core.cli import main
    from gcodefp_core.logs import read_log
    from gcodefp_core.schema import FeatureColumns
    from gcodefp_core.synthetic import write_synthetic_logs

    package = server.registry / "packages" / "tracked"
    (log,) = write_synthetic_logs(tmp_path / "logs", 1, seed=21, operations="pocket", machine_id=1)
    spec = OnnxPredictor.load(package).features
    frame = read_log(log, FeatureColumns(tuple(spec.continuous), tuple(spec.categorical))).frame.iloc[:90]
    (tmp_path / "short").mkdir()
    short = tmp_path / "short" / "pocket_001_aligned.csv"
    frame.to_csv(short, index=False)
    cont = np.stack([frame[c].to_numpy(float) if c in frame else np.full(len(frame), np.nan)
                     for c in spec.continuous], axis=1)
    cat = np.stack([frame[c].to_numpy(float) for c in spec.categorical], axis=1)
    served = post(client, "offline-twin", cont, cat, every=4)["predictions"]
    assert main(["track", str(short), "--package", str(package), "--output", str(tmp_path / "out.jsonl")]) == 0
    offline = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [a["row"] for a in offline] == [p["row"] for p in served] == list(range(1, 90, 4))
    for a, p in zip(offline, served):
        assert (a["gcode_sequence"], a["line_source"], a["operation"]["name"], a["program_offset"]) == \
            (p["gcode_sequence"], p["line_source"], p["operation"]["name"], p["program_offset"])
        assert a["line_confidence"] == pytest.approx(p["line_confidence"], abs=1e-5)
        assert a["logged"]["operation"] == "pocket"
    assert main(["track", str(short), "--package", str(package), "--every", "0"]) == 2   # one clear line, no trace


def test_garbage_gives_422_naming_the_field_and_holds_no_session(client, rows):
    cont, cat = rows
    good = body(cont[:3], cat[:3])
    cases = [({"sensor_data": good["sensor_data"] | {"continuous": [["x"] * cont.shape[1]] * 3}},
              "sensor_data.continuous"),
             ({"sensor_data": good["sensor_data"] | {"categorical": good["sensor_data"]["categorical"][:2]}},
              "sensor_data.categorical"),
             (good | {"start": 1}, "start"), (good | {"every": 0}, "every"), (good | {"every": 2.5}, "every"),
             (good | {"every": True}, "every"), ({"start": True}, "sensor_data"), (good | {"offset": 3}, "offset")]
    for doc, field in cases:
        r = client.post("/stream/garbage-mill", json=doc)
        assert r.status_code == 422 and r.json()["error"].startswith(field), (field, r.text)
    assert client.get("/stream/garbage-mill").status_code == 404


def test_the_tracker_travels_from_the_checkpoint_through_model_json(tiny_export, server):
    import torch

    meta = json.loads((tiny_export / "model.json").read_text())
    ckpt = torch.load(meta["source_checkpoint"]["path"], weights_only=True)
    assert ckpt["program_tracker"] == meta["program_tracker"]
    assert {"val_tracker_exact_match", "val_tracker_start_exact_match", "val_tracker_attached_exact_match",
            "val_tracker_attached_op_acc"} <= set(ckpt["metrics"])
    served = OnnxPredictor.load(server.registry / "packages" / "tracked").program_tracker
    again = ProgramTracker.from_dict(json.loads(json.dumps(served.to_dict())))
    assert again.to_dict() == served.to_dict() and again.n_states == served.n_states
    rng = np.random.default_rng(0)
    op, line = rng.normal(size=len(again.operations)), rng.normal(size=again.n_lines)
    np.testing.assert_allclose(again.emission(op, line), served.emission(op, line))
