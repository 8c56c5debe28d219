"""Does level-free operation evidence help the program tracker? Each kind, alone, on the test split.

`stream_operation_evidence.py` found that each channel's spread over the last 16 rows names a
run's operation across recording sessions better than the readings themselves. That evidence is
the tracker's `spread` (gcodefp_core.runtime.operation_spread: a logistic regression on the spread
of the window's last 16 rows, fitted on the training runs, its log-probabilities times
`spread_weight`). Per side-channel checkpoint: the tracker built and tuned as `side_channel_streams.py`
does (temperatures on validation windows, emission weights on validation streams), then, for each
kind of operation evidence alone (none, the templates, the spread model), the weight
`choose_evidence_weight` picks on the validation streams, and the test split scored under the
monitor's conditions. (Training fits both kinds, one after the other: gcodefp_core.fit_program_tracker.) The test figures at fixed
weights are reported too, for diagnosis only (choosing on them would be fitting the test split).

    .venv/bin/python benchmarks/spread_evidence_tracker.py --dataset data/side \
        --checkpoints models/side/model_seed42/checkpoint_best.pt ... [--output results/spread_evidence_tracker.json]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from gcodefp_core import monitor_streams as monitor
from gcodefp_core.fileio import write_json
from gcodefp_core.fit_program_tracker import SPREAD_WEIGHTS, TEMPLATE_WEIGHTS

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from side_channel_streams import CONDITIONS, GRID, checkpoint_tracker  # noqa: E402

# Per kind: its weight param and the weights tried (the training grids).
KINDS = {"templates": ("template_weight", TEMPLATE_WEIGHTS), "spread": ("spread_weight", SPREAD_WEIGHTS)}
KEY = {"templates": "template", "spread": "spread"}   # the stream record's key (run_tracker's argument)


def streams_for(models, ds, table, split: str, condition: str, rng, classes, evidence: dict) -> list[dict]:
    out = []
    for run in (r for r in ds.manifest["runs"] if r["split"] == split):
        offsets = monitor.make_stream(run["rows"], rng, **CONDITIONS[condition])
        s = monitor.stream_record(models, ds, run, offsets, classes, {KEY[k]: e for k, e in evidence.items()})
        s["from_start"] = "attach" not in CONDITIONS[condition]
        s["scored"] = np.arange(len(offsets)) >= (ds.window - 1 if s["from_start"] else 30)
        s["operation"] = run["operation"]
        out.append(s)
    return out


def score(tracker, streams: list[dict]) -> dict:
    from gcodefp_core import fit_program_tracker as fit

    op, exact, per_op = [], [], {}
    for s in streams:
        out = fit.run_tracker(tracker, s["op_logits"], s["line_logits"], s["weights"], s["repeated"], s["from_start"],
                              template=s.get("template"), spread=s.get("spread"))
        sel, y = s["scored"], s["line_target"]
        op.append(out["operation"][sel] == s["op_target"])
        exact.append((out["line"][sel] == y[sel]) & (y[sel] >= 0))
        per_op.setdefault(s["operation"], []).append(float(op[-1].mean()))
    return {"op": float(np.concatenate(op).mean()), "exact": float(np.concatenate(exact).mean()), "per_operation_runs": per_op}


def evaluate(path: Path, ds, seed: int) -> dict:
    from gcodefp_core import fit_program_tracker as fit
    from gcodefp_core.fit_spread import fit_operation_spread
    from gcodefp_core.fit_templates import fit_operation_templates

    models, table, classes, tracker, _ = checkpoint_tracker(path, ds)
    evidence = {"templates": fit_operation_templates(ds, list(table.operation_program)), "spread": fit_operation_spread(ds)}
    rng = np.random.default_rng(seed)
    tune = [s for c in ("start", "attached_loss5") for s in streams_for(models, ds, table, "val", c, rng, classes, evidence)]
    params, _ = fit.tune_tracker(tracker, tune, GRID)
    report = {"checkpoint": str(path), "params": params, "kinds": {}}
    tests = {c: streams_for(models, ds, table, "test", c, np.random.default_rng([seed, len(c)]), classes, evidence)
             for c in CONDITIONS}
    for kind in ("none", *KINDS):
        # this kind alone: the other's weight 0
        tracker.templates, tracker.spread = evidence["templates"], evidence["spread"]
        tracker.set_params(template_weight=0.0, spread_weight=0.0)
        if kind == "none":
            chosen, validation = 0.0, None
        else:
            param, weights = KINDS[kind]
            chosen, validation = fit.choose_evidence_weight(tracker, tune, param, weights)
        at_chosen = {c: score(tracker, tests[c]) for c in CONDITIONS}
        diagnosis = {}
        if kind != "none":
            for w in weights[1:]:
                tracker.set_params(**{param: w})
                diagnosis[w] = {c: {k: v for k, v in score(tracker, tests[c]).items() if k != "per_operation_runs"}
                                for c in ("start", "attached_loss5")}
        report["kinds"][kind] = {"weight": chosen, "validation": [r[:3] for r in validation or []],
                                 "test": at_chosen, "test_at_fixed_weights": diagnosis}
        print(f"  {path.parent.name} {kind:<10} weight {chosen:<4} " + " | ".join(
            f"{c} op {100 * r['op']:.1f} exact {100 * r['exact']:.1f}" for c, r in at_chosen.items()), flush=True)
        for w, d in diagnosis.items():
            print(f"      (test at weight {w}: " + ", ".join(f"{c} op {100 * r['op']:.1f} exact {100 * r['exact']:.1f}"
                                                         for c, r in d.items()) + ")", flush=True)
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", type=Path, required=True)
    ap.add_argument("--checkpoints", type=Path, nargs="+", required=True)
    ap.add_argument("--output", type=Path, default=ROOT / "results/spread_evidence_tracker.json")
    args = ap.parse_args()
    import torch

    from gcodefp_core.dataset import load_dataset

    torch.set_num_threads(1)
    torch.manual_seed(0)
    ds = load_dataset(args.dataset)
    per = [evaluate(p, ds, seed) for seed, p in enumerate(args.checkpoints)]
    summary = {}
    for kind in per[0]["kinds"]:
        summary[kind] = {c: {m: [float(np.mean([p["kinds"][kind]["test"][c][m] for p in per])),
                                 float(np.min([p["kinds"][kind]["test"][c][m] for p in per])),
                                 float(np.max([p["kinds"][kind]["test"][c][m] for p in per]))] for m in ("op", "exact")}
                         for c in CONDITIONS}
    print(f"\n{'evidence':<12}" + "".join(f"{c:>26}" for c in CONDITIONS))
    for kind, rows in summary.items():
        print(f"{kind:<12}" + "".join(f"{100 * r['op'][0]:>12.1f} / {100 * r['exact'][0]:<11.1f}" for r in rows.values()))
    write_json(args.output, {"summary": summary, "per_checkpoint": per, "conditions": CONDITIONS})
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
