"""Fitting the program tracker (gcodefp_core.runtime.program_tracker) from training runs, and the streamed
conditions it is tuned and evaluated under. Training-side code: torch is allowed here.

- `build_program_tracker`: per operation, the lines its training runs execute at each row offset
  and the tempo spread; the line prior from the training windows.
- `fit_temperature`: temperature scaling of logits on validation (minimum NLL), the calibration the
  tracker's emissions and window mode's confidences use.
- the validation streams come from gcodefp_core.monitor_streams (a run as a monitor receives it).
- `run_tracker`, `tune_tracker`: replay streams through the tracker, judging every 4th row as /stream
  does by default (SERVED_EVERY); choose the emission weights on validation streams, then the weight
  of each kind of operation evidence from the readings, the templates (gcodefp_core.fit_templates)
  and then the spread model (gcodefp_core.fit_spread): the least weight within 0.5 points of the best
  exact line and of the best operation, kept only when exact line + operation gain at least 0.5
  points over none (choose_evidence_weight).
"""
from __future__ import annotations

import itertools

import numpy as np

from .fit_spread import fit_operation_spread
from .fit_templates import fit_operation_templates
from .monitor_streams import make_stream, stream_outputs, stream_record
from .runtime.program_tracker import PARAMS, ProgramTracker, log_softmax
from .runtime.tracked_stream import judged_rows
from .programs import LineTable, row_classes


def build_program_tracker(ds, table: LineTable, top_k: int = 6, params: dict | None = None,
                          per_operation: bool = True) -> ProgramTracker:
    """The tracker of a dataset's training runs over the line classes of `table`: per timeline and
    row offset, the top_k most common line classes and their shares; the tempo from the spread of
    the runs' lengths (a robust standard deviation s over length n: a per-row chance e of a
    0- or 2-row step gives a spread of sqrt(2 e n), so e = s^2 / 2n, kept within 0.3-5%).
    per_operation: each operation's timeline comes from its own training runs (from its program's
    runs when it has none). A damaged run executes its program's lines at its own pace (the real
    damageadaptive runs take 498 rows, their program's normal runs 500-506), so a timeline shared with
    the normal runs names the wrong line at a given row offset: the row clock on the shared timeline
    scores 34% exact line on the unseen damageadaptive runs, on their own 78-92%. False: one timeline
    per program (the packages before this option; they load unchanged)."""
    classes = row_classes(ds, table)
    runs = [r for r in ds.manifest["runs"] if r["split"] == "train"]
    program_of = {op: table.operation_program[o] for o, op in enumerate(ds.operations)}
    if per_operation:
        names, timeline_of = list(ds.operations), list(range(len(ds.operations)))
        groups = [[r for r in runs if r["operation"] == op] or [r for r in runs if program_of[r["operation"]] == program_of[op]]
                  for op in ds.operations]
    else:
        names, timeline_of = list(table.programs), list(table.operation_program)
        groups = [[r for r in runs if program_of[r["operation"]] == p] for p in range(len(table.programs))]
    lines, shares, tempo = [], [], []
    for name, mine in zip(names, groups):
        if not mine:
            kind = "operation" if per_operation else "program"
            raise ValueError(f"program tracker: {kind} {name!r} has no training run to make its timeline of "
                             "(every operation needs a run in the dataset's train split)")
        length = max(r["rows"] for r in mine)
        counts = np.zeros((length, table.n_lines + 1))    # last column: a line the table lacks
        for r in mine:
            c = classes[r["first_row"]:r["first_row"] + r["rows"]]
            counts[np.arange(len(c)), np.where(c >= 0, c, table.n_lines)] += 1
        top = np.argsort(-counts, axis=1, kind="stable")[:, :top_k]
        share = np.take_along_axis(counts, top, axis=1)
        lines.append(top.astype(np.int64))
        shares.append(share / share.sum(axis=1, keepdims=True))
        n = np.array([r["rows"] for r in mine], np.float64)
        spread = 1.4826 * np.median(np.abs(n - np.median(n)))
        e = float(np.clip(spread ** 2 / (2 * np.median(n)), 0.003, 0.05))
        tempo.append(np.array([e, 1 - 2 * e, e]))
    train_cls = classes[ds.split_windows("train")]
    freq = np.bincount(train_cls[train_cls >= 0], minlength=table.n_lines) + 1.0
    return ProgramTracker(list(ds.operations), names, timeline_of, lines, shares, tempo, np.log(freq / freq.sum()),
                          PARAMS | (params or {}))


def fit_temperature(logits: np.ndarray, labels: np.ndarray, grid=np.exp(np.linspace(np.log(0.25), np.log(8), 61))) -> float:
    """The temperature minimising the NLL of labels (rows with label < 0 are ignored)."""
    ok = labels >= 0
    z, y = np.asarray(logits, np.float64)[ok], labels[ok]
    nll = [-log_softmax(z / t)[np.arange(len(y)), y].mean() for t in grid]
    return float(grid[int(np.argmin(nll))])


def reliability(confidence: np.ndarray, correct: np.ndarray, bins: int = 10) -> dict:
    """ECE (equal-width bins) and the reliability table: per bin, count, mean confidence, accuracy."""
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(confidence, edges) - 1, 0, bins - 1)
    rows, ece = [], 0.0
    for b in range(bins):
        sel = which == b
        if sel.any():
            conf, acc = float(confidence[sel].mean()), float(correct[sel].mean())
            ece += sel.mean() * abs(conf - acc)
            rows.append({"bin": [round(edges[b], 2), round(edges[b + 1], 2)], "n": int(sel.sum()),
                         "confidence": round(conf, 4), "accuracy": round(acc, 4)})
    return {"ece": float(ece), "bins": rows}


# The rows /stream judges by default (GCODEFP_STREAM_EVERY): training tunes the tracker as it is served,
# and each replay costs a quarter of judging every row.
SERVED_EVERY = 4
DEFAULT_GRID = {"line_weight": [0.0, 0.01, 0.03, 0.1], "op_weight": [0.02, 0.05], "skip": [0.0]}
# What training searches (every training run pays for it, the tests' tiny ones too): the emission
# weights the offline benchmark chose lie inside it.
TRAINING_GRID = {"line_weight": [0.0, 0.03, 0.1], "op_weight": [0.05], "skip": [0.0]}


def fit_program_tracker(models: list, ds, table: LineTable, seed: int = 0, max_streams: int | None = 16,
                        grid: dict | None = None, temperature_windows: int | None = 4096,
                        every: int = SERVED_EVERY) -> tuple[ProgramTracker, dict]:
    """What training stores in the checkpoint (and export in model.json): the tracker of the training
    runs, its temperatures fitted on the validation windows, its emission weights and window_weight
    chosen on validation streams (each run from its start, and attached 25-75% in with 5% of rows
    lost), then the operation evidence from the readings that ships (templates, spread: each only
    where it gains there). The replays judge every `every`-th row, as /stream does by default, so the
    weights are chosen for the tracker as it is served. temperature_windows: at most this many
    validation windows fit the temperatures. -> (tracker, report)."""
    classes = row_classes(ds, table)
    tracker = build_program_tracker(ds, table)
    tracker.templates = fit_operation_templates(ds, list(table.operation_program))
    tracker.spread = fit_operation_spread(ds, seed=seed)
    ids = ds.split_windows("val")
    if temperature_windows and len(ids) > temperature_windows:   # evenly spaced: every run keeps its share
        ids = ids[np.linspace(0, len(ids) - 1, temperature_windows).astype(np.int64)]
    val = stream_outputs(models, ds, ids[:, None] + np.arange(-ds.window + 1, 1))
    steps = np.exp(np.linspace(np.log(0.25), np.log(8), 25))     # temperatures 15% apart
    temps = {"op_temperature": fit_temperature(val["op_logits"], ds.operation_labels(ids), steps),
             "line_temperature": fit_temperature(val["line_logits"], classes[ids], steps)}
    tracker.set_params(**temps)
    rng = np.random.default_rng(seed)
    streams = []
    for condition in (dict(), dict(attach=0.25, loss=0.05)):
        for run in (r for r in ds.manifest["runs"] if r["split"] == "val"):
            s = stream_record(models, ds, run, make_stream(run["rows"], rng, **condition), classes,
                              {"template": tracker.templates, "spread": tracker.spread})
            s["from_start"] = "attach" not in condition
            s["scored"] = np.arange(len(s["offsets"])) >= (ds.window - 1 if s["from_start"] else 30)
            streams.append(s)
    if max_streams and len(streams) > max_streams:
        streams = streams[::len(streams) // max_streams + 1]
    params, results = tune_tracker(tracker, streams, grid or DEFAULT_GRID, every=every)
    best = pick_tracker_params(results)
    report = {"temperatures": temps, "tuning": [r[:3] for r in results], "streams": len(streams),
              "exact_match": best[1], "op_acc": best[2], "conditions": best[3]}
    current = best[1:]   # the tracker as it stands: each kind's weight 0 scores this (not replayed again)
    for kind, param, weights in (("templates", "template_weight", TEMPLATE_WEIGHTS),
                                 ("spread", "spread_weight", SPREAD_WEIGHTS)):
        if getattr(tracker, kind) is None:
            continue
        weight, scored = choose_evidence_weight(tracker, streams, param, weights, baseline=current, every=every)
        report |= {f"{kind}_tuning": [r[:3] for r in scored]}
        if weight > 0:
            current = next(r for r in scored if r[0] == weight)[1:]
            report |= {"exact_match": current[0], "op_acc": current[1], "conditions": current[2]}
        else:   # no help on validation: the package does not carry it and /stream pays nothing for it
            setattr(tracker, kind, None)
    return tracker, report | {"params": dict(tracker.params), "every": every}


def run_tracker(tracker: ProgramTracker, op_logits, line_logits, weights=None, repeated=None,
                from_start: bool = False, every: int = 1, template=None, spread=None) -> dict[str, np.ndarray]:
    """One stream through a fresh session -> per row: operation, line, line_confidence, paused, and
    `judged`. every > 1: as a server that judges the last row and every `every`-th row before it
    (runtime.tracked_stream.judged_rows): the filter moves over the rows between judged ones, and
    only judged rows get an answer (the others keep line -1, judged False). template, spread: per row,
    the window's operation evidence of that kind (used when the tracker uses it)."""
    n = len(op_logits)
    repeated = np.zeros(n, bool) if repeated is None else np.asarray(repeated, bool)
    judged, gaps, repeats = judged_rows(n, every, repeated) if n else (np.zeros(0, np.int64),) * 3
    session = tracker.start(at_program_start=from_start)
    out = {"operation": np.zeros(n, np.int64), "line": np.full(n, -1, np.int64),
           "line_confidence": np.zeros(n), "paused": np.zeros(n), "judged": np.zeros(n, bool)}
    for i, gap, rep in zip(judged, gaps, repeats):
        s = session.update(op_logits[i], line_logits[i], 1.0 if weights is None else float(weights[i]),
                           int(rep), int(gap), None if template is None else template[i],
                           None if spread is None else spread[i])
        out["operation"][i], out["line"][i], out["line_confidence"][i], out["paused"][i] = \
            s.operation, s.line, s.line_confidence, s.paused
        out["judged"][i] = True
    return out


def window_answers(table: LineTable, op_logits: np.ndarray, line_logits: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Window mode, as the predict graph answers: op argmax, line argmax among that program's lines,
    and the line's confidence (softmax within the program)."""
    op = op_logits.argmax(1)
    allowed = table.mask[np.asarray(table.operation_program)[op]]
    z = np.where(allowed, line_logits, -1e9)
    p = np.exp(log_softmax(z))
    line = p.argmax(1)
    return op, line, p[np.arange(len(line)), line]


def tune_tracker(tracker: ProgramTracker, streams: list[dict], grid: dict[str, list[float]],
                 window_weights=(0.0, 0.5, 1.0, 2.0, 1e6), every: int = 1) -> tuple[dict, list]:
    """Choose tracker params on validation streams by mean exact line over streams (pick_tracker_params:
    near-ties go to the least weights). The filter params in `grid` are searched by replaying the streams; the
    window weights do not change the filter, so they are chosen for each grid point from the same replay:
    window_weight_start on the streams followed from their start, window_weight on the others (every pair
    is a result row; the best pair is the best of each, since the two score disjoint streams).
    streams: dicts with op_logits, line_logits, weights, repeated, line_target (class, -1 unknown),
    op_target, scored (bool mask), from_start (bool, optional). every: score the rows a server judging
    every `every`-th row answers (run_tracker).
    -> (best params, [(params, exact, op, {condition: {streams, exact_match, op_acc}})]), conditions
    "start" (streams with from_start) and "attached" (the others)."""
    results = []
    base = dict(tracker.params)
    for values in itertools.product(*grid.values()):
        tracker.set_params(**(base | dict(zip(grid, values)) | {"window_weight": 0.0, "window_weight_start": 0.0}))
        exact, op = {w: [] for w in window_weights}, []
        for s in streams:
            out = run_tracker(tracker, s["op_logits"], s["line_logits"], s["weights"], s["repeated"],
                              s.get("from_start", False), every, s.get("template"), s.get("spread"))
            sel, y = s["scored"] & out["judged"], s["line_target"]
            w_line, w_conf = window_lines(tracker, out["operation"], s["line_logits"])
            for w in window_weights:
                line = np.where(w * w_conf > out["line_confidence"], w_line, out["line"])
                exact[w].append(np.mean((line[sel] == y[sel]) & (y[sel] >= 0)))
            op.append(np.mean(out["operation"][sel] == s["op_target"]))
        starts = np.array([bool(s.get("from_start", False)) for s in streams])
        pairs = itertools.product(window_weights, window_weights if starts.any() else window_weights[:1])
        for w, w_start in pairs:
            per_stream = np.where(starts, exact[w_start], exact[w])
            conditions = {name: {"streams": int(mine.sum()), "exact_match": float(np.mean(per_stream[mine])),
                                 "op_acc": float(np.mean(np.asarray(op)[mine]))}
                          for name, mine in (("start", starts), ("attached", ~starts)) if mine.any()}
            results.append((dict(zip(grid, values)) | {"window_weight": w, "window_weight_start": w_start},
                            float(np.mean(per_stream)), float(np.mean(op)), conditions))
    tracker.set_params(**(base | pick_tracker_params(results)[0]))
    return tracker.params, results


def pick_tracker_params(results: list[tuple], exact_tolerance: float = 0.005) -> tuple:
    """tune_tracker's rule on [(params, exact, op, ...)]: among the grid points within exact_tolerance
    of the best exact line, and within it of their best operation, the one with the least weights
    (in the grid's order: line_weight first). On 21 validation runs such points tie: a side-channel
    checkpoint took line weight 0.03 over 0 by 0.03 points, so its templates (+2 points over line
    weight 0) did not ship, and its test operation from the program start fell from 97.7% to 89.7%."""
    return min(near_best(results, exact_tolerance), key=lambda r: tuple(r[0].values()))


def near_best(scored: list[tuple], tolerance: float) -> list[tuple]:
    """The rows [(choice, exact, op, ...)] within `tolerance` of the best exact line and, among those,
    within it of their best operation: the near-ties the tuning rules break towards the least weights."""
    top = max(r[1] for r in scored)
    near = [r for r in scored if r[1] >= top - tolerance]
    best_op = max(r[2] for r in near)
    return [r for r in near if r[2] >= best_op - tolerance]


def window_lines(tracker: ProgramTracker, operation: np.ndarray, line_logits: np.ndarray):
    """The window's own line among the lines of each row's tracked operation, and its confidence
    (as TrackerSession.update computes it)."""
    z = np.where(tracker._op_lines[operation], line_logits / tracker.params["line_temperature"], -np.inf)
    p = np.exp(z - z.max(1, keepdims=True))
    line = p.argmax(1)
    return line, p[np.arange(len(line)), line] / p.sum(1)


# The templates' scores are cosines in [-1, 1]; the spread model's are log-probabilities, on the scale
# of the window model's operation evidence (op_weight 0.02-0.05): 0.01-0.03 won on the real data's
# validation streams (benchmarks/spread_evidence_tracker.py; 0.003 never won) and 0.03-0.1 on `full`'s.
TEMPLATE_WEIGHTS = (0.0, 0.3, 1.0, 3.0, 10.0)
SPREAD_WEIGHTS = (0.0, 0.01, 0.03, 0.1)


def choose_evidence_weight(tracker: ProgramTracker, streams: list[dict], param: str = "template_weight",
                           weights=TEMPLATE_WEIGHTS, exact_tolerance: float = 0.005, min_gain: float = 0.005,
                           baseline: tuple | None = None, every: int = 1) -> tuple[float, list]:
    """The weight `param` of one kind of operation evidence (template_weight, spread_weight), scored on
    validation streams and picked by pick_evidence_weight: it is operation evidence, so it should not
    move the line; and it ships only where it gains, since it costs /stream capacity (a `full` model,
    whose positions already name the operation, gained 0.3 points from templates). baseline: (exact, op,
    conditions) of the tracker at weight 0 when already replayed (each replay of the real data's 42
    validation streams is seconds of training time). Sets it on the tracker
    -> (weight, [(weight, exact, op, conditions)])."""
    scored = []
    for w in weights:
        if w == 0 and baseline is not None:
            scored.append((0.0, *baseline))
            continue
        tracker.set_params(**{param: w})
        exact, op, starts = [], [], []
        for s in streams:
            out = run_tracker(tracker, s["op_logits"], s["line_logits"], s["weights"], s["repeated"],
                              s.get("from_start", False), every, s.get("template"), s.get("spread"))
            sel, y, line = s["scored"] & out["judged"], s["line_target"], out["line"]   # window_weight applied by the session
            exact.append(np.mean((line[sel] == y[sel]) & (y[sel] >= 0)))
            op.append(np.mean(out["operation"][sel] == s["op_target"]))
            starts.append(bool(s.get("from_start", False)))
        starts = np.array(starts)
        conditions = {name: {"streams": int(mine.sum()), "exact_match": float(np.mean(np.asarray(exact)[mine])),
                             "op_acc": float(np.mean(np.asarray(op)[mine]))}
                      for name, mine in (("start", starts), ("attached", ~starts)) if mine.any()}
        scored.append((w, float(np.mean(exact)), float(np.mean(op)), conditions))
    best = pick_evidence_weight(scored, exact_tolerance, min_gain)
    tracker.set_params(**{param: best})
    return best, scored


def pick_evidence_weight(scored: list[tuple], exact_tolerance: float = 0.005, min_gain: float = 0.005) -> float:
    """choose_evidence_weight's rule on [(weight, exact, op, ...)]: among weights within exact_tolerance of
    the best exact line, the least nonzero one within exact_tolerance of their best operation; 0 unless
    it gains min_gain in exact + op over weight 0. The least, because on 21 validation runs a larger
    weight that wins by a hair is noise, and on the test split it costs (benchmarks/evidence_choice.py:
    on `full`, spread weight 0.1 cost 1.2-4.2 points of operation where 0.01 moved it by 0.2 at most)."""
    best = min(near_best(scored, exact_tolerance), key=lambda r: (r[0] == 0, r[0]))
    off = next((r for r in scored if r[0] == 0), None)
    if off is not None and best[1] + best[2] < off[1] + off[2] + min_gain:
        return 0.0
    return float(best[0])
