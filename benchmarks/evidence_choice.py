"""Does the rule that decides whether a kind of operation evidence ships hold on unseen runs?

Training keeps the spread evidence (or the templates) when it gains on the validation streams
(gcodefp_core.fit_program_tracker.choose_evidence_weight). On `full` the rule kept the spread for
all three seeds of a production pipeline, and it cost 0.5-1.5 points of streamed operation on the
test split: 21 validation runs, a few of which move a lot, are a noisy judge. This script replays,
per checkpoint, every weight of one kind on several independent draws of validation streams (each
run from its start, and attached 25-75% in with 5% of rows lost) and on the test split, per stream,
and reports for each decision rule the weight it chooses and what that weight does on test:

- `best_op`: the rule training used up to commit 6a9bcf3: on one draw, the best operation among the
  weights within 0.5 points of the best exact line, kept if it gains >= 0.5 points of exact line +
  operation over none;
- `least`: the rule training uses now (fit_program_tracker.pick_evidence_weight): the least weight
  within 0.5 points of the best exact line and of the best operation, same gain; `least_all_draws`:
  the same on every draw;
- `paired`: `best_op` on every draw, and the gain must hold for the runs, not a few of them: in at
  least `--confidence` of bootstrap resamples of the validation runs (all draws of a run together),
  the resampled gain is positive.

Tuning replays judge every `--every`-th row as the server does (4, its default).

    .venv/bin/python benchmarks/evidence_choice.py --dataset artifacts/pipeline-bench/dataset \
        --checkpoints artifacts/pipeline-bench/checkpoints/seed4{2,3,4}/checkpoint_best.pt \
        --output results/evidence_choice_full.json
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from gcodefp_core import monitor_streams as monitor
from gcodefp_core.fileio import write_json

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from side_channel_streams import GRID, checkpoint_tracker  # noqa: E402

CONDITIONS = {"start": dict(), "attached_loss5": dict(attach=0.25, loss=0.05)}


def streams(models, ds, split: str, rng, classes, evidence: dict, draws: int) -> list[dict]:
    out = []
    for draw in range(draws):
        for name, condition in CONDITIONS.items():
            for run in (r for r in ds.manifest["runs"] if r["split"] == split):
                offsets = monitor.make_stream(run["rows"], rng, **condition)
                s = monitor.stream_record(models, ds, run, offsets, classes, evidence)
                s["from_start"] = name == "start"
                s["scored"] = np.arange(len(offsets)) >= (ds.window - 1 if s["from_start"] else 30)
                s |= {"run": run["name"], "draw": draw, "condition": name}
                out.append(s)
    return out


def per_stream(tracker, streams: list[dict], every: int) -> np.ndarray:
    """[streams, 2]: exact line and operation accuracy of each stream's judged, scored rows."""
    from gcodefp_core import fit_program_tracker as fit

    rows = []
    for s in streams:
        out = fit.run_tracker(tracker, s["op_logits"], s["line_logits"], s["weights"], s["repeated"], s["from_start"],
                              every=every, template=s.get("template"), spread=s.get("spread"))
        sel = s["scored"] & out["judged"]
        y = s["line_target"][sel]
        rows.append([np.mean((out["line"][sel] == y) & (y >= 0)), np.mean(out["operation"][sel] == s["op_target"])])
    return np.array(rows)


def paired_confidence(gain: np.ndarray, runs: list[str], rng, resamples: int = 2000) -> float:
    """Share of bootstrap resamples of the runs (each run's streams together) whose mean gain is > 0."""
    names = sorted(set(runs))
    by_run = np.array([gain[[r == n for r in runs]].mean() for n in names])
    picks = rng.integers(0, len(names), (resamples, len(names)))
    return float((by_run[picks].mean(axis=1) > 0).mean())


def best_op(vals: dict, ok=lambda w: True) -> float:
    """The rule before pick_evidence_weight, on {weight: [exact, op]}: the best operation among weights
    within 0.5 points of the best exact line, kept if exact + op gain >= 0.5 points over none (and ok)."""
    top = max(v[0] for v in vals.values())
    best = max((w for w, v in vals.items() if v[0] >= top - 0.005), key=lambda w: (vals[w][1], vals[w][0], -w))
    return best if sum(vals[best]) >= sum(vals[0.0]) + 0.005 and ok(best) else 0.0


def evaluate(path: Path, ds, seed: int, kind: str, draws: int, every: int, confidence: float) -> dict:
    from gcodefp_core import fit_program_tracker as fit
    from gcodefp_core.fit_spread import fit_operation_spread
    from gcodefp_core.fit_templates import fit_operation_templates

    models, table, classes, tracker, _ = checkpoint_tracker(path, ds)
    if kind == "spread":
        tracker.spread, param, weights, key = fit_operation_spread(ds, seed=seed), "spread_weight", fit.SPREAD_WEIGHTS, "spread"
        evidence = {key: tracker.spread}
    else:
        tracker.templates = fit_operation_templates(ds, list(table.operation_program))
        param, weights, key = "template_weight", fit.TEMPLATE_WEIGHTS, "template"
        evidence = {key: tracker.templates}
    rng = np.random.default_rng(seed)
    val = streams(models, ds, "val", rng, classes, evidence, draws)
    test = streams(models, ds, "test", np.random.default_rng([seed, 7]), classes, evidence, 1)
    fit.tune_tracker(tracker, [s for s in val if s["draw"] == 0], GRID)   # emission weights, as training
    scores = {}
    for w in weights:
        tracker.set_params(**{param: w})
        scores[w] = {"val": per_stream(tracker, val, every), "test": per_stream(tracker, test, every)}
    runs = [s["run"] for s in val]
    first = np.array([s["draw"] == 0 for s in val])
    report = {"checkpoint": str(path), "kind": kind, "params": dict(tracker.params), "weights": {}, "rules": {}}
    for w in weights:
        gain = scores[w]["val"].sum(1) - scores[0.0]["val"].sum(1)
        report["weights"][w] = {
            "val_first_draw": scores[w]["val"][first].mean(0).tolist(), "val_all_draws": scores[w]["val"].mean(0).tolist(),
            "val_paired_confidence": paired_confidence(gain, runs, np.random.default_rng(0)) if w else None,
            "test": scores[w]["test"].mean(0).tolist(),
            "test_op_gain_by_run": {f"{s['run']}/{s['condition']}": round(float(g), 4) for s, g in
                                    zip(test, scores[w]["test"][:, 1] - scores[0.0]["test"][:, 1]) if abs(g) > 0.005},
            "test_by_condition": {c: scores[w]["test"][[s["condition"] == c for s in test]].mean(0).tolist()
                                  for c in CONDITIONS}}
    first_draw = {w: r["val_first_draw"] for w, r in report["weights"].items()}
    all_draws = {w: r["val_all_draws"] for w, r in report["weights"].items()}
    report["rules"] = {
        "best_op": best_op(first_draw),
        "least": fit.pick_evidence_weight([(w, *v) for w, v in first_draw.items()]),
        "least_all_draws": fit.pick_evidence_weight([(w, *v) for w, v in all_draws.items()]),
        "paired": best_op(all_draws, lambda w: report["weights"][w]["val_paired_confidence"] >= confidence)}
    base = report["weights"][0.0]["test"]
    for rule, w in report["rules"].items():
        t = report["weights"][w]["test"]
        print(f"  {path.parent.name} {rule:<15} weight {w:<5} test exact {100 * t[0]:.1f} ({100 * (t[0] - base[0]):+.1f}) "
              f"op {100 * t[1]:.1f} ({100 * (t[1] - base[1]):+.1f})", flush=True)
    for w, r in report["weights"].items():
        print(f"      weight {w:<5} val {100 * r['val_all_draws'][0]:.1f} / {100 * r['val_all_draws'][1]:.1f} "
              f"(confidence {r['val_paired_confidence']}) test {100 * r['test'][0]:.1f} / {100 * r['test'][1]:.1f}", flush=True)
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", type=Path, required=True)
    ap.add_argument("--checkpoints", type=Path, nargs="+", required=True)
    ap.add_argument("--kind", choices=("spread", "templates"), default="spread")
    ap.add_argument("--draws", type=int, default=3, help="independent draws of validation streams")
    ap.add_argument("--every", type=int, default=4, help="judge every n-th row (the server's default: 4)")
    ap.add_argument("--confidence", type=float, default=0.9)
    ap.add_argument("--output", type=Path, default=ROOT / "results/evidence_choice.json")
    args = ap.parse_args()
    import torch

    from gcodefp_core.dataset import load_dataset

    torch.set_num_threads(1)
    ds = load_dataset(args.dataset)
    per = [evaluate(p, ds, 42 + i, args.kind, args.draws, args.every, args.confidence) for i, p in enumerate(args.checkpoints)]
    print(f"\n{'rule':<16}{'weights chosen':<22}{'test exact gain':>16}{'test op gain':>14}")
    summary = {}
    for rule in per[0]["rules"]:
        ws = [p["rules"][rule] for p in per]
        gains = np.array([np.subtract(p["weights"][p["rules"][rule]]["test"], p["weights"][0.0]["test"]) for p in per])
        summary[rule] = {"weights": ws, "test_gain_mean": gains.mean(0).tolist()}
        print(f"{rule:<16}{str(ws):<22}{100 * gains[:, 0].mean():>+16.2f}{100 * gains[:, 1].mean():>+14.2f}")
    write_json(args.output, {"summary": summary, "per_checkpoint": per, "every": args.every, "draws": args.draws,
                             "confidence": args.confidence})
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
