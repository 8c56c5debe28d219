"""What a followed machine's rows answer in tracker mode: shared by POST /stream/{machine} (api/streams.py,
chunk by chunk) and `gcodefp track` (a whole log offline), so that both give the same answers.

A tracker session judges the last row of what it received and every `every`-th row before it: the
window ending at a judged row goes through the predict graph, and the filter moves over the rows
since the previous judged one (gcodefp_core.runtime.program_tracker). Until W rows have arrived a
window is padded with the first row and its evidence weighs the share of real rows. Where a model
that reads positions finds the position on the program's tool path, the path names the line.
"""
from __future__ import annotations

import numpy as np

from .windows import predict_windows


def judged_rows(n: int, every: int, repeated: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The last of n rows and every `every`-th row before it -> (their indices, rows since the previous
    judged row (the one before these n rows was judged), how many of those rows repeat the row before
    them: pause evidence)."""
    judged = np.arange(n - 1, -1, -every)[::-1]
    gaps = np.diff(judged, prepend=-1)
    repeats = np.add.reduceat(repeated.astype(np.int64), judged - gaps + 1)
    return judged, gaps, repeats


def operation_answer(operations: list[str], logits: np.ndarray) -> dict:
    z = np.exp(logits - logits.max())
    i = int(z.argmax())
    return {"name": operations[i], "confidence": round(float(z[i] / z.sum()), 6)}


def tracked_answers(predictor, session, out: dict, first: int, judged, gaps, repeats, real_rows: int,
                    lo: int, hi: int) -> list[dict]:
    """The session's answers at judged rows lo..hi-1. out[i]: the graph's answer for the window ending at
    row judged[i]; first: that row's number since the session started when judged[i] is 0; real_rows:
    rows the session had received before these (the weight of a padded window)."""
    w, template, spread = predictor.window, out.get("template"), out.get("spread")
    predictions = []
    for i in range(lo, hi):
        j, logits, line = int(judged[i]), out["op_logits"][i], int(out["line"][i])
        weight = min(real_rows + j + 1, w) / w
        step = session.update(logits, out["line_logits"][i], weight, int(repeats[i]), int(gaps[i]),
                              None if template is None else template[i], None if spread is None else spread[i])
        source, answer, conf = step.line_source, step.line, step.line_confidence
        if out["on_path"][i]:  # the position lies on the program's tool path: that names the line exactly
            # (models that read positions); the tracker still gives the operation
            source, answer, conf = "path", line, float(out["line_confidence"][i])
        elif answer < 0:  # the tracked program's timeline holds no line here: the window's own answer
            source, answer, conf = "window", line, float(out["line_confidence"][i])
        operation = {"name": predictor.operations[step.operation], "confidence": round(step.operation_confidence, 6)}
        predictions.append({"row": first + j, "gcode_sequence": predictor.lines[answer], "operation": operation,
                            "line_confidence": round(conf, 6), "line_source": source,
                            "paused": round(step.paused, 6), "program_offset": step.offset,
                            "entropy": round(step.entropy, 4), "evidence_weight": round(weight, 4),
                            "window": {"operation": operation_answer(predictor.operations, logits),
                                       "gcode_sequence": predictor.lines[line]}})
    return predictions


def track_rows(predictor, cont: np.ndarray, cat: np.ndarray, every: int = 4, start: bool = False) -> list[dict]:
    """A machine's received rows in one go (normalised model inputs [n, F] / [n, C], in order), as one
    /stream chunk to a new session -> the answers at the judged rows."""
    if predictor.program_tracker is None:
        raise ValueError("this package has no program tracker (its predict graph lacks line_logits): "
                         "stream it with the row-count clock through POST /stream instead")
    n, w = len(cont), predictor.window
    if n == 0:
        return []
    repeated = np.zeros(n, bool)
    repeated[1:] = (cont[1:] == cont[:-1]).all(axis=1)
    judged, gaps, repeats = judged_rows(n, every, repeated)
    pc = np.concatenate([np.repeat(cont[:1], w - 1, axis=0), cont])
    pk = np.concatenate([np.repeat(cat[:1], w - 1, axis=0), cat])
    wc = np.lib.stride_tricks.sliding_window_view(pc, w, axis=0).transpose(0, 2, 1)[judged]
    wk = np.lib.stride_tricks.sliding_window_view(pk, w, axis=0).transpose(0, 2, 1)[judged]
    out = predict_windows(predictor, wc, wk)
    session = predictor.program_tracker.start(at_program_start=start)
    return tracked_answers(predictor, session, out, 0, judged, gaps, repeats, 0, 0, len(judged))
