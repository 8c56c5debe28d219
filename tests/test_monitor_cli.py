"""`gcodefp monitor`: a recorded log replayed to a running server's /stream, as a monitor would."""
from __future__ import annotations

import json

import httpx
import pytest

from api.monitor_cli import received_rows
from api_fixtures import free_port
from gcodefp_core.cli import main
from gcodefp_core.logs import read_log
from gcodefp_core.schema import TARGET_COLUMN, FeatureColumns
from gcodefp_core.synthetic import write_synthetic_logs
from gcodefp_core.tokenizer import canonicalize

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def log(tmp_path_factory):
    return write_synthetic_logs(tmp_path_factory.mktemp("logs"), runs_per_operation=1, seed=5, operations="pocket",
                                machine_id=4)[0]


def answers(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_log_replayed_from_its_start_answers_at_the_served_cadence_beside_its_labels(api_server, log, tmp_path,
                                                                                     capsys):
    out = tmp_path / "answers.jsonl"
    assert main(["monitor", str(log), "--url", api_server.url, "--machine", "replayed-mill", "--start",
                 "-o", str(out)]) == 0
    features = httpx.get(f"{api_server.url}/info").json()["features"]
    run = read_log(log, FeatureColumns(tuple(features["continuous"]), tuple(features["categorical"])))
    got = answers(out)
    n = len(run.frame)
    # 4-row chunks, the server's default `every` (4): each chunk's last row answers
    assert [a["log_row"] for a in got] == list(range(3, n - n % 4, 4)) + ([n - 1] if n % 4 else [])
    assert all(a["row"] == a["log_row"] for a in got)   # from the start: the server's count is the log's
    assert all(a["logged"] == {"operation": "pocket", "gcode_sequence": canonicalize(run.frame[TARGET_COLUMN].iloc[
        a["log_row"]])} for a in got)
    state = httpx.get(f"{api_server.url}/stream/replayed-mill").json()
    assert state["rows_since_start"] == n
    summary = capsys.readouterr().err
    assert f"pocket_001 as replayed-mill: {n} rows posted in {-(-n // 4)} requests, {len(got)} answers" in summary


def test_a_late_lossy_monitor_maps_each_answer_to_the_log_row_it_received(api_server, log, tmp_path):
    out = tmp_path / "late.jsonl"
    assert main(["monitor", str(log), "--url", api_server.url, "--machine", "late-mill", "--from-row", "40",
                 "--lose", "0.2", "--seed", "3", "--chunk", "7", "-o", str(out)]) == 0
    got = answers(out)
    features = httpx.get(f"{api_server.url}/info").json()["features"]
    n = len(read_log(log, FeatureColumns(tuple(features["continuous"]), tuple(features["categorical"]))).frame)
    rows = received_rows(n, 40, 0.2, 3)
    assert rows[0] == 40 and 0.6 * (n - 40) < len(rows) < 0.95 * (n - 40)
    assert httpx.get(f"{api_server.url}/stream/late-mill").json()["rows_since_start"] == len(rows)
    # each answer sits at the row the server counted, which is the k-th row received
    assert [a["log_row"] for a in got] == [int(rows[a["row"]]) for a in got]
    assert {a["log_row"] for a in got} >= {int(rows[k]) for k in range(6, len(rows), 7)}   # each chunk's last row


def test_bad_arguments_and_an_unreachable_server_are_one_line_errors(log, tmp_path, capsys):
    nobody = f"http://127.0.0.1:{free_port()}"   # no server listens there
    cases = [(["--lose", "1.5"], "--lose: must be in [0, 1)"), (["--chunk", "0"], "--chunk: must be >= 1"),
             (["--rate", "-1"], "--rate: must be >= 0"), ([], "cannot reach")]
    for extra, message in cases:
        assert main(["monitor", str(log), "--url", nobody, *extra]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (extra, err)
    assert main(["monitor", str(tmp_path / "nowhere_001_aligned.csv"), "--url", nobody]) == 2
    assert "no such log" in capsys.readouterr().err


def test_attaching_past_the_log_end_is_refused(api_server, log, capsys):
    assert main(["monitor", str(log), "--url", api_server.url, "--from-row", "100000"]) == 2
    assert "--from-row: the log has" in capsys.readouterr().err
