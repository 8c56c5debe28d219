"""How fast this machine is right now at the kinds of work the server does, to compare runs taken at
different times (benchmarks/serving.py records it beside every run).

    .venv/bin/python benchmarks/machine_speed.py [--package DIR]

This project's benchmarks run on a shared 2-core VM whose speed moves by tens of percent from hour to
hour and between VMs, and not evenly: on 2026-12-02 the bare onnxruntime call was as fast in two
sessions while the server's Python and numpy work cost 30-45% more in the second. So one reference
per kind of work, each the median of several repeats in process CPU time:
- python_loop_ms: a plain Python loop of 1,000,000 additions (the interpreter: HTTP, routing, JSON);
- numpy_small_us: 100 elementwise float32 passes over 5,000 values (the tracker's kind of arithmetic);
- idle_wake_ratio: a short Python loop (~0.1 ms) timed right after 20 ms asleep, over the same loop
  timed back to back (medians): how much slower a core runs work after an idle gap, as a server's
  worker does at a moderate request rate (1.0: no penalty; 1.5-1.9 measured on this VM);
- tracker_update_us (with --package, when it has a program tracker): one filter update moving 4 rows
  on the package's own tracker, as /stream makes for every judged row.
The graph itself is timed by serving.py's `bare` (OnnxPredictor.predict at batch 1).
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")   # as the server runs; before numpy
import numpy as np  # noqa: E402


def _median_cpu(fn, repeats: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.process_time()
        fn()
        times.append(time.process_time() - t0)
    return float(np.median(times))


def _python_loop() -> int:
    total = 0
    for i in range(1_000_000):
        total += i
    return total


def _short_loop() -> float:
    t0 = time.perf_counter()
    total = 0
    for i in range(2000):
        total += i * i
    return time.perf_counter() - t0


def idle_wake_ratio(repeats: int = 100, idle_s: float = 0.02) -> float:
    hot = [_short_loop() for _ in range(repeats)]
    woken = []
    for _ in range(repeats):
        time.sleep(idle_s)
        woken.append(_short_loop())
    return float(np.median(woken) / np.median(hot))


def machine_speed(package: Path | None = None) -> dict:
    a = np.random.default_rng(0).random(5000, dtype=np.float32)
    b = a.copy()

    def numpy_small():
        for _ in range(100):
            np.multiply(a, 0.5, out=b)

    out = {"python_loop_ms": round(_median_cpu(_python_loop) * 1000, 1),
           "numpy_small_us": round(_median_cpu(numpy_small) / 100 * 1e6, 2),
           "idle_wake_ratio": round(idle_wake_ratio(), 2)}
    if package is not None:
        from gcodefp_core.runtime import OnnxPredictor

        tracker = OnnxPredictor.load(package).program_tracker
        if tracker is not None:
            rng = np.random.default_rng(1)
            ops, lines = rng.normal(size=(50, len(tracker.operations))), rng.normal(size=(50, tracker.n_lines)) * 3

            def updates():
                session = tracker.start()
                for i in range(50):
                    session.update(ops[i], lines[i], 1.0, 0, rows=4)

            out["tracker_update_us"] = round(_median_cpu(updates) / 50 * 1e6, 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--package", type=Path, help="a package folder: also time its tracker's update")
    print(json.dumps(machine_speed(ap.parse_args().package)))


if __name__ == "__main__":
    main()
