"""Can the side channel alone say WHERE in its program a machine is? A template ("profile") test.

Every operation runs one fixed program and its runs have near-equal length, so the sensor readings
at row offset t should look alike across runs. From the TRAIN runs, per operation, the per-offset
mean of the (normalised, as the model sees them) side-channel features is a template; the last L
received rows are scored against the template segment ending at every (operation, offset) state by
cosine similarity after per-window, per-channel centring and scaling (removes a day's level and
scale; an absent board is 0 after normalisation, so it is flat and adds nothing). One matmul over
the ~4,800 states per judged row.

Parts (val and test runs, every `--every`-th row from row L-1, rows received without loss):
1. localisation: the best state's operation, program, offset (|err| <= 2 rows) and the exact line
   (the most common train line at that offset) for several feature sets and L;
2. board lag: per operation, each run's shift of the boards' vibration (mean RMS channel, smoothed)
   against the operation's registered train template (first and second half of the run). A lag
   that differs between runs means the boards and the controller's rows are not aligned alike;
3. registered localisation: train runs shifted by their lag before averaging, and a test window's
   best offset compared with its row + its own lag (an oracle: the lag of the whole test run). This
   is how sharp the side channel is in "board time";
4. the exact line a perfect board-time localiser reaches when it maps to controller rows with the
   train median lag: the most common train line at offset t + e, e = the run's lag error.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/template_emission.py \
        --dataset artifacts/pipeline-side/dataset [--output results/template_emission.json]
"""
from __future__ import annotations

import argparse
import collections
import json
import time
from pathlib import Path

import numpy as np

from gcodefp_core.fileio import write_json

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = [("motors", None, 64, 2), ("rms", None, 32, 1), ("rms", None, 64, 2), ("rms", None, 128, 4),
           ("all", 8, 64, 2), ("all", 8, 128, 4), ("all", 16, 64, 2)]   # feature set, PCA dims, L, row step
MAX_LAG = 30


class Data:
    def __init__(self, path: Path):
        self.manifest = json.loads((path / "manifest.json").read_text())
        self.x = np.load(path / "rows_continuous.npy")
        self.row_line = np.load(path / "row_line.npy")
        self.features = self.manifest["features"]["continuous"]
        self.operations = self.manifest["operations"]
        self.runs = self.manifest["runs"]
        damaged = {"damageadaptive": "adaptive150025", "damageface": "face150025", "damagepocket": "pocket150025"}
        self.program = {op: damaged.get(op, op) for op in self.operations}   # the tracker's operation_program
        self.rms = [i for i, f in enumerate(self.features) if f.endswith(".RMS")]

    def rows(self, run: dict, cols=None) -> np.ndarray:
        x = self.x[run["first_row"]:run["first_row"] + run["rows"]]
        return x if cols is None else x[:, cols]

    def lines(self, run: dict) -> np.ndarray:
        return self.row_line[run["first_row"]:run["first_row"] + run["rows"]]

    def columns(self, kind: str) -> list[int]:
        return {"motors": [0, 1, 2, 3], "rms": [0, 1, 2, 3] + self.rms, "all": list(range(len(self.features)))}[kind]


def znorm(a: np.ndarray, axis: int) -> np.ndarray:
    a = a - a.mean(axis, keepdims=True)
    return a / np.sqrt(a.var(axis, keepdims=True) + 0.05 ** 2)   # a flat (absent) channel stays ~0


def vibration(data: Data, run: dict) -> np.ndarray:
    """The boards' mean RMS channel (present boards only), smoothed over 5 rows, standardised."""
    x = data.rows(run, data.rms)
    s = x[:, x.std(0) > 0.01].mean(1)
    s = np.convolve(s, np.ones(5) / 5, "same")
    return (s - s.mean()) / (s.std() + 1e-9)


def best_lag(ref: np.ndarray, s: np.ndarray, lo: int, hi: int) -> tuple[int, float]:
    """The shift l maximising corr(ref[lo:hi], s[lo+l:hi+l]) within +-MAX_LAG."""
    best = (0, -2.0)
    for lag in range(-MAX_LAG, MAX_LAG + 1):
        if lo + lag >= 0 and hi + lag <= len(s) and hi <= len(ref):
            c = float(np.corrcoef(ref[lo:hi], s[lo + lag:hi + lag])[0, 1])
            best = max(best, (lag, c), key=lambda v: v[1])
    return best


def board_lags(data: Data) -> dict:
    """Per operation: each run's lag against the registered mean vibration of its train runs
    (registration iterated 3 times from the first train run)."""
    out = {}
    for op in data.operations:
        runs = [r for r in data.runs if r["operation"] == op]
        train = [r for r in runs if r["split"] == "train"]
        n = min(r["rows"] for r in train)
        ref = vibration(data, train[0])[:n]
        for _ in range(3):
            lags = [best_lag(ref, vibration(data, r), 40, n - 40)[0] for r in train]
            med = int(np.median(lags))
            acc, cnt = np.zeros(n), np.zeros(n)
            for r, lag in zip(train, lags):
                s, i = vibration(data, r), np.arange(n) + lag - med
                ok = (i >= 0) & (i < len(s))
                acc[ok] += s[i[ok]]
                cnt[ok] += 1
            ref = acc / np.maximum(cnt, 1)
        per_run = {}
        for r in runs:
            s = vibration(data, r)
            m = min(len(s), n)
            (l1, c1), (l2, c2) = best_lag(ref, s, 40, m // 2), best_lag(ref, s, m // 2, m - 40)
            per_run[r["name"]] = {"split": r["split"], "lag_first_half": l1, "lag_second_half": l2,
                                  "corr": round((c1 + c2) / 2, 3), "corr_at_0": round(float(np.corrcoef(ref[40:m - 40], s[40:m - 40])[0, 1]), 3)}
        lag1 = np.array([v["lag_first_half"] for v in per_run.values()])
        lag2 = np.array([v["lag_second_half"] for v in per_run.values()])
        mad = lambda v: float(1.4826 * np.median(np.abs(v - np.median(v))))
        out[op] = {"runs": per_run, "spread_first_half": mad(lag1), "spread_second_half": mad(lag2),
                   "median_half_difference": float(np.median(np.abs(lag1 - lag2))),
                   "median_corr": float(np.median([v["corr"] for v in per_run.values()])),
                   "median_corr_at_0": float(np.median([v["corr_at_0"] for v in per_run.values()]))}
    return out


def templates(data: Data, cols, basis, lags: dict | None = None) -> tuple[dict, dict]:
    """Per operation: [T, F'] mean over its train runs (each centred; shifted by its lag minus the
    train median when `lags` is given), T the program's longest train run; and per offset the most
    common train line of the program."""
    train = [r for r in data.runs if r["split"] == "train"]
    length = collections.Counter()
    for r in train:
        length[data.program[r["operation"]]] = max(length[data.program[r["operation"]]], r["rows"])
    tpl, line = {}, {}
    for op in data.operations:
        n, mine = length[data.program[op]], [r for r in train if r["operation"] == op]
        med = int(np.median([lags[op]["runs"][r["name"]]["lag_first_half"] for r in mine])) if lags else 0
        acc, cnt = np.zeros((n, len(cols) if basis is None else basis.shape[1])), np.zeros((n, 1))
        for r in mine:
            x = data.rows(r, cols)
            x = x - x.mean(0)
            x = x if basis is None else x @ basis
            i = np.arange(n) + (lags[op]["runs"][r["name"]]["lag_first_half"] - med if lags else 0)
            ok = (i >= 0) & (i < len(x))
            acc[ok] += x[i[ok]]
            cnt[ok] += 1
        tpl[op] = acc / np.maximum(cnt, 1)
        votes = [collections.Counter() for _ in range(n)]
        for r in (q for q in train if data.program[q["operation"]] == data.program[op]):
            for t, v in enumerate(data.lines(r)):
                votes[t][int(v)] += 1
        line[op] = np.array([v.most_common(1)[0][0] if v else -1 for v in votes])
    return tpl, line


def segments(data: Data, tpl: dict, L: int, step: int) -> tuple[np.ndarray, np.ndarray]:
    """[S, (L/step) F'] unit-norm template segments ending at every state (first rows edge-padded)
    and each state's (operation, offset)."""
    segs, states = [], []
    for o, op in enumerate(data.operations):
        t = tpl[op]
        pad = np.concatenate([np.repeat(t[:1], L - 1, 0), t])
        seg = znorm(pad[np.arange(len(t))[:, None] + np.arange(0, L, step)[None, :]], 1).reshape(len(t), -1)
        segs.append(seg / (np.linalg.norm(seg, axis=1, keepdims=True) + 1e-9))
        states += [(o, s) for s in range(len(t))]
    return np.concatenate(segs).astype(np.float32), np.array(states)


def pca_basis(data: Data, cols, dims: int) -> np.ndarray:
    """[len(cols), dims] principal directions of the train rows (each run centred; every 3rd row)."""
    z = np.concatenate([data.rows(r, cols) - data.rows(r, cols).mean(0) for r in data.runs if r["split"] == "train"])
    return np.linalg.svd(z[::3], full_matrices=False)[2][:dims].T


def localise(data: Data, kind: str, dims, L: int, step: int, split: str, every: int, lags: dict | None = None) -> dict:
    cols = data.columns(kind)
    basis = pca_basis(data, cols, dims) if dims else None
    tpl, line = templates(data, cols, basis, lags)
    seg, states = segments(data, tpl, L, step)
    hits, seconds = collections.Counter(), 0.0
    for r in (q for q in data.runs if q["split"] == split):
        x = data.rows(r, cols)
        x = x if basis is None else (x - x.mean(0)) @ basis
        o, y = data.operations.index(r["operation"]), data.lines(r)
        shift = 0
        if lags:   # oracle: the run's own lag relative to its operation's train median
            med = np.median([v["lag_first_half"] for v in lags[r["operation"]]["runs"].values() if v["split"] == "train"])
            shift = int(lags[r["operation"]]["runs"][r["name"]]["lag_first_half"] - med)
        for i in range(L - 1, len(x), every):
            t0 = time.perf_counter()
            w = znorm(x[i - L + 1:i + 1][::-1][::step][::-1], 0).ravel()
            best = int((seg @ (w / (np.linalg.norm(w) + 1e-9)).astype(np.float32)).argmax())
            seconds += time.perf_counter() - t0
            bo, bs = states[best]
            same_program = data.program[data.operations[bo]] == data.program[r["operation"]]
            hits["n"] += 1
            hits["op"] += bo == o
            hits["program"] += same_program
            hits["offset"] += same_program and abs(bs - (i - shift)) <= 2
            hits["exact"] += line[data.operations[bo]][bs] == y[i]
    return {k: hits[k] / hits["n"] for k in ("op", "program", "offset", "exact")} | {
        "dims": int(seg.shape[1]), "states": len(seg), "us_per_row": 1e6 * seconds / hits["n"], "rows": hits["n"]}


def lag_ceiling(data: Data, lags: dict, split: str) -> dict:
    """Exact line from the most common train line at offset t + e: e = 0 (a perfect controller-row
    localiser), fixed e, e = the run's board lag minus the train median (a perfect board-time one),
    and e = the run's own best constant shift of the timeline (an oracle that knows how late it started)."""
    _, line = templates(data, [0], None)
    out = {}
    runs = [r for r in data.runs if r["split"] == split]
    for name in ["0", "2", "5", "10", "board_lag", "best_shift"]:
        hit = n = 0
        for r in runs:
            if name == "best_shift":
                y, ref = data.lines(r), line[r["operation"]]
                e = max(range(-MAX_LAG, MAX_LAG + 1), key=lambda k: (ref[np.clip(np.arange(len(y)) + k, 0, len(ref) - 1)] == y).sum())
            elif name == "board_lag":
                med = np.median([v["lag_first_half"] for v in lags[r["operation"]]["runs"].values() if v["split"] == "train"])
                e = int(lags[r["operation"]]["runs"][r["name"]]["lag_first_half"] - med)
            else:
                e = int(name)
            y, ref = data.lines(r), line[r["operation"]]
            t = np.clip(np.arange(len(y)) + e, 0, len(ref) - 1)
            hit += int((ref[t] == y).sum())
            n += len(y)
        out[name] = hit / n
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", type=Path, required=True)
    ap.add_argument("--every", type=int, default=7, help="judge every k-th row (numpy argmax per row)")
    ap.add_argument("--output", type=Path, default=ROOT / "results/template_emission.json")
    args = ap.parse_args()
    data = Data(args.dataset)
    report = {"localisation": [], "registered_localisation": []}
    print("1. localisation by template (controller row offsets)")
    print(f"{'features':<9}{'pca':>4}{'L':>5}{'step':>5} {'split':<5}{'op':>7}{'program':>9}{'offset':>8}{'exact':>7}{'dims':>6}{'us/row':>8}")
    row = lambda k, p, L, st, sp, r: print(
        f"{k:<9}{p or '-'!s:>4}{L:>5}{st:>5} {sp:<5}" + "".join(f"{100 * r[m]:{w}.1f}" for m, w in
                                                                  (("op", 7), ("program", 9), ("offset", 8), ("exact", 7)))
        + f"{r['dims']:>6}{r['us_per_row']:>8.0f}", flush=True)
    for kind, dims, L, step in CONFIGS:
        for split in ("val", "test"):
            r = localise(data, kind, dims, L, step, split, args.every)
            report["localisation"].append({"features": kind, "pca": dims, "L": L, "step": step, "split": split} | r)
            row(kind, dims, L, step, split, r)
    print("\n2. board lag against the registered train template (rows; spread = 1.48 MAD over the operation's runs)")
    lags = board_lags(data)
    report["board_lags"] = lags
    for op, v in lags.items():
        print(f"{op:<16} spread first half {v['spread_first_half']:5.1f} second half {v['spread_second_half']:5.1f} | "
              f"median |first-second| {v['median_half_difference']:4.1f} | corr at own lag {v['median_corr']:.2f}, at lag 0 {v['median_corr_at_0']:.2f}")
    print("\n3. localisation with lag-registered templates, offset judged in board time (oracle lag per run)")
    for kind, dims, L, step in [("rms", None, 64, 2), ("all", 8, 64, 2)]:
        for split in ("val", "test"):
            r = localise(data, kind, dims, L, step, split, args.every, lags)
            report["registered_localisation"].append({"features": kind, "pca": dims, "L": L, "step": step, "split": split} | r)
            row(kind, dims, L, step, split, r)
    print("\n4. exact line from the most common train line at offset t + e (all rows)")
    report["lag_ceiling"] = {split: lag_ceiling(data, lags, split) for split in ("val", "test")}
    for split, v in report["lag_ceiling"].items():
        print(f"{split:<5}" + "  ".join(f"e={k}: {100 * x:5.1f}" for k, x in v.items()))
    write_json(args.output, report)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
