"""Does the drift score (api/monitoring.py) rise on a run from another recording day and stay flat on a
normal one? Real runs of one program (pocket150025 by default), read in place.

The reference normalisation is fitted, as a package's is, on "training" runs: runs of the program
that share one board set (a run records 6 to 12 of 16 boards, and which ones tracks its recording
day). Then each test run's windows go through a DriftMonitor the way served windows do:
- normal:  a held-out run with the same board set (same session);
- shifted: a run of the same program with another board set (another session);
- unusual: pocket150025_006, whose spindle current runs 1.1 standard deviations above the others.
Per run: the final drift score per board and its mean over the boards both sides have. Prints a
table and writes results/drift.json.

    python benchmarks/drift.py [--data ../shared/data/cnc-sensor-logs] [--stride 8]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from api.monitoring import DriftMonitor  # noqa: E402
from gcodefp_core.features import FeatureSpec  # noqa: E402
from gcodefp_core.logs import read_log  # noqa: E402
from gcodefp_core.schema import feature_columns  # noqa: E402

TRAIN = ["pocket150025_005", "pocket150025_008", "pocket150025_009", "pocket150025_011", "pocket150025_012"]
RUNS = {"normal (same session, held out)": "pocket150025_013",
        "shifted (another session)": "pocket150025_002",
        "shifted (another session, 2)": "pocket150025_004",
        "unusual spindle current": "pocket150025_006"}


def windows(cont: np.ndarray, window: int, stride: int) -> np.ndarray:
    starts = range(0, len(cont) - window + 1, stride)
    return np.stack([cont[s:s + window] for s in starts])


def drift_of(spec: FeatureSpec, cont: np.ndarray, window: int, stride: int, half_life: float):
    mon = DriftMonitor(spec, half_life=half_life)
    trace = []
    for w in windows(cont, window, stride):
        mon.observe(w[None])
        trace.append(max(mon.scores("channel").values()))
    return mon.scores("board"), mon.scores("channel"), trace


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "cnc-sensor-logs"))
    ap.add_argument("--window", type=int, default=64)
    ap.add_argument("--stride", type=int, default=8)
    ap.add_argument("--half-life", type=float, default=256.0)
    ap.add_argument("--out", default=str(REPO / "results" / "drift.json"))
    args = ap.parse_args(argv)
    data = Path(args.data)
    cols = feature_columns("side_channel")
    path = {p.name.split("_aligned")[0]: p for p in data.glob("*.csv.gz")}
    train = [read_log(path[r], cols) for r in TRAIN]
    spec = FeatureSpec.for_columns("side_channel", cols).fit([t.frame for t in train])
    rows = []
    for label, run in RUNS.items():
        log = read_log(path[run], cols)
        cont, _ = spec.raw_matrix(log.frame)
        boards, channels, trace = drift_of(spec, cont, args.window, args.stride, args.half_life)
        rows.append({"label": label, "run": run, "boards": len(log.boards_present), "windows": len(trace),
                     "board_mean": float(np.mean(list(boards.values()))),
                     "max_board": max(boards.items(), key=lambda x: x[1]),
                     "max_channel": max(channels.items(), key=lambda x: x[1]),
                     "gyro": float(np.mean([channels[k] for k in ("Gx", "Gy", "Gz")])),
                     "current": channels.get("current"), "board_scores": boards, "channel_scores": channels,
                     "max_channel_trace_q10_50_90": [float(np.quantile(trace, q)) for q in (0.1, 0.5, 0.9)]})
    print(f"reference: {', '.join(TRAIN)} ({len(spec.continuous)} inputs, window {args.window}, "
          f"stride {args.stride}, half-life {args.half_life:g} windows)")
    print(f"{'run':<52}{'windows':>8}{'boards mean':>12}{'gyro G*':>9}{'current':>9}  worst board / channel kind")
    for r in rows:
        print(f"{r['label'] + ' ' + r['run']:<52}{r['windows']:>8}{r['board_mean']:>12.2f}{r['gyro']:>9.2f}"
              f"{r['current']:>9.2f}  {r['max_board'][0]} {r['max_board'][1]:.2f} / "
              f"{r['max_channel'][0]} {r['max_channel'][1]:.2f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps({"train": TRAIN, "args": vars(args), "runs": rows}, indent=1))
    os.replace(tmp, out)
    return {r["run"]: r for r in rows}


if __name__ == "__main__":
    main()
