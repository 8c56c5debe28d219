"""The program tracker with a template emission added, against the tracker as it is, on the test split.

The template term (benchmarks/template_emission.py): per judged row, the cosine similarity of the
last 64 received rows (every 2nd row; by default motor currents and the boards' RMS channels; per-window,
per-channel centred and scaled) with each state's template segment (per operation, the lag-registered
mean of its train runs), times `template_weight`, is added to the tracker's log emission. Everything
else is the tracker benchmarks/side_channel_streams.py evaluates: its per-checkpoint tracker (tuned
params and temperatures) is read from that benchmark's per-checkpoint JSON when given, else built
and tuned here the same way. template_weight is chosen on VALIDATION streams (start and
attached_loss5, mean exact line, ties: op); the five conditions are then scored on the test split
with the same streams (seeded alike) and scoring as side_channel_streams.py.

The forms of the term (MODES), each with its weight chosen on validation:
- position: the cosine at the state itself (sharp; but the boards lag the controller's rows by a
  per-run constant of several rows, see template_emission.py part 2);
- blur10:   the best cosine within +-10 offsets of the state (position evidence only as sharp as
  that lag allows);
- operation: the operation's best cosine over all its offsets, for every state of the operation
  (which program, no position); operation_s4: the same over every 4th offset only (a quarter of
  the segments: a quarter of the cost).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/template_tracker.py --dataset artifacts/pipeline-side/dataset \
        --checkpoints artifacts/pipeline-side/checkpoints/seed4{2,3,4}/checkpoint_best.pt \
        [--cached results/side_channel_streams_current] [--output results/template_tracker.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import side_channel_streams as scs
import template_emission as te

from gcodefp_core import monitor_streams as monitor
from gcodefp_core.fileio import write_json
from gcodefp_core.runtime.program_tracker import ProgramTracker

ROOT = Path(__file__).resolve().parents[1]
MODES = {"position": [0.3, 1.0], "blur10": [0.3, 1.0, 3.0], "operation": [0.3, 1.0, 3.0, 10.0],
         "operation_s4": [0.3, 1.0, 3.0]}   # mode -> weights
L, STEP = 64, 2


class TemplateTracker(ProgramTracker):
    """ProgramTracker whose emission adds the next row of `feed` (an iterator of [n_states] log terms)."""
    feed = None

    def emission(self, op_logits, line_logits):
        e = super().emission(op_logits, line_logits)
        return e if self.feed is None else e + next(self.feed)


def template_scores(ds, seg: np.ndarray, cols: list[int], run: dict, offsets: np.ndarray, basis=None) -> np.ndarray:
    """[received rows, states] cosine of each row's last L received rows with every state's segment
    (projected on `basis` first when given: a run's level is removed by the per-window centring)."""
    from gcodefp_core.monitor_streams import stream_windows

    rows, _ = stream_windows(ds, run, offsets)                  # [n, 64], padded with the first row
    x = ds.arrays["rows_continuous"][rows[:, ::-1][:, ::STEP][:, ::-1]][..., cols]
    x = x if basis is None else x @ basis
    w = te.znorm(x, 1).reshape(len(x), -1)
    w /= np.linalg.norm(w, axis=1, keepdims=True) + 1e-9
    return w.astype(np.float32) @ seg.T


def shaped(tracker: ProgramTracker, cos: np.ndarray, mode: str) -> np.ndarray:
    """The template term of MODES from the cosine per state [n, states]."""
    if mode == "position":
        return cos
    if mode.startswith("operation"):
        if mode == "operation_s4":
            cos = np.where(tracker.state_offset % 4 == 0, cos, -np.inf)
        return np.repeat(np.maximum.reduceat(cos, tracker.block_start, axis=1), tracker._sizes, axis=1)
    block = tracker.state_op
    lo, hi = tracker.block_start[block], tracker.block_end[block] - 1
    out = cos.copy()
    for d in range(1, 11):   # the neighbours within the same operation's block (edges repeat)
        i = np.arange(tracker.n_states)
        np.maximum(out, cos[:, np.minimum(i + d, hi)], out=out)
        np.maximum(out, cos[:, np.maximum(i - d, lo)], out=out)
    return out


def replay(tracker: TemplateTracker, s: dict, mode: str, weight: float) -> dict:
    from gcodefp_core import fit_program_tracker as fit

    tracker.feed = iter(weight * shaped(tracker, s["template"], mode)) if weight else None
    try:
        return fit.run_tracker(tracker, s["op_logits"], s["line_logits"], s["weights"], s["repeated"],
                               from_start=s["from_start"])
    finally:
        tracker.feed = None


def choose_weights(tracker, streams: list[dict]) -> tuple[dict, list]:
    """Per mode, the weight (0 included: the tracker as it is) with the best mean validation exact
    line (ties: op) -> ({mode: weight}, [(mode, weight, exact, op)])."""
    results = []
    for mode, weights in [("none", [0.0])] + list(MODES.items()):
        for w in weights:
            exact, op = [], []
            for s in streams:
                out, sel, y = replay(tracker, s, mode, w), s["scored"], s["line_target"]
                exact.append(np.mean((out["line"][sel] == y[sel]) & (y[sel] >= 0)))
                op.append(np.mean(out["operation"][sel] == s["op_target"]))
            results.append((mode, w, float(np.mean(exact)), float(np.mean(op))))
            print(f"    {mode:<10} weight {w:5.1f}: val exact {100 * results[-1][2]:5.1f} op {100 * results[-1][3]:5.1f}", flush=True)
    best = {mode: max([r for r in results if r[0] in (mode, "none")], key=lambda r: (r[2], r[3]))[1] for mode in MODES}
    return best, results


def with_templates(ds, seg, cols, streams: list[dict], basis=None) -> list[dict]:
    runs = {r["name"]: r for r in ds.manifest["runs"]}
    for s in streams:
        s["template"] = template_scores(ds, seg, cols, runs[s["run"]], s["offsets"], basis)
    return streams


def evaluate(path: Path, seed: int, ds, data, seg, cols, basis, cached: Path | None) -> dict:
    from gcodefp_core import fit_program_tracker as fit
    from gcodefp_core.checkpoints import load_checkpoint
    from gcodefp_core.programs import row_classes

    model, bundle, _ = load_checkpoint(path)
    models, table = [model], bundle.line_table
    classes = row_classes(ds, table)
    cache = cached / f"{path.parent.name}_{path.stem}_seed{seed}.json" if cached else None
    if cache and cache.is_file():
        tracker = TemplateTracker.from_dict(json.loads(cache.read_text())["tracker"])
    else:   # as side_channel_streams.evaluate_checkpoint: temperatures, then the emission grid
        base = fit.build_program_tracker(ds, table)
        ids = ds.split_windows("val")
        val = monitor.stream_outputs(models, ds, ids[:, None] + np.arange(-ds.window + 1, 1))
        base.params |= {"op_temperature": fit.fit_temperature(val["op_logits"], ds.operation_labels(ids)),
                        "line_temperature": fit.fit_temperature(val["line_logits"], classes[ids])}
        rng = np.random.default_rng(seed)
        fit.tune_tracker(base, [s for name in ("start", "attached_loss5") for s in
                                scs.condition_streams(models, ds, table, "val", name, rng, classes)], scs.GRID)
        tracker = TemplateTracker.from_dict(base.to_dict())
    if seg.shape[0] != tracker.n_states:
        raise ValueError(f"templates cover {seg.shape[0]} states, the tracker has {tracker.n_states}")
    rng = np.random.default_rng(seed)
    t0 = time.time()
    tune = [s for name in ("start", "attached_loss5") for s in
            with_templates(ds, seg, cols, scs.condition_streams(models, ds, table, "val", name, rng, classes), basis)]
    print(f"  {path}: {len(tune)} validation streams in {time.time() - t0:.0f}s", flush=True)
    weights, grid = choose_weights(tracker, tune)
    del tune
    conditions = {}
    for name in scs.CONDITIONS:
        streams = with_templates(ds, seg, cols, scs.condition_streams(
            models, ds, table, "test", name, np.random.default_rng([seed, len(name)]), classes), basis)
        conditions[name] = {}
        for label, mode in [("tracker", "none")] + [(m, m) for m in MODES]:
            w = weights.get(mode, 0.0)
            scs.run_one = lambda tr, s, m=mode, w=w: replay(tr, s, m, w)   # side_channel_streams scores through run_one
            conditions[name][label] = scs.score_streams(tracker, table, streams, ds.operations)["overall"]
        c = conditions[name]
        print(f"    {name:<16}" + " | ".join(f"{k} op {100 * v['op']:5.1f} exact {100 * v['exact']:5.1f}" for k, v in c.items())
              + f" | window op {100 * c['tracker']['w_op']:5.1f} exact {100 * c['tracker']['w_exact']:5.1f}", flush=True)
    return {"checkpoint": str(path), "seed": seed, "weights": weights, "tuning": grid, "conditions": conditions}


def template_cost(seg: np.ndarray, dims: int, repeats: int = 200) -> float:
    """Microseconds per judged row: window centring/scaling and one matvec over the states."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((L // STEP, dims // (L // STEP))).astype(np.float32)
    t0 = time.perf_counter()
    for _ in range(repeats):
        w = te.znorm(x, 0).ravel()
        seg @ (w / np.linalg.norm(w)).astype(np.float32)
    return 1e6 * (time.perf_counter() - t0) / repeats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", type=Path, required=True)
    ap.add_argument("--checkpoints", type=Path, nargs="+", required=True)
    ap.add_argument("--cached", type=Path, default=None, help="side_channel_streams.py's per-checkpoint JSON folder")
    ap.add_argument("--features", choices=["rms", "all"], default="rms", help="motors + boards' RMS, or every channel")
    ap.add_argument("--pca", type=int, default=0, help="project on this many principal components of the train rows")
    ap.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    ap.add_argument("--output", type=Path, default=ROOT / "results/template_tracker.json")
    args = ap.parse_args()
    import torch

    from gcodefp_core.dataset import load_dataset

    torch.set_num_threads(1)
    for mode in set(MODES) - set(args.modes):
        del MODES[mode]
    ds, data = load_dataset(args.dataset), te.Data(args.dataset)
    cols = data.columns(args.features)
    basis = te.pca_basis(data, cols, args.pca) if args.pca else None
    lags = te.board_lags(data)   # registration uses train runs only (templates average train runs)
    tpl, _ = te.templates(data, cols, basis, lags)
    seg, _ = te.segments(data, tpl, L, STEP)
    cost = {"all_offsets": template_cost(seg, seg.shape[1]), "every_4th_offset": template_cost(np.ascontiguousarray(seg[::4]), seg.shape[1])}
    print(f"templates: {seg.shape[0]} states x {seg.shape[1]} dims, us per judged row {cost}", flush=True)
    per_seed = [evaluate(p, s, ds, data, seg, cols, basis, args.cached) for s, p in enumerate(args.checkpoints)]
    labels = ["tracker"] + list(MODES)
    print("\nop / exact line on test, mean of seeds; weights per seed " + str([s["weights"] for s in per_seed]))
    print(f"{'condition':<17}" + "".join(f"{label:>16}" for label in labels) + f"{'window':>16}")
    summary = {}
    for name in scs.CONDITIONS:
        summary[name] = {label: {k: float(np.mean([s["conditions"][name][label][k] for s in per_seed])) for k in ("op", "exact")}
                         for label in labels}
        summary[name]["window"] = {k: float(np.mean([s["conditions"][name]["tracker"]["w_" + k] for s in per_seed]))
                                   for k in ("op", "exact")}
        print(f"{name:<17}" + "".join(f"{100 * v['op']:9.1f} /{100 * v['exact']:5.1f}" for v in summary[name].values()))
    write_json(args.output, {"summary": summary, "per_checkpoint": per_seed, "template_us_per_row": cost,
                             "template": {"features": args.features, "pca": args.pca, "L": L, "step": STEP, "modes": MODES}})
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
