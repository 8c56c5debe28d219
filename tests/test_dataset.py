"""End-to-end dataset builds: windows, run-level splits, train-only normalisation, atomic artifact."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from gcodefp_core.dataset import DatasetConfig, build_dataset, load_dataset, split_runs
from gcodefp_core.logs import LogFormatError
from gcodefp_core.schema import OPERATIONS


def test_synthetic_dataset_shapes_and_manifest(synthetic_dataset):
    ds = load_dataset(synthetic_dataset)
    m = ds.manifest
    assert ds.operations == list(OPERATIONS)
    assert len(ds.continuous_features) == 171 and ds.categorical_features == ["stat", "unit", "dist", "coor", "momo"]
    assert m["counts"]["runs"] == 27 and all(m["counts"]["windows"][s] > 0 for s in ("train", "val", "test"))
    assert len(m["content_hash"]) == 64 and m["tokenizer"]["vocab_size"] == ds.tokenizer.vocab_size
    ids = ds.split_windows("train")[:7]
    b = ds.batch(ids)
    assert b["continuous"].shape == (7, ds.window, 171) and b["continuous"].dtype == np.float32
    assert b["categorical"].shape == (7, ds.window, 5) and b["categorical"].min() >= 0
    assert b["tokens"].shape == (7, ds.max_tokens) and (b["tokens"][:, 0] == ds.tokenizer.BOS).all()
    assert [ds.tokenizer.decode(t) for t in b["tokens"]] == ds.target_lines(ids)


def test_splits_are_by_run_and_stratified(synthetic_dataset):
    ds = load_dataset(synthetic_dataset)
    runs = ds.manifest["runs"]
    for split in ("train", "val", "test"):
        run_ids = set(ds.batch(ds.split_windows(split))["run"].tolist())
        assert {runs[i]["split"] for i in run_ids} == {split}  # no window of a run leaks into another split
        assert {runs[i]["operation"] for i in run_ids} == set(OPERATIONS)  # every operation in every split


def test_windows_never_cross_runs_and_target_is_last_row(synthetic_dataset):
    ds = load_dataset(synthetic_dataset)
    row_run, row_line = ds.arrays["row_run"], ds.arrays["row_line"]
    for split in ("train", "val", "test"):
        ends = ds.split_windows(split)
        assert (row_run[ends] == row_run[ends - ds.window + 1]).all()
        lines = ds.target_lines(ends[:50])
        assert lines == [ds.manifest["lines"][i] for i in row_line[ends[:50]]]
    # stride 1: every row offset from window-1 to the end of each run
    r = ds.manifest["runs"][0]
    assert r["windows"] == r["rows"] - ds.window + 1


def test_normalisation_is_fitted_on_train_only(synthetic_dataset):
    ds = load_dataset(synthetic_dataset)
    train_rows = np.concatenate([np.arange(r["first_row"], r["first_row"] + r["rows"])
                                 for r in ds.manifest["runs"] if r["split"] == "train"])
    j = ds.continuous_features.index("spindle")
    col = ds.arrays["rows_continuous"][train_rows, j]
    assert abs(col.mean()) < 1e-3 and abs(col.std() - 1) < 0.05
    test_rows = ds.arrays["rows_continuous"][ds.split_windows("test"), j]
    assert abs(test_rows.mean()) > 1e-4  # test rows were normalised with train stats, not their own


def test_split_is_seeded_and_deterministic():
    class R:
        def __init__(self, name):
            self.name, self.operation = name, name.split("_")[0]
    runs = [R(f"{op}_{i:03d}_aligned") for op in OPERATIONS for i in range(1, 8)]
    a, b = split_runs(runs, 0.15, 0.15, seed=1), split_runs(runs, 0.15, 0.15, seed=1)
    assert a == b and a != split_runs(runs, 0.15, 0.15, seed=2)
    for op in OPERATIONS:
        splits = [a[r.name] for r in runs if r.operation == op]
        assert splits.count("test") == 1 and splits.count("val") == 1


def test_build_is_deterministic_and_atomic(tmp_path, synthetic_dataset):
    logs = synthetic_dataset / "logs"
    cfg = DatasetConfig(source=str(logs), window=32, seed=0)
    a = build_dataset(cfg, tmp_path / "a")
    b = build_dataset(cfg, tmp_path / "b")
    ha = json.loads((a / "manifest.json").read_text())["content_hash"]
    assert ha == json.loads((b / "manifest.json").read_text())["content_hash"]
    # a failing rebuild leaves the previous artifact untouched and no temp folders behind
    bad = tmp_path / "bad_logs"
    shutil.copytree(logs, bad)
    (bad / "face_009_aligned.csv").write_text("")
    with pytest.raises(LogFormatError, match="face_009_aligned.csv, line 1: empty file"):
        build_dataset(DatasetConfig(source=str(bad), window=32), a)
    assert json.loads((a / "manifest.json").read_text())["content_hash"] == ha
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "bad_logs"]


def test_skip_bad_files_reports_them(tmp_path, synthetic_dataset):
    bad = tmp_path / "logs"
    shutil.copytree(synthetic_dataset / "logs", bad)
    (bad / "face_009_aligned.csv").write_text("stat,line\n5,1\n")
    out = build_dataset(DatasetConfig(source=str(bad), window=32, skip_bad_files=True), tmp_path / "ds")
    skipped = json.loads((out / "manifest.json").read_text())["skipped_files"]
    assert len(skipped) == 1 and skipped[0]["file"] == "face_009_aligned.csv" and "missing required" in skipped[0]["error"]


def test_side_channel_has_no_controller_state(tmp_path, synthetic_dataset):
    out = build_dataset(DatasetConfig(source=str(synthetic_dataset / "logs"), feature_set="side_channel", window=32),
                        tmp_path / "side")
    ds = load_dataset(out)
    banned = ("pos", "mpo", "feed", "line", "gcode")
    assert not [f for f in ds.continuous_features if f.startswith(banned)]
    assert ds.categorical_features == [] and ds.batch(ds.split_windows("val")[:3])["categorical"].shape == (3, 32, 0)
    assert not [f for f in ds.continuous_features if f.split(".")[-1] in ("Pressure", "Temperature", "ColorR")]


@pytest.mark.real_data
def test_real_dataset_builds(tmp_path, real_data_dir):
    out = build_dataset(DatasetConfig(source=str(real_data_dir), feature_set="full"), tmp_path / "real")
    ds = load_dataset(out)
    c = ds.manifest["counts"]
    assert c["runs"] == 126 and c["dropped_rows"] == 2773
    assert set(ds.manifest["splits"]["test"]).isdisjoint(ds.manifest["splits"]["train"])
    assert sum(c["windows"].values()) == c["rows"] - 126 * (ds.window - 1)
    ids = ds.split_windows("test")
    assert [ds.tokenizer.decode(t) for t in ds.batch(ids[:200])["tokens"]] == ds.target_lines(ids[:200])
