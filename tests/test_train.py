"""Training, checkpoints, determinism/resume, ensembles, evaluation and the train/evaluate CLI,
with tiny models on the session's synthetic dataset."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from gcodefp_core import evaluate, tracking
from gcodefp_core.checkpoints import load_checkpoint
from gcodefp_core.cli import main
from gcodefp_core.config import TUNABLE_FIELDS, load_config
from gcodefp_core.dataset import load_dataset
from gcodefp_core.train import train_model, validate

torch.set_num_threads(1)
TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.json"


def tiny_config(**train) -> dict:
    cfg = load_config(TINY)
    cfg["train"].update(train)
    cfg["wandb"] = {"mode": "disabled"}
    return cfg


@pytest.fixture(scope="module")
def ds(synthetic_dataset):
    return load_dataset(synthetic_dataset)


@pytest.fixture(scope="module")
def trained(ds, tmp_path_factory):
    run = tmp_path_factory.mktemp("train") / "run"
    result = train_model(tiny_config(epochs=8, samples_per_epoch=2048, patience=8), ds, run, seed=42)
    return run, result


def test_training_reduces_loss_and_learns_above_chance(trained):
    run, result = trained
    history = json.loads((run / "metrics.json").read_text())["history"]
    assert len(history) == 8
    assert history[-1]["train_loss"] < 0.6 * history[0]["train_loss"]
    assert history[-1]["train_tok_loss"] < history[0]["train_tok_loss"]
    # 9 operations (chance 11%); every line is one of ~230 words per position.
    assert result["val_op_acc"] > 0.3
    assert result["val_token_acc_tf"] > 0.5
    assert result["best_epoch"] >= 2


def test_checkpoint_round_trips_without_pickled_code(trained, ds):
    run, result = trained
    raw = torch.load(run / "checkpoint_best.pt", weights_only=True)
    assert raw["dataset"]["features"] == ds.manifest["features"]
    assert raw["dataset"]["tokenizer"] == ds.manifest["tokenizer"]
    assert raw["dataset"]["content_hash"] == ds.manifest["content_hash"]
    assert raw["metrics"]["val_op_acc"] == result["val_op_acc"]
    model, bundle, ckpt = load_checkpoint(run / "checkpoint_best.pt")
    val_ids = ds.split_windows("val")
    val_ids = val_ids[np.linspace(0, len(val_ids) - 1, 512).astype(np.int64)]
    again = validate(model, bundle.line_table, ds, val_ids)   # the line head alone, as during training
    assert again["op_acc"] == pytest.approx(ckpt["metrics"]["val_op_acc"])
    assert again["exact_match"] == pytest.approx(ckpt["metrics"]["val_exact_match"])
    # The bundle carries the program path fitted after training; predictions with it snap onto it.
    assert bundle.program_path is not None and bundle.program_path.tolerance_mm == ckpt["metrics"]["val_path_tolerance_mm"]
    pred = evaluate.predict([model], bundle, ds, val_ids, greedy=False)
    snapped = evaluate.summarise(evaluate.line_scores(pred, ds, val_ids, bundle.line_table.lines))
    assert snapped["exact_match"] == pytest.approx(ckpt["metrics"]["val_path_exact_match"])
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_checkpoint(run / "missing.pt")
    (run / "junk.pt").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="junk.pt"):
        load_checkpoint(run / "junk.pt")


def test_same_seed_same_weights_and_resume_continues_exactly(ds, tmp_path):
    # Two short epochs: what is compared is the weights after epoch 2.
    cfg = tiny_config(epochs=2, samples_per_epoch=256)
    train_model(cfg, ds, tmp_path / "a", seed=7)
    train_model(cfg, ds, tmp_path / "b", seed=7, stop_after=1)
    assert json.loads((tmp_path / "b" / "metrics.json").read_text())["epochs"] == 1
    train_model(cfg, ds, tmp_path / "b", seed=7, resume=True)
    train_model(cfg, ds, tmp_path / "c", seed=8)
    a, b, c = (torch.load(tmp_path / r / "checkpoint_last.pt", weights_only=True)["state_dict"] for r in "abc")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_metric_definitions_on_known_predictions(ds):
    ids = ds.split_windows("test")[:50]
    b = ds.batch(ids)
    target = b["tokens"][:, 1:]
    pred = {"op_prob": np.eye(9)[b["operation"]], "tf_pred": target.copy(), "tf_loss": np.zeros(50),
            "decoded": target.copy(), "targets": target, "operation": b["operation"]}
    perfect = evaluate.summarise(evaluate.line_scores(pred, ds, ids))
    assert perfect["exact_match"] == perfect["word_acc"] == perfect["token_acc_greedy"] == perfect["op_acc"] == 1.0
    # Drop the first word of every line: no exact match, and fewer words right.
    dropped = target.copy()
    dropped[:, :-1] = target[:, 1:]
    dropped[:, -1] = 0
    pred["decoded"] = dropped
    worse = evaluate.summarise(evaluate.line_scores(pred, ds, ids))
    assert worse["exact_match"] == 0.0 and worse["word_acc"] < 0.5 and worse["token_acc_tf"] == 1.0


def test_fingerprint_retrieval_ignores_same_run_neighbours():
    fp = np.eye(3)
    hits = evaluate.fingerprint_nn_accuracy(fp, np.array([0, 1, 2]), np.array([0, 1, 2]),
                                            np.vstack([fp, fp]), np.array([0, 1, 2, 0, 1, 1]), np.array([0, 1, 2, 5, 6, 7]))
    # Each query's identical twin is from its own run and excluded; the copies in runs 5-7 decide.
    assert hits.tolist() == [True, True, False]


def test_cli_trains_an_ensemble_and_evaluates_it(synthetic_dataset, tmp_path, capsys):
    out = tmp_path / "models"
    assert main(["train", "--config", str(TINY), "--output", str(out), "--seed", "42", "--ensemble", "2",
                 "--dataset", str(synthetic_dataset), "--epochs", "2"]) == 0
    doc = json.loads((out / "ensemble_config.json").read_text())
    assert [m["name"] for m in doc["members"]] == ["ensemble_model_1_seed42", "ensemble_model_2_seed43"]
    assert doc["selected"] in {m["name"] for m in doc["members"]}
    assert all((out / m["checkpoint"]).is_file() for m in doc["members"])
    assert list((out / "ensemble_model_1_seed42" / "wandb").glob("offline-run-*")), "W&B offline run folder"
    report_path = tmp_path / "report.json"
    assert main(["evaluate", "--checkpoint", str(out), "--split", "test", "--ensemble", "--max-windows", "300",
                 "--output", str(report_path)]) == 0
    report = json.loads(report_path.read_text())
    for key in ("single", "ensemble"):
        assert set(evaluate.OVERALL_METRICS) <= set(report[key]["overall"])
        assert set(report[key]["per_operation"]) <= set(ds_ops(synthetic_dataset))
    assert "OVERALL" in capsys.readouterr().out


def ds_ops(path):
    return json.loads((Path(path) / "manifest.json").read_text())["operations"]


def test_cli_bad_input_exits_2_with_one_line(tmp_path, capsys, monkeypatch):
    assert main(["evaluate", "--checkpoint", str(tmp_path / "nope.pt")]) == 2
    assert "not found" in capsys.readouterr().err
    bad = json.loads(TINY.read_text())
    bad["train"]["learning_rate"] = 0.1
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    assert main(["train", "--config", str(tmp_path / "bad.json"), "--output", str(tmp_path / "o")]) == 2
    assert "learning_rate" in capsys.readouterr().err
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert main(["train", "--config", str(TINY), "--output", str(tmp_path / "o"), "--sweep-id", "me/proj/abc123"]) == 2
    err = capsys.readouterr().err
    assert "needs W&B online" in err and err.count("\n") == 1


def test_sweep_config_merges_nested_dotted_and_bare_keys():
    cfg = tiny_config()
    before = copy.deepcopy(cfg)
    merged = tracking.apply_sweep_config(cfg, {"train": {"lr": 0.01}, "model.d_model": 48, "patience": 9,
                                               "seed": 3, "unrelated": 1}, TUNABLE_FIELDS)
    assert merged["train"]["lr"] == 0.01 and merged["train"]["patience"] == 9
    assert merged["model"]["d_model"] == 48
    assert "seed" not in merged["train"] and cfg == before


@pytest.mark.parametrize("per_program", [False, True])
def test_line_table_classes_name_each_training_target(synthetic_dataset, per_program):
    """Every training window's target has a class whose text is the target line and whose program is
    the window's program; per program, a line shared by programs gets one class in each."""
    from gcodefp_core.dataset import load_dataset
    from gcodefp_core.programs import LineTable, build_line_table, row_classes

    ds = load_dataset(synthetic_dataset)
    table = build_line_table(ds, per_program=per_program)
    assert LineTable.from_dict(table.to_dict()).per_program == per_program
    classes = row_classes(ds, table)
    ids = ds.split_windows("train")
    cls = classes[ids]
    assert (cls >= 0).all()
    assert [table.lines[c] for c in cls] == ds.target_lines(ids)
    programs = np.asarray(table.operation_program)[ds.operation_labels(ids)]
    assert table.mask[programs, cls].all()
    if per_program:
        assert (table.mask.sum(0) == 1).all() and len(table.lines) > len(set(table.lines))
    else:
        assert len(table.lines) == len(set(table.lines))


def test_augmentation_touches_only_what_it_says(ds):
    """Sensor offsets shift each window's sensor channels by one constant per channel and never touch
    controller state; board dropout zeroes whole boards (= the fill of an unrecorded board);
    categorical dropout maps whole columns of a window to "unknown" (0); all off = no change."""
    from gcodefp_core.train import SensorLayout, TrainConfig, augment

    ids = ds.split_windows("train")[:64]
    layout = SensorLayout(ds.continuous_features)
    controller = [j for j in range(len(ds.continuous_features)) if j not in set(layout.sensors)]
    assert controller and len(layout.sensors) and len(layout.board_columns)
    rng = np.random.default_rng(0)

    plain = ds.batch(ids)
    same = augment(ds.batch(ids), TrainConfig(), layout, rng)
    assert np.array_equal(same["continuous"], plain["continuous"])
    assert np.array_equal(same["categorical"], plain["categorical"])

    shifted = augment(ds.batch(ids), TrainConfig(sensor_offset_std=0.5), layout, rng)["continuous"]
    diff = shifted - plain["continuous"]
    assert np.allclose(diff[:, :, controller], 0)
    assert np.allclose(diff[:, :, layout.sensors], diff[:, :1, layout.sensors], atol=1e-5)  # constant in time
    assert 0.3 < diff[:, 0, layout.sensors].std() < 0.7

    dropped = augment(ds.batch(ids), TrainConfig(board_dropout=0.5), layout, rng)["continuous"]
    gone = np.all(dropped == 0, axis=1) & ~np.all(plain["continuous"] == 0, axis=1)   # [windows, features]
    assert gone.any() and not gone[:, controller].any()
    board_of = layout.board_columns.argmax(0)
    for w, f in zip(*np.nonzero(gone)):   # a dropped channel's whole board is gone
        cols = np.flatnonzero(layout.board_columns[board_of[f]])
        assert np.all(dropped[w][:, cols] == 0)
    kept = ~np.all(dropped == 0, axis=1)
    assert np.array_equal(dropped[kept[:, None, :].repeat(dropped.shape[1], 1)],
                          plain["continuous"][kept[:, None, :].repeat(dropped.shape[1], 1)])

    cats = augment(ds.batch(ids), TrainConfig(categorical_dropout=0.5), layout, rng)["categorical"]
    unknown = np.all(cats == 0, axis=1) & ~np.all(plain["categorical"] == 0, axis=1)
    assert unknown.any()
    assert np.array_equal(cats[~unknown[:, None, :].repeat(cats.shape[1], 1)],
                          plain["categorical"][~unknown[:, None, :].repeat(cats.shape[1], 1)])

    with pytest.raises(ValueError, match="board_dropout"):
        TrainConfig.from_dict({"board_dropout": 1.5})
