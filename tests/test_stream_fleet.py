"""Many machines streaming to the real server at once, as a monitoring fleet does: concurrent /stream
chunks share micro-batched graph calls (api/batcher.py), and each machine must still get the answers
of its own rows, as if it were the only one."""
from __future__ import annotations

import threading

import numpy as np
import pytest

from api_fixtures import tracked_windows


@pytest.mark.slow
def test_many_machines_at_once_are_each_answered_as_if_alone(http, predictor, package_meta):
    """12 machines post 4-row chunks (judged every 4th row) all at once, the way a monitoring fleet does:
    each machine's answers are the in-process tracker's for its own rows, whichever machines its chunks
    shared a micro-batched graph call with, and chunks of one machine never mix with another's."""
    from gcodefp_core.synthetic import generate_run

    f, ops = package_meta["features"], ["pocket", "face", "adaptive"]
    runs = []
    for m in range(12):
        frame = generate_run(ops[m % 3], run_index=20 + m, seed=m, machine_id=m % 4).iloc[:48]
        cont = np.stack([frame[c].to_numpy(float) if c in frame else np.full(len(frame), np.nan)
                         for c in f["continuous"]], axis=1)
        runs.append((cont, np.stack([frame[c].to_numpy() for c in f["categorical"]], axis=1).astype(float)))
    answers, errors = [[] for _ in runs], []

    def machine(m):
        cont, cat = runs[m]
        try:
            for lo in range(0, len(cont), 4):
                c = cont[lo:lo + 4].astype(object)
                c[np.isnan(cont[lo:lo + 4])] = None
                r = http.post(f"/stream/fleet-{m}", json={"sensor_data": {"continuous": c.tolist(),
                              "categorical": cat[lo:lo + 4].tolist()}, "start": lo == 0, "every": 4})
                assert r.status_code == 200, r.text
                answers[m] += r.json()["predictions"]
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=machine, args=(m,)) for m in range(len(runs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors
    for m, (cont, cat) in enumerate(runs):
        judged = list(range(3, len(cont), 4))
        out, steps, _ = tracked_windows(predictor, cont, cat, at_program_start=True, judged=judged)
        assert [p["row"] for p in answers[m]] == judged
        for j, p, s in zip(judged, answers[m], steps):
            # a position on the program's tool path names the line (this model reads positions)
            on_path = bool(out["on_path"][j])
            assert p["line_source"] == ("path" if on_path else s.line_source)
            assert p["gcode_sequence"] == predictor.lines[int(out["line"][j]) if on_path else s.line]
            assert p["program_offset"] == s.offset
            assert p["operation"]["name"] == predictor.operations[s.operation]
            assert p["operation"]["confidence"] == pytest.approx(s.operation_confidence, abs=1e-5)
            confidence = float(out["line_confidence"][j]) if on_path else s.line_confidence
            assert p["line_confidence"] == pytest.approx(confidence, abs=1e-5)
    for m in range(len(runs)):
        http.delete(f"/stream/fleet-{m}")
