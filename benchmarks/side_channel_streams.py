"""The program tracker (gcodefp_core.runtime.program_tracker) against window mode, under the conditions a
monitor has, on the test split (unseen runs), per operation, mean [min-max] over checkpoints (seeds).

Conditions (each test run streamed once per condition; random choices seeded per checkpoint):
- start:          every row from the program start (the client says "start"); scored from row 63,
                  the first full window, like the dataset's windows;
- attached:       the monitor attaches at a random point 25-75% into the run, knows nothing;
- attached_loss5 / attached_loss20: the same, and each row is lost with probability 5% / 20%;
                  attached conditions are scored from 30 received rows after attachment;
- pause:          from the start, and at a random row in the middle third the readings repeat
                  60 times (the machine stands still); scored from row 63, pause rows included
                  (the answer is the line the machine stopped on).
A window with fewer than 64 received rows is padded with its first row; its evidence weight in
the tracker is the share of real rows. "window" is the window model's own answer on the same
windows (what /predict says). Per checkpoint, the tracker is built from the training runs, its
temperatures are fitted on validation windows, and its emission weights and window_weight (when a
sure window answers instead) are chosen on validation streams (start and attached_loss5).
Calibration (ECE, reliability) of the window model's operation and line confidences on the test
windows, before and after temperature scaling, and of the tracker's line confidence, is reported.

    .venv/bin/python benchmarks/side_channel_streams.py --dataset data/side \
        --checkpoints models/side/model_seed42/checkpoint_best.pt ... [--output results/side_channel_streams.json]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from gcodefp_core import monitor_streams as monitor
from gcodefp_core.fileio import write_json

ROOT = Path(__file__).resolve().parents[1]
CONDITIONS = {"start": dict(), "attached": dict(attach=0.25), "attached_loss5": dict(attach=0.25, loss=0.05),
              "attached_loss20": dict(attach=0.25, loss=0.2), "pause": dict(pause_rows=60)}
GRID = {"line_weight": [0.0, 0.01, 0.03, 0.1], "op_weight": [0.02, 0.05], "skip": [0.0]}   # fit.DEFAULT_GRID


def condition_streams(models, ds, table, split: str, name: str, rng, classes) -> list[dict]:
    streams = []
    for run in (r for r in ds.manifest["runs"] if r["split"] == split):
        offsets = monitor.make_stream(run["rows"], rng, **CONDITIONS[name])
        s = monitor.stream_record(models, ds, run, offsets, classes)
        idx = np.arange(len(offsets))
        s["scored"] = idx >= (30 if "attach" in CONDITIONS[name] else ds.window - 1)
        s["from_start"] = "attach" not in CONDITIONS[name]
        s["run"] = run["name"]
        streams.append(s)
    return streams


def score_streams(tracker, table, streams: list[dict], operations: list[str]) -> dict:
    """Per operation and overall (pooled scored rows): tracker and window exact line and op accuracy."""
    from gcodefp_core import fit_program_tracker as fit

    acc = {k: [] for k in ("op", "exact", "w_op", "w_exact", "conf", "correct", "paused", "in_pause")}
    per_op: dict[str, dict] = {}
    rows, seconds = 0, 0.0
    for s in streams:
        t0 = time.perf_counter()
        out = run_one(tracker, s)
        seconds += time.perf_counter() - t0
        rows += len(s["offsets"])
        w_op, w_line, _ = fit.window_answers(table, s["op_logits"], s["line_logits"])
        sel, y = s["scored"], s["line_target"]
        vals = {"op": out["operation"] == s["op_target"], "exact": (out["line"] == y) & (y >= 0),
                "w_op": w_op == s["op_target"], "w_exact": (w_line == y) & (y >= 0)}
        op = operations[s["op_target"]]
        for k, v in vals.items():
            acc[k].append(v[sel])
            per_op.setdefault(op, {}).setdefault(k, []).append(v[sel])
        acc["conf"].append(out["line_confidence"][sel])
        acc["correct"].append(vals["exact"][sel])
        pause = np.concatenate([[False], s["offsets"][1:] == s["offsets"][:-1]])
        acc["paused"].append(out["paused"])
        acc["in_pause"].append(pause)
    mean = lambda parts: float(np.concatenate(parts).mean())  # noqa: E731
    report = {"overall": {k: mean(acc[k]) for k in ("op", "exact", "w_op", "w_exact")},
              "per_operation": {op: {k: mean(v) for k, v in d.items()} for op, d in sorted(per_op.items())},
              "tracker_us_per_row": 1e6 * seconds / max(rows, 1), "rows": rows,
              "tracker_line_calibration": fit.reliability(np.concatenate(acc["conf"]), np.concatenate(acc["correct"]))}
    paused, in_pause = np.concatenate(acc["paused"]), np.concatenate(acc["in_pause"])
    if in_pause.any():
        report["paused_probability"] = {"pause_rows": float(paused[in_pause].mean()),
                                        "other_rows": float(paused[~in_pause].mean())}
    return report


def run_one(tracker, s: dict) -> dict:
    from gcodefp_core import fit_program_tracker as fit

    return fit.run_tracker(tracker, s["op_logits"], s["line_logits"], s["weights"], s["repeated"],
                           from_start=s["from_start"])


def calibration(ds, table, models, classes, temps: dict) -> dict:
    """ECE of the window model's op and line confidence on test windows, before/after temperature."""
    from gcodefp_core import fit_program_tracker as fit
    from gcodefp_core.runtime.program_tracker import log_softmax

    ids = ds.split_windows("test")
    out = monitor.stream_outputs(models, ds, ids[:, None] + np.arange(-ds.window + 1, 1))
    y_op, y_line = ds.operation_labels(ids), classes[ids]
    report = {}
    for label, t_op, t_line in (("before", 1.0, 1.0), ("after", temps["op_temperature"], temps["line_temperature"])):
        p_op = np.exp(log_softmax(out["op_logits"] / t_op))
        op, line, conf = fit.window_answers(table, out["op_logits"] / t_op, out["line_logits"] / t_line)
        report[label] = {"op": fit.reliability(p_op.max(1), p_op.argmax(1) == y_op),
                         "line": fit.reliability(conf, (line == y_line) & (y_line >= 0))}
    return report


def checkpoint_tracker(path: Path, ds) -> tuple[list, object, np.ndarray, object, dict]:
    """A checkpoint's window model and a fresh tracker of the training runs, its temperatures fitted on
    the validation windows -> (models, line table, row classes, tracker, temperatures)."""
    from gcodefp_core import fit_program_tracker as fit
    from gcodefp_core.checkpoints import load_checkpoint
    from gcodefp_core.programs import row_classes

    model, bundle, _ = load_checkpoint(path)
    models, table = [model], bundle.line_table
    classes = row_classes(ds, table)
    tracker = fit.build_program_tracker(ds, table)
    val_ids = ds.split_windows("val")
    val = monitor.stream_outputs(models, ds, val_ids[:, None] + np.arange(-ds.window + 1, 1))
    temps = {"op_temperature": fit.fit_temperature(val["op_logits"], ds.operation_labels(val_ids)),
             "line_temperature": fit.fit_temperature(val["line_logits"], classes[val_ids])}
    tracker.params |= temps
    return models, table, classes, tracker, temps


def evaluate_checkpoint(path: Path, ds, seed: int, val_runs: int | None) -> dict:
    from gcodefp_core import fit_program_tracker as fit

    models, table, classes, tracker, temps = checkpoint_tracker(path, ds)
    rng = np.random.default_rng(seed)
    tune = condition_streams(models, ds, table, "val", "start", rng, classes) + \
        condition_streams(models, ds, table, "val", "attached_loss5", rng, classes)
    if val_runs:
        tune = tune[::max(1, len(tune) // val_runs)]
    t0 = time.time()
    params, grid = fit.tune_tracker(tracker, tune, GRID)
    print(f"  {path}: temperatures {temps}, tuned {({k: params[k] for k in GRID})} in {time.time() - t0:.0f}s", flush=True)
    conditions = {}
    for name in CONDITIONS:
        streams = condition_streams(models, ds, table, "test", name, np.random.default_rng([seed, len(name)]), classes)
        conditions[name] = score_streams(tracker, table, streams, ds.operations)
        o = conditions[name]["overall"]
        print(f"    {name:<16} tracker op {100 * o['op']:5.1f} exact {100 * o['exact']:5.1f} | window op "
              f"{100 * o['w_op']:5.1f} exact {100 * o['w_exact']:5.1f} | {conditions[name]['tracker_us_per_row']:.0f} us/row", flush=True)
    return {"checkpoint": str(path), "params": params, "tuning_grid": grid, "conditions": conditions,
            "calibration": calibration(ds, table, models, classes, temps), "tracker": tracker.to_dict()}


def summarise(per_seed: list[dict]) -> dict:
    """condition -> row (overall / operation) -> metric -> [mean, min, max] over seeds."""
    out = {}
    for name in CONDITIONS:
        reps = [s["conditions"][name] for s in per_seed]
        rows = {"overall": [r["overall"] for r in reps]}
        for op in reps[0]["per_operation"]:
            rows[op] = [r["per_operation"][op] for r in reps]
        out[name] = {row: {m: [float(np.mean([v[m] for v in vals])), float(np.min([v[m] for v in vals])),
                               float(np.max([v[m] for v in vals]))] for m in vals[0]} for row, vals in rows.items()}
        out[name]["tracker_us_per_row"] = float(np.mean([r["tracker_us_per_row"] for r in reps]))
    return out


def print_table(summary: dict) -> None:
    cell = lambda v: f"{100 * v[0]:5.1f} [{100 * v[1]:5.1f}-{100 * v[2]:5.1f}]"  # noqa: E731
    for name, rows in summary.items():
        print(f"\n{name} (tracker {rows['tracker_us_per_row']:.0f} us/row)")
        print(f"{'operation':<16}{'tracker op':>22}{'tracker exact':>22}{'window op':>22}{'window exact':>22}")
        for row, m in rows.items():
            if row != "tracker_us_per_row":
                print(f"{row:<16}" + "".join(f"{cell(m[k]):>22}" for k in ("op", "exact", "w_op", "w_exact")))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", type=Path, required=True)
    ap.add_argument("--checkpoints", type=Path, nargs="+", required=True)
    ap.add_argument("--seeds", type=int, nargs="+", default=None, help="stream seeds (default 0 .. n-1)")
    ap.add_argument("--val-runs", type=int, default=None, help="tune on at most this many validation streams")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--output", type=Path, default=ROOT / "results/side_channel_streams.json")
    args = ap.parse_args()
    import torch

    from gcodefp_core.dataset import load_dataset

    torch.set_num_threads(args.threads)
    ds = load_dataset(args.dataset)
    seeds = args.seeds or list(range(len(args.checkpoints)))
    per_seed = []
    for path, seed in zip(args.checkpoints, seeds):
        # One file per checkpoint and seed, reused while the checkpoint is unchanged: seeds can be
        # evaluated as their trainings finish.
        cache = args.output.with_suffix("") / f"{path.parent.name}_{path.stem}_seed{seed}.json"
        stamp = path.stat().st_mtime
        if cache.is_file() and json.loads(cache.read_text()).get("checkpoint_mtime") == stamp:
            per_seed.append(json.loads(cache.read_text()))
            print(f"  {path}: reusing {cache}")
            continue
        per_seed.append(evaluate_checkpoint(path, ds, seed, args.val_runs) | {"checkpoint_mtime": stamp})
        cache.parent.mkdir(parents=True, exist_ok=True)
        write_json(cache, per_seed[-1])
    summary = summarise(per_seed)
    print_table(summary)
    for s in per_seed:
        c = s["calibration"]
        print(f"calibration {s['checkpoint']}: op ECE {c['before']['op']['ece']:.3f} -> {c['after']['op']['ece']:.3f}, "
              f"line ECE {c['before']['line']['ece']:.3f} -> {c['after']['line']['ece']:.3f}; tracker line ECE "
              + ", ".join(f"{n} {s['conditions'][n]['tracker_line_calibration']['ece']:.3f}" for n in CONDITIONS))
    write_json(args.output, {"summary": summary, "per_checkpoint": per_seed, "conditions": CONDITIONS, "grid": GRID})
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
