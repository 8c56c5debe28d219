"""benchmarks/serving.py end to end on the tiny package: a very short run (no speed is asserted)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from api_fixtures import REPO, server_env


@pytest.mark.slow
def test_serving_benchmark_tiny_run(api_registry, tmp_path):
    out = tmp_path / "serving.json"
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "serving.py"), "--registry", str(api_registry),
                        "--workers", "1", "--quick", "--duration", "1", "--swap-rate", "20", "--output", str(out)],
                       env=server_env(), capture_output=True, text=True, timeout=600, cwd=REPO)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    result = json.loads(out.read_text())
    run = result["runs"][0]
    assert run["workers"] == 1 and set(run["sweeps"]) == {"json", "binary", "batch", "stream"}
    for mode, steps in run["sweeps"].items():
        for s in steps:
            assert s["errors"] == 0 and s["requests"] > 0, (mode, s)
            assert s["p50_ms"] <= s["p99_ms"]
    assert run["sweeps"]["json"][0]["server"]["parse"]["count"] > 0   # the split was read from /metrics
    per_window = run["sweeps"]["json"][0]["server"]["inference_per_window"]   # model time over the step's windows
    assert per_window["windows"] > 0 and per_window["mean"] > 0
    assert run["swap"]["errors"] == 0 and run["swap"]["versions"].get(run["swap"]["to"], 0) > 0
    assert len(run["rss_mb_per_worker"]) == 1 and run["rss_mb_per_worker"][0] > 0
    assert result["bare"]["graph_run_ms"] > 0 and "inference_w1_ratio_to_bare_predict" in result["bars"]
    assert result["bare"]["predict_after_parse_ms"] > 0 and result["bare"]["predict_after_1ms_idle_ms"] > 0
    paired = run["paired_inference"]["rounds"]
    assert len(paired) == 2 and all(r["bare_predict_ms"] > 0 and r["server_inference_ms"] > 0 for r in paired)
    assert result["bars"]["inference_w1_paired_ratio_to_bare_predict"] == run["paired_inference"]["ratio_median"]
    assert out.with_suffix(".png").stat().st_size > 0 and (tmp_path / "serving_w1.json").exists()
    assert "| 1 | json |" in r.stdout
    for end in ("machine_start", "machine_end"):   # the VM's speed beside the figures, at both ends
        speed = result[end]
        assert speed["python_loop_ms"] > 0 and speed["numpy_small_us"] > 0 and speed["tracker_update_us"] > 0
        assert speed["idle_wake_ratio"] > 0
    assert "machine speed" in r.stdout


def test_serving_benchmark_with_client_tokens(api_registry, tmp_path):
    """--tokens: the server asks for a token and every request of the load carries one (a request
    without it would be a 401, counted as an error)."""
    out = tmp_path / "serving.json"
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "serving.py"), "--registry", str(api_registry),
                        "--workers", "1", "--quick", "--duration", "1", "--swap-rate", "0", "--modes", "json", "stream",
                        "--tokens", "--output", str(out)],
                       env=server_env(), capture_output=True, text=True, timeout=600, cwd=REPO)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["client_tokens"] is True
    assert set(result["runs"][0]["sweeps"]) == {"json", "stream"}
    steps = [s for steps in result["runs"][0]["sweeps"].values() for s in steps]
    assert all(s["errors"] == 0 and s["requests"] > 0 for s in steps)


def test_server_cost_tiny_run(api_registry, tmp_path):
    """benchmarks/server_cost.py drives the app in process: every request answered, CPU and the split read."""
    out = tmp_path / "server_cost.json"
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "server_cost.py"), "--registry", str(api_registry),
                        "--requests", "30", "--profile", "--output", str(out)],
                       env=server_env(), capture_output=True, text=True, timeout=300, cwd=REPO)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert [m["mode"] for m in doc["results"]] == ["json", "binary", "stream"]
    for m in doc["results"]:
        assert m["errors"] == 0 and m["requests"] == 30 and m["cpu_ms_per_request"] > 0, m
        # the endpoint is found inside the stack, and the stack around it costs something
        assert 0 < m["profile"]["endpoint_share"] < 1 and m["profile"]["top_own_time"], m
    assert doc["machine_speed"]["python_loop_ms"] > 0
    assert "| stream | 30 | 0 |" in r.stdout
    assert '"event": "request"' in Path(doc["log"]).read_text().replace('":"', '": "')  # access log to the file


def test_server_cost_rejects_a_folder_that_is_not_a_registry(tmp_path):
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "server_cost.py"), "--registry", str(tmp_path)],
                       env=server_env(), capture_output=True, text=True, timeout=120, cwd=REPO)
    assert r.returncode != 0 and "no CURRENT file" in r.stderr and "Traceback" not in r.stderr
