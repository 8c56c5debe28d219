"""The benchmark_report asset links what callers of the server got, when the serving benchmark ran."""
from __future__ import annotations

import json

from gcodefp_dagster.defs.release.benchmark import served_figures


def test_no_serving_results_no_links(tmp_path):
    assert served_figures(tmp_path) == {}


def test_serving_results_are_linked_with_their_bars(tmp_path):
    bars = {"json_w1_rate_at_p99_10ms": 250, "stream_w1_machines_at_p99_50ms": 250}
    (tmp_path / "serving.json").write_text(json.dumps({"bars": bars, "runs": []}))
    out = served_figures(tmp_path)
    assert out["served_figures"].value == str(tmp_path / "serving.json")
    assert out["served_bars"].value == bars and "served_plot" not in out
    (tmp_path / "serving.png").write_bytes(b"\x89PNG")
    assert served_figures(tmp_path)["served_plot"].value == str(tmp_path / "serving.png")
    (tmp_path / "serving.json").write_text("{not json")
    assert served_figures(tmp_path) == {}
