"""Evaluation: operation accuracy, token accuracy (teacher-forced and free-running), exact-line
match, G-code word accuracy and fingerprint retrieval, overall and per operation.

Definitions (targets are the tokens after BOS, EOS included, PAD excluded):
- token_acc_tf: argmax under teacher forcing equals the target token;
- token_acc_greedy: the free-running greedy (or beam) output equals the target at the same position;
- exact_match: the decoded text equals the canonical target line;
- word_acc: per line, words equal at the same position / max(#predicted words, #target words);
- fingerprint_nn_acc: the nearest fingerprint (cosine) among reference windows of *other runs*
  (the train split, evenly subsampled) has the query's operation. Windows of one run overlap, so
  same-run neighbours would be trivially right.
An ensemble averages the members' probabilities (operation and every decoding step).
"""
from __future__ import annotations

import numpy as np
import torch

from .config import VALIDATION_METRICS as OVERALL_METRICS
from .model import GCodeFingerprintModel, TorchStep
from .runtime import decoding
from .runtime.bundle import ModelBundle


def table_lines(models: list[GCodeFingerprintModel], bundle: ModelBundle | None) -> list[str] | None:
    """The line head's classes, for models that have one."""
    table = bundle.line_table if bundle is not None else None
    return table.lines if table is not None and models[0].cfg.n_lines else None


def _softmax(x: np.ndarray) -> np.ndarray:
    return np.exp(decoding.log_softmax(x.astype(np.float64)))


@torch.no_grad()
def predict(models: list[GCodeFingerprintModel], bundle: ModelBundle | None, ds, window_ids: np.ndarray,
            batch_size: int = 1024, beam_width: int = 1, greedy: bool = True) -> dict[str, np.ndarray]:
    """Run models (one = single model, several = ensemble) over windows -> numpy predictions. The
    bundle's program path (if any) snaps the line, as the runtime does; None: the line head alone."""
    for m in models:
        m.eval()
    out: dict[str, list] = {k: [] for k in ("op_prob", "fingerprint", "tf_pred", "tf_loss", "decoded", "targets",
                                            "operation", "run", "line_pred", "line_confidence", "line_model")}
    with_lines = all(m.cfg.n_lines for m in models)
    for start in range(0, len(window_ids), batch_size):
        b = ds.batch(window_ids[start:start + batch_size])
        full_target = b["tokens"][:, 1:]
        width = max(2, int((b["tokens"] != decoding.PAD).sum(1).max()))  # skip all-PAD columns
        cont, cat, tokens = (torch.as_tensor(b[k]) for k in ("continuous", "categorical", "tokens"))
        tokens = tokens[:, :width]
        tok_p, op_p, line_p, fps = 0.0, 0.0, 0.0, []
        for m in models:
            tok_logits, op_logits, fp, line_logits = m(cont, cat, tokens)
            tok_p = tok_p + torch.softmax(tok_logits.double(), -1) / len(models)
            op_p = op_p + torch.softmax(op_logits.double(), -1) / len(models)
            if with_lines:
                line_p = line_p + torch.softmax(line_logits.double(), -1) / len(models)
            fps.append(fp)
        if with_lines:  # the averaged line probabilities, among the lines of the predicted program
            allowed = models[0].allowed_lines(op_p.argmax(-1))
            line_p = torch.where(allowed, line_p, torch.zeros_like(line_p))
            confidence, line = (line_p / line_p.sum(-1, keepdim=True).clamp_min(1e-12)).max(-1)
            line, confidence = line.numpy(), confidence.numpy()
            out["line_model"].append(line)
            path = bundle.program_path if bundle is not None else None
            if path is not None:  # snap onto the program's tool path where the position lies on it
                program = models[0].op_program[op_p.argmax(-1)].numpy()
                line, confidence, _ = path.snap(program, b["continuous"][:, -1], line, confidence)
            out["line_pred"].append(line)
            out["line_confidence"].append(confidence)
        target = tokens[:, 1:]
        nll = -torch.log(tok_p.gather(2, target.unsqueeze(2)).squeeze(2) + 1e-12)
        mask = target != decoding.PAD
        out["tf_loss"].append(((nll * mask).sum(1) / mask.sum(1)).numpy())
        out["tf_pred"].append(_pad_to(tok_p.argmax(-1).numpy(), full_target.shape[1]))
        out["op_prob"].append(op_p.numpy())
        # The ensemble's fingerprint: mean of the members', renormalised.
        out["fingerprint"].append(torch.nn.functional.normalize(torch.stack(fps).mean(0), dim=-1).numpy())
        out["targets"].append(full_target)
        out["operation"].append(b["operation"])
        out["run"].append(b["run"])
        if greedy:
            max_len = min(full_target.shape[1], models[0].cfg.max_decode_len)
            decoded = decode(models, b["continuous"], b["categorical"], max_len, beam_width)
            out["decoded"].append(_pad_to(decoded, full_target.shape[1]))
    return {k: np.concatenate(v) for k, v in out.items() if v}


def _pad_to(tokens: np.ndarray, width: int) -> np.ndarray:
    return np.pad(tokens, ((0, 0), (0, width - tokens.shape[1])), constant_values=decoding.PAD)


def decode(models: list[GCodeFingerprintModel], continuous: np.ndarray, categorical: np.ndarray, max_len: int,
           beam_width: int = 1) -> np.ndarray:
    """Free-running decoding with the numpy decoders over torch-backed step functions."""
    steps = [TorchStep(m) for m in models]
    states = [s.initial_state(continuous, categorical)[0] for s in steps]
    step, state = (steps[0], states[0]) if len(steps) == 1 else (decoding.ensemble_step(steps), decoding.merge_states(states))
    if beam_width > 1:
        return decoding.beam_search(step, state, len(continuous), max_len, beam_width=beam_width)[0]
    return decoding.greedy(step, state, len(continuous), max_len)


def fingerprint_nn_accuracy(query_fp, query_op, query_run, ref_fp, ref_op, ref_run, chunk: int = 2048) -> np.ndarray:
    """Per query: 1 if its nearest reference fingerprint from another run has the same operation."""
    hits = np.zeros(len(query_fp), dtype=bool)
    for s in range(0, len(query_fp), chunk):
        sims = query_fp[s:s + chunk] @ ref_fp.T
        sims[query_run[s:s + chunk, None] == ref_run[None, :]] = -np.inf
        hits[s:s + chunk] = ref_op[sims.argmax(1)] == query_op[s:s + chunk]
    return hits


def line_scores(pred: dict, ds, window_ids, table_lines: list[str] | None = None) -> dict[str, np.ndarray]:
    """Per-window scores (arrays of length N) from predictions. table_lines: the line head's classes
    (needed when pred has "line_pred")."""
    tok = ds.tokenizer
    target, mask = pred["targets"], pred["targets"] != decoding.PAD
    scores = {
        "op_acc": pred["op_prob"].argmax(1) == pred["operation"],
        "tf_correct": ((pred["tf_pred"] == target) & mask).sum(1), "n_tokens": mask.sum(1),
        "loss": pred["tf_loss"],
    }
    lines = ds.target_lines(window_ids)
    if "decoded" in pred:
        scores["greedy_correct"] = ((pred["decoded"] == target) & mask).sum(1)
        scores |= text_scores([tok.decode([decoding.BOS] + row.tolist()) for row in pred["decoded"]], lines, "decoder_")
    if "line_pred" in pred:
        scores |= text_scores([table_lines[i] for i in pred["line_pred"]], lines, "line_")
    return scores


def text_scores(texts: list[str], targets: list[str], prefix: str) -> dict[str, np.ndarray]:
    """Per line: exact (bool), word_correct, n_words (word_acc = sum(word_correct) / sum(n_words))."""
    words = [(p.split(), t.split()) for p, t in zip(texts, targets)]
    return {f"{prefix}exact": np.array([p == t for p, t in zip(texts, targets)]),
            f"{prefix}word_correct": np.array([sum(a == b for a, b in zip(p, t)) for p, t in words]),
            f"{prefix}n_words": np.array([max(len(p), len(t), 1) for p, t in words])}


def stream_report(clock, table, ds, window_ids: np.ndarray, pred: dict) -> dict:
    """Streaming mode (gcodefp_core.runtime.clock): every run followed from its start, the clock and
    the accumulated operation evidence on top of the window predictions."""
    from .clock_fitting import replay

    streamed = replay(clock, table.operation_program, ds, window_ids, np.log(np.clip(pred["op_prob"], 1e-12, None)),
                      pred["line_pred"], pred["line_confidence"])
    scores = {"op_acc": streamed["operation"] == pred["operation"], "clock": streamed["clock"]}
    scores |= text_scores([table.lines[i] for i in streamed["line"]], ds.target_lines(window_ids), "")

    def summary(idx) -> dict:
        return {"windows": int(len(idx)), "op_acc": float(scores["op_acc"][idx].mean()),
                "exact_match": float(scores["exact"][idx].mean()),
                "word_acc": float(scores["word_correct"][idx].sum() / max(scores["n_words"][idx].sum(), 1)),
                "clock_answers": float(scores["clock"][idx].mean())}

    report = {"clock_weight": clock.weight, "overall": summary(np.arange(len(window_ids))), "per_operation": {}}
    for i, op in enumerate(ds.operations):
        idx = np.flatnonzero(pred["operation"] == i)
        if len(idx):
            report["per_operation"][op] = summary(idx)
    return report


TRACKED_CONDITIONS = {"start": {}, "attached_loss5": {"attach": 0.25, "loss": 0.05}}


def tracker_stream_report(models, tracker, table, ds, split: str, every: int = 4, seed: int = 0) -> dict:
    """Streaming mode as POST /stream serves it (gcodefp_core.runtime.program_tracker, the last row of
    each chunk and every `every`-th row judged): every run of the split followed from its program
    start, and attached at a random point 25-75% in with 5% of rows lost. Scored at judged rows from
    the first full window (start) or from 30 received rows on (attached), as the tracker is tuned.
    The top-level overall / per_operation are the "start" condition's."""
    from .fit_program_tracker import run_tracker
    from .monitor_streams import make_stream, stream_record
    from .programs import row_classes

    classes, rng = row_classes(ds, table), np.random.default_rng(seed)
    report = {"mode": "tracker", "every": every, "conditions": {}}
    for name, condition in TRACKED_CONDITIONS.items():
        hits: dict[str, list] = {}
        for run in (r for r in ds.manifest["runs"] if r["split"] == split):
            s = stream_record(models, ds, run, make_stream(run["rows"], rng, **condition), classes,
                              {"template": tracker.templates if tracker.uses_templates else None,
                               "spread": tracker.spread if tracker.uses_spread else None})
            out = run_tracker(tracker, s["op_logits"], s["line_logits"], s["weights"], s["repeated"],
                              from_start=not condition, every=every, template=s.get("template"),
                              spread=s.get("spread"))
            scored = out["judged"] & (np.arange(len(s["offsets"])) >= (30 if condition else ds.window - 1))
            y = s["line_target"][scored]
            hits.setdefault(run["operation"], []).append(
                (out["operation"][scored] == s["op_target"], (out["line"][scored] == y) & (y >= 0)))

        def summary(parts) -> dict:
            op, exact = (np.concatenate(x) for x in zip(*parts))
            return {"windows": int(len(op)), "op_acc": float(op.mean()) if len(op) else float("nan"),
                    "exact_match": float(exact.mean()) if len(op) else float("nan")}

        report["conditions"][name] = {"overall": summary([p for v in hits.values() for p in v]),
                                      "per_operation": {op: summary(v) for op, v in hits.items()}}
    return report | report["conditions"]["start"]


def summarise(scores: dict[str, np.ndarray], idx=slice(None)) -> dict[str, float]:
    s = {k: v[idx] for k, v in scores.items()}
    out = {"windows": int(len(s["op_acc"])), "op_acc": float(s["op_acc"].mean()),
           "token_acc_tf": float(s["tf_correct"].sum() / max(s["n_tokens"].sum(), 1)), "loss": float(s["loss"].mean())}
    for prefix in ("decoder_", "line_"):
        if f"{prefix}exact" in s:
            out[f"{prefix}exact_match"] = float(s[f"{prefix}exact"].mean())
            out[f"{prefix}word_acc"] = float(s[f"{prefix}word_correct"].sum() / max(s[f"{prefix}n_words"].sum(), 1))
    if "greedy_correct" in s:
        out["token_acc_greedy"] = float(s["greedy_correct"].sum() / max(s["n_tokens"].sum(), 1))
    # The model's answer is the line head's when it has one (what the server returns), else the decoder's.
    for prefix in ("line_", "decoder_"):
        if f"{prefix}exact_match" in out:
            out["exact_match"], out["word_acc"] = out[f"{prefix}exact_match"], out[f"{prefix}word_acc"]
            break
    if "fp_hit" in s:
        out["fingerprint_nn_acc"] = float(s["fp_hit"].mean())
    return out


def seed_spread(reports: list[dict], metrics) -> dict:
    """Reports of several seeds ({"overall": {...}, "per_operation": {op: {...}}} each) ->
    {row: {metric: [mean, min, max]}} for the overall row and each operation of the first report;
    a metric is kept where every report has it."""
    out = {}
    for row in ["overall"] + list(reports[0]["per_operation"]):
        vals = [r["overall"] if row == "overall" else r["per_operation"][row] for r in reports]
        out[row] = {m: [float(np.mean([v[m] for v in vals])), min(v[m] for v in vals), max(v[m] for v in vals)]
                    for m in metrics if all(m in v for v in vals)}
    return out


def evaluate_models(models: list[GCodeFingerprintModel], bundle: ModelBundle, ds, split: str = "test",
                    batch_size: int = 1024, beam_width: int = 1, max_reference: int = 20000,
                    max_windows: int | None = None) -> dict:
    """Full report for a split: {"overall": {...}, "per_operation": {op: {...}}}."""
    window_ids = ds.split_windows(split)
    if max_windows and len(window_ids) > max_windows:
        window_ids = window_ids[np.linspace(0, len(window_ids) - 1, max_windows).astype(np.int64)]
    if len(window_ids) == 0:
        raise ValueError(f"split {split!r} has no windows in {ds.path}")
    pred = predict(models, bundle, ds, window_ids, batch_size, beam_width)
    scores = line_scores(pred, ds, window_ids, table_lines(models, bundle))
    ref_ids = ds.split_windows("train")
    if len(ref_ids) > max_reference:
        ref_ids = ref_ids[np.linspace(0, len(ref_ids) - 1, max_reference).astype(np.int64)]
    ref = predict(models, bundle, ds, ref_ids, batch_size, greedy=False)
    scores["fp_hit"] = fingerprint_nn_accuracy(pred["fingerprint"], pred["operation"], pred["run"],
                                               ref["fingerprint"], ref["operation"], ref["run"])
    report = {"split": split, "overall": summarise(scores), "per_operation": {}}
    for i, op in enumerate(ds.operations):
        idx = np.flatnonzero(pred["operation"] == i)
        if len(idx):
            report["per_operation"][op] = summarise(scores, idx)
    path = bundle.program_path
    if path is not None and "line_pred" in pred:
        lines, targets = np.asarray(table_lines(models, bundle), dtype=object), np.asarray(ds.target_lines(window_ids), dtype=object)
        report["program_path"] = {"tolerance_mm": path.tolerance_mm,   # "changed": the share of lines snapping changed
                                  "changed": float((pred["line_pred"] != pred["line_model"]).mean()),
                                  "exact_match_line_head_only": float((lines[pred["line_model"]] == targets).mean())}
    if bundle.program_tracker is not None and "line_pred" in pred:   # what /stream serves
        report["stream"] = tracker_stream_report(models, bundle.program_tracker, bundle.line_table, ds, split)
    elif bundle.program_clock is not None and "line_pred" in pred:  # older models: the row clock
        report["stream"] = stream_report(bundle.program_clock, bundle.line_table, ds, window_ids, pred)
    return report


def format_table(report: dict) -> str:
    cols = ("windows",) + OVERALL_METRICS
    head = f"{'operation':<16}" + "".join(f"{c:>19}" for c in cols)
    rows = [head, "-" * len(head)]
    for name, m in list(report["per_operation"].items()) + [("OVERALL", report["overall"])]:
        cells = "".join(f"{m[c]:>19d}" if c == "windows" else f"{100 * m.get(c, float('nan')):>18.2f}%" for c in cols)
        rows.append(f"{name:<16}{cells}")
    if "program_path" in report:
        path = report["program_path"]
        rows += ["", f"program path: tolerance {path['tolerance_mm']:g} mm; snapping changed "
                     f"{100 * path['changed']:.2f}% of the lines; exact match with the line head alone "
                     f"{100 * path['exact_match_line_head_only']:.2f}%"]
    stream = report.get("stream")
    if stream and stream.get("mode") == "tracker":
        rows += ["", f"streaming mode (the program tracker, as /stream serves it: every {stream['every']}th row judged):",
                 f"{'operation':<16}" + "".join(f"{c:>16}" for c in ("judged rows", "start op", "start exact",
                                                                      "attached op", "attached exact"))]
        start, late = stream["conditions"]["start"], stream["conditions"]["attached_loss5"]
        for name in list(start["per_operation"]) + ["OVERALL"]:
            a, b = ((c["overall"] if name == "OVERALL" else c["per_operation"][name]) for c in (start, late))
            rows.append(f"{name:<16}{a['windows']:>16d}" + "".join(f"{100 * v:>15.2f}%" for v in (
                a["op_acc"], a["exact_match"], b["op_acc"], b["exact_match"])))
        rows.append("(attached: at a random point 25-75% into each run, 5% of rows lost, scored from 30 rows on)")
    elif stream:
        cols = ("windows", "op_acc", "exact_match", "word_acc", "clock_answers")
        rows += ["", f"streaming mode (each run followed from its start; clock weight {stream['clock_weight']:g}):",
                 f"{'operation':<16}" + "".join(f"{c:>15}" for c in cols)]
        for name, m in list(stream["per_operation"].items()) + [("OVERALL", stream["overall"])]:
            rows.append(f"{name:<16}" + "".join(f"{m[c]:>15d}" if c == "windows" else f"{100 * m[c]:>14.2f}%"
                                                for c in cols))
    return "\n".join(rows)
