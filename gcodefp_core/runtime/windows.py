"""Windows over a stream of rows: cut every window that ends in a new chunk, run them in batches.

A machine's rows arrive in chunks of any size; a window (W rows) may span chunks, so the caller
keeps the last W-1 rows (already normalised: rows are normalised one by one, so a chunk can be
normalised alone) and hands them back with the next chunk.
"""
from __future__ import annotations

import numpy as np

BATCH_WINDOWS = 64     # windows per model call: bounds one call's memory (a 4096-row chunk has ~4000 windows;
                       # onnxruntime's arena keeps its peak: calls of 256 windows took a worker from ~125 to ~190 MB)
GATHER_WINDOWS = 64    # up to this many windows are copied out of a chunk; more are strided views
VIEW_EXTRA_ROWS = 8    # a new buffer is a view of buffer + chunk when that holds at most this many rows more
                       # (a followed machine keeps it until its next chunk: memory per session)


def slide(buf_cont: np.ndarray | None, buf_cat: np.ndarray | None, cont: np.ndarray, cat: np.ndarray, window: int,
          every: int = 1):
    """Buffer + chunk -> (windows cont or None, windows cat, new buffer cont, new buffer cat, m): window j
    is rows j .. j+W-1 of buffer + chunk, m of them end in the chunk, and every `every`-th one counted
    back from the last is cut ([ceil(m / every), W, F]: a monitor judging every 4th row needs only
    those, and copying the others was most of a chunk's cutting); the new buffer is the last <= W-1 rows."""
    all_c = np.concatenate([buf_cont, cont]) if buf_cont is not None else cont
    all_k = np.concatenate([buf_cat, cat]) if buf_cat is not None else cat
    wc = wk = None
    m = len(all_c) - window + 1
    ends = np.arange((m - 1) % every, m, every) if m > 0 else np.zeros(0, np.intp)
    if 0 < len(ends) <= GATHER_WINDOWS:  # the usual small chunk: one gather, cheaper than building strided views
        idx = ends[:, None] + np.arange(window)
        wc, wk = all_c[idx], all_k[idx]
    elif len(ends) > GATHER_WINDOWS:     # a long chunk: views, not copies of every window
        wc = np.lib.stride_tricks.sliding_window_view(all_c, window, axis=0).transpose(0, 2, 1)[(m - 1) % every::every]
        wk = np.lib.stride_tricks.sliding_window_view(all_k, window, axis=0).transpose(0, 2, 1)[(m - 1) % every::every]
    keep = max(len(all_c) - (window - 1), 0)
    if buf_cont is not None and keep <= VIEW_EXTRA_ROWS:  # the usual few-row chunk: a view of the array made
        # here, holding a few rows more than it keeps (never a view of the caller's chunk)
        return wc, wk, all_c[keep:], all_k[keep:], max(m, 0)
    return wc, wk, all_c[keep:].copy(), all_k[keep:].copy(), max(m, 0)  # not the whole chunk, per session


def predict_windows(predictor, cont: np.ndarray, cat: np.ndarray, keys=None) -> dict[str, np.ndarray]:
    """predictor.predict_lines over [m, W, .] windows in calls of BATCH_WINDOWS (or the graph's fixed
    batch, padded by repeating the last window; the padding's answers are dropped). keys: the outputs
    kept (default: op_logits, line, line_confidence, on_path, and line_logits when the model has a program
    tracker; with the default keys, also the operation evidence the tracker uses (`template`, `spread`:
    ProgramTracker.operation_evidence per window))."""
    tracker = getattr(predictor, "program_tracker", None)
    evidence = keys is None and tracker is not None and (tracker.uses_templates or tracker.uses_spread)
    if keys is None:
        keys = ("op_logits", "line", "line_confidence", "on_path") + (("line_logits",) if tracker else ())
    fixed = predictor.metadata.get("batch_size")
    step = int(fixed) if fixed else BATCH_WINDOWS
    parts = []
    for i in range(0, len(cont), step):
        c, k = cont[i:i + step], cat[i:i + step]
        n = len(c)
        if fixed and n < step:
            c, k = (np.concatenate([a, np.repeat(a[-1:], step - n, axis=0)]) for a in (c, k))
        out = predictor.predict_lines(c, k)
        part = {key: out[key][:n] for key in keys}
        if evidence:
            part |= tracker.operation_evidence(c[:n])
        parts.append(part)
    return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]} if parts else {key: np.zeros(0) for key in keys}
