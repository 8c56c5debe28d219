"""benchmarks/program_clock.py: the program-clock reference (row offset since the program started,
looked up in the training runs) on the synthetic dataset."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np

from gcodefp_core.dataset import load_dataset

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "program_clock.py"


def load_script():
    spec = importlib.util.spec_from_file_location("program_clock", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_clock_scores_every_window_and_reads_its_own_runs_back(synthetic_dataset, tmp_path, monkeypatch, capsys):
    clock = load_script()
    ds = load_dataset(synthetic_dataset)
    test = clock.evaluate(ds, "test")
    kinds = ("per_program", "per_operation")
    for kind in kinds:   # the row clock's timelines and the tracker's
        per = test[kind]["per_operation"]
        assert test["windows"] == len(ds.split_windows("test")) == sum(m["windows"] for m in per.values())
        assert 0.0 <= test[kind]["overall"] <= 1.0
    # On the training split the tables are built from the same runs: where a timeline has one training
    # run per offset the lookup returns that run's own line, so it beats the test split. Per operation
    # every synthetic operation has its own runs, so it reads them back at least as well.
    train = clock.evaluate(ds, "train")
    for kind in kinds:
        assert train[kind]["overall"] >= test[kind]["overall"] and train[kind]["overall"] > 0.5
    assert train["per_operation"]["overall"] >= train["per_program"]["overall"]
    out = tmp_path / "clock.json"
    monkeypatch.setattr("sys.argv", ["program_clock.py", "--dataset", str(synthetic_dataset), "--output", str(out)])
    clock.main()
    written = json.loads(out.read_text())
    assert all(np.isclose(written[kind]["overall"], test[kind]["overall"]) for kind in kinds)
    assert "OVERALL" in capsys.readouterr().out
