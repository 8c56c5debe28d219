"""`gcodefp monitor`: replay a recorded log to a running server's /stream, as a machine's monitor would.

A monitor posts a machine's rows as they come, a few at a time, and reads back what the machine is
executing. This command does that with a recorded (aligned) log, through api.client, so the answers
are what a monitor gets from that server: its package, its workers, its handoffs, and the client's
retry of a lost answer (Idempotency-Key). It can also give the server a monitor's usual troubles:
attaching late (--from-row) and rows lost in transit (--lose). Each answer is printed as a JSON line
with the log's own label beside it, and a summary goes to stderr: how often the streamed operation and
line agree with the labels, and the chunks' latency. Reads the log with the core's reader (the
labelled format of gcodefp_core.logs); no model is loaded here.
"""
from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

SETTLE_ROWS = 30   # answers this soon after attaching are the filter still locking on: scored apart


def register(sub) -> None:
    p = sub.add_parser("monitor", help="replay a recorded log to a running server's /stream, as a monitor would",
                       description="Post one log's rows to POST /stream/{machine} in chunks, at the machine's "
                                   "cadence or as fast as the server answers, and compare the answers with the "
                                   "log's labels (JSON lines on stdout or --output, a summary on stderr).")
    p.add_argument("log", type=Path, help="an aligned sensor log (<operation>_<NNN>_aligned.csv[.gz])")
    p.add_argument("--url", default="http://127.0.0.1:8000",
                   help="the server (default %(default)s); $GCODEFP_API_TOKEN is sent as its bearer token when set")
    p.add_argument("--ca", type=Path, metavar="PEM", help="an https server's CA certificate (default: the system's)")
    p.add_argument("--machine", help="machine id (default: the log's name)")
    p.add_argument("--chunk", type=int, default=4, help="rows per request (default 4)")
    p.add_argument("--rate", type=float, default=0.0,
                   help="rows a second (4: the machine's own cadence; default 0: as fast as the server answers)")
    p.add_argument("--from-row", type=int, default=0, help="attach at this row of the log (a monitor that starts late)")
    p.add_argument("--lose", type=float, default=0.0, help="lose each row after the first with this probability")
    p.add_argument("--seed", type=int, default=0, help="for --lose")
    p.add_argument("--start", action="store_true", help="the first row posted is the program's start (start: true)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per request (default 10)")
    p.add_argument("--output", "-o", type=Path, help="write the JSON lines here (default: stdout)")
    p.set_defaults(handler=_monitor)


def _check(args) -> None:
    if args.chunk < 1:
        raise ValueError(f"--chunk: must be >= 1, got {args.chunk}")
    if args.rate < 0:
        raise ValueError(f"--rate: must be >= 0, got {args.rate}")
    if not 0 <= args.lose < 1:
        raise ValueError(f"--lose: must be in [0, 1), got {args.lose}")
    if args.from_row < 0:
        raise ValueError(f"--from-row: must be >= 0, got {args.from_row}")
    if args.ca is not None and not args.ca.is_file():
        raise FileNotFoundError(f"--ca: no such file: {args.ca}")
    if not args.log.is_file():
        raise FileNotFoundError(f"no such log: {args.log}")


def received_rows(n_rows: int, from_row: int, lose: float, seed: int) -> np.ndarray:
    """The log rows a monitor attached at `from_row` receives when each row after the first is lost
    with probability `lose`."""
    if from_row >= n_rows:
        raise ValueError(f"--from-row: the log has {n_rows} rows with a G-code line, got {from_row}")
    rows = np.arange(from_row, n_rows)
    keep = np.random.default_rng(seed).random(len(rows)) >= lose
    keep[0] = True
    return rows[keep]


def _chunk_columns(frame, names: list[str], rows: np.ndarray) -> dict:
    part = frame.iloc[rows]
    return {c: [None if v != v else v for v in part[c].tolist()] for c in names}   # NaN (an absent reading): null


def _monitor(args) -> int:
    from gcodefp_core.fileio import write_atomic
    from gcodefp_core.logs import read_log
    from gcodefp_core.schema import TARGET_COLUMN, FeatureColumns
    from gcodefp_core.tokenizer import canonicalize

    from .client import APIError, GCodeAPIClient

    _check(args)
    logging.getLogger("httpx").setLevel(logging.WARNING)   # not a line per request
    try:
        with GCodeAPIClient(args.url, timeout=args.timeout, busy_retries=5,
                            verify=str(args.ca) if args.ca else True) as api:
            features = api.info()["features"]
            run = read_log(args.log, FeatureColumns(tuple(features["continuous"]), tuple(features["categorical"])))
            wanted = set(features["continuous"]) | set(features["categorical"]) | set(features["required_columns"])
            names = [c for c in run.frame.columns if c in wanted]
            logged = [canonicalize(g) for g in run.frame[TARGET_COLUMN]]
            rows = received_rows(len(run.frame), args.from_row, args.lose, args.seed)
            name = run.name.removesuffix("_aligned")
            machine = args.machine or name[:64]
            lines, scored, latencies, posted, t_start = [], [], [], 0, time.perf_counter()
            for lo in range(0, len(rows), args.chunk):
                part = rows[lo:lo + args.chunk]
                if args.rate:   # the machine's cadence: this chunk's last row is due at its place in the stream
                    wait = t_start + (lo + len(part)) / args.rate - time.perf_counter()
                    if wait > 0:
                        time.sleep(wait)
                t0 = time.perf_counter()
                answer = api.stream(machine, columns=_chunk_columns(run.frame, names, part),
                                    start=args.start and lo == 0)
                latencies.append((time.perf_counter() - t0) * 1000)
                base = answer["rows_since_start"] - posted - len(part)   # rows the session had before this monitor
                posted += len(part)
                for p in answer["predictions"]:
                    k = p["row"] - base                        # the k-th row this monitor posted
                    row = int(rows[k])
                    lines.append(json.dumps({"log_row": row, **p, "logged": {
                        "operation": run.operation, "gcode_sequence": logged[row]}}))
                    scored.append((k, p["operation"]["name"] == run.operation, p["gcode_sequence"] == logged[row]))
    except APIError as exc:
        raise ValueError(str(exc)) from None
    text = "\n".join(lines) + "\n" if lines else ""
    if args.output:
        write_atomic(args.output, text)
    else:
        sys.stdout.write(text)
    print(summary(name, machine, len(rows), scored, latencies), file=sys.stderr)
    return 0


def summary(log: str, machine: str, n_rows: int, scored: list, latencies: list) -> str:
    """scored: (k: the k-th row posted, operation right, line right) per answer."""
    def agreement(items) -> str:
        if not items:
            return "no answers"
        ops, lines = np.mean([s[1] for s in items]), np.mean([s[2] for s in items])
        return f"operation {100 * ops:.1f}%, exact line {100 * lines:.1f}%"

    settled = [s for s in scored if s[0] >= SETTLE_ROWS]
    p50, p99 = np.percentile(latencies, [50, 99]) if latencies else (0.0, 0.0)
    return (f"{log} as {machine}: {n_rows} rows posted in {len(latencies)} requests, {len(scored)} answers; "
            f"{agreement(scored)} (from {SETTLE_ROWS} rows after attaching: {agreement(settled)}) against the "
            f"log's labels; request p50 {p50:.1f} ms, p99 {p99:.1f} ms")
