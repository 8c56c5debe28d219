"""What a caller of `gcodefp serve` gets, measured end to end on loopback.

    python benchmarks/serving.py --registry artifacts/registry [--workers 1 2] [--quick]

It copies the registry, starts `gcodefp serve` itself (for each --workers value) and measures:
- open-loop rate sweeps (latency counted from each request's due time) for /predict with the JSON
  body (the package's sample_request.json), /predict with the binary body, /batch_predict (JSON,
  --batch windows) and /stream (machines posting --stream-rows rows once a second, each on its own
  connection); a sweep stops at the first rate the server cannot keep up with;
- a closed-loop concurrency sweep for the JSON and binary bodies;
- a hot swap (a promotion to the same graphs under a new version) in the middle of --swap-rate;
- with --tokens, a server that asks for client tokens (api/auth.py), every request carrying one;
- per step: p50/p90/p95/p99, errors, the server-side split (parse, normalise, queue, inference, per
  request, from /metrics), windows per graph call, resident memory of each worker after the step;
- the bare graph at batch 1 in this process, beside the server's inference time at low load, and the
  two in alternating rounds (the ratio the bar is judged by).
Writes results/serving.json (+ one file per worker count) and results/serving.png, prints a table.
The machine's speed at the start and at the end of the run (benchmarks/machine_speed.py) is recorded
beside the figures: compare runs of different hours through it.
The server runs with its defaults (access log at INFO, to a file). The load generator
(benchmarks/http_load.py) runs on the same cores as the server. Bounded: every
step lasts --duration seconds (default 6), sweeps have fixed lists of rates.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
import http_load  # noqa: E402
import machine_speed  # noqa: E402
import serving_report  # noqa: E402

RATES = {"json": [100, 200, 300, 400, 600, 800, 1000, 1200], "binary": [200, 400, 800, 1200, 1600, 2000],
         "batch": [25, 50, 100, 200], "stream": [100, 250, 500, 750, 1000, 1500]}
QUICK = {"json": [50, 100], "binary": [100], "batch": [20], "stream": [20]}
CONCURRENCY, QUICK_CONCURRENCY = [1, 4, 16, 64], [2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, registry: Path, workers: int, log_path: Path, tokens: Path | None = None):
        self.port = free_port()
        self.log = open(log_path, "wb")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("GCODEFP_", "PROMETHEUS_"))}
        # the server's defaults (INFO: one JSON access-log line per request, here to the log file), as a user runs it
        env.update(PYTHONPATH=str(REPO))
        env.update({k: v for k, v in os.environ.items() if k.startswith(("GCODEFP_BATCH", "GCODEFP_STREAM", "GCODEFP_SOCKET", "GCODEFP_HEAP"))})
        if tokens is not None:   # client tokens asked for (api/auth.py): every request below carries one
            env["GCODEFP_API_TOKENS_FILE"] = str(tokens)
        self.proc = subprocess.Popen([sys.executable, "-m", "gcodefp_core.cli", "serve", "--registry", str(registry),
                                      "--workers", str(workers), "--port", str(self.port), "--poll-seconds", "0.5"],
                                     env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self.workers = workers
        import httpx

        for _ in range(1200):
            try:
                if httpx.get(self.url("/ready"), timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited; see {log_path}")
            time.sleep(0.1)
        else:
            raise RuntimeError(f"server not ready in 120 s; see {log_path}")
        time.sleep(0.5 * workers)  # every worker loads its own copy; /ready answered by one

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def worker_pids(self) -> list[int]:
        if self.workers == 1:
            return [self.proc.pid]
        out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(self.proc.pid)], capture_output=True, text=True).stdout
        return [int(p) for p in out.split()
                if "onnxruntime" in Path(f"/proc/{p}/maps").read_text(errors="ignore")]

    def rss_mb(self) -> list[float]:
        out = []
        for pid in self.worker_pids():
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    out.append(round(int(line.split()[1]) / 1024, 1))
        return out

    def cpu_by_worker(self) -> dict[int, float]:
        """User + system CPU seconds of each worker so far (a measure less sensitive to a busy machine)."""
        out = {}
        for pid in self.worker_pids():
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            out[pid] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime (proc(5) 14, 15)
        return out

    def cpu_seconds(self) -> float:
        return sum(self.cpu_by_worker().values())

    def metrics(self) -> str:
        import httpx

        return httpx.get(self.url("/metrics"), timeout=10).text

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def bodies(package: Path, batch: int, stream_rows: int, headers: dict | None = None) -> dict:
    """The request bytes of each mode, from the package's own sample request (headers: on every request)."""
    sample = json.loads((package / "sample_request.json").read_text())["sensor_data"]
    cont, cat = np.asarray(sample["continuous"], np.float64), np.asarray(sample["categorical"], np.float64)
    binary = np.concatenate([cont, cat], axis=1).astype("<f4").tobytes()
    headers = headers or {}
    out = {"json": http_load.request_bytes("/predict", json.dumps({"sensor_data": sample}).encode(), headers=headers),
           "binary": http_load.request_bytes("/predict", binary, "application/octet-stream", headers=headers),
           "batch": http_load.request_bytes("/batch_predict", json.dumps({"windows": [sample] * batch}).encode(),
                                            headers=headers)}
    w = len(cont)

    def rows(a: int, b: int, start: bool = False) -> bytes:
        idx = np.arange(a, b) % w
        return json.dumps({"sensor_data": {"continuous": cont[idx].tolist(), "categorical": cat[idx].tolist()},
                           "start": start}).encode()

    chunks = [rows(k * stream_rows, (k + 1) * stream_rows) for k in range(w)]  # cycle through the sample's rows
    # A machine's first chunk: with a program tracker every row is answered from the first, so a monitor
    # just starts posting; the row clock answers from row W-1 on, so the machine primes a window first.
    tracked = bool(json.loads((package / "model.json").read_text()).get("program_tracker"))
    first = rows(0, stream_rows, True) if tracked else rows(0, w - 1, True)
    out["stream_first"] = lambda i: http_load.request_bytes(f"/stream/m{i}", first, headers=headers)
    keys = itertools.count()   # a key per chunk, as api.client sends (a retry would reuse it)
    out["stream_chunk"] = lambda i, k: http_load.request_bytes(f"/stream/m{i}", chunks[k % w],
                                                               headers=headers | {"Idempotency-Key": f"c{next(keys)}"})
    return out


def bare_graph(package: Path, iterations: int = 300) -> dict:
    """Batch-1 timings in this process: the predict graph alone, and what the server's model call does."""
    from api import json_windows
    from api.inputs import model_inputs, parse_sensor_data
    from gcodefp_core.runtime import OnnxPredictor

    pred = OnnxPredictor.load(package)
    sample = json.loads((package / "sample_request.json").read_text())["sensor_data"]
    cont, cat = parse_sensor_data(sample, pred.features, pred.window)
    c, k = model_inputs(pred.features, cont[None], cat[None])
    sess = pred.sessions["predict"] if "predict" in pred.sessions else pred.sessions["encoder"]
    feeds = {i.name: (c if i.name == "continuous" else k) for i in sess.get_inputs()}

    def p50(fn) -> float:
        for _ in range(20):
            fn()
        ts = []
        for _ in range(iterations):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return round(float(np.median(ts)) * 1000, 4)

    def p50_after(pre) -> float:
        """predict alone, timed after `pre` ran (what a server does between two calls)."""
        ts = []
        for i in range(iterations + 20):
            pre()
            t0 = time.perf_counter()
            pred.predict(c, k)
            ts.append(time.perf_counter() - t0)
        return round(float(np.median(ts[20:])) * 1000, 4)

    body = json.dumps({"sensor_data": sample}).encode()

    def parse():   # the server's JSON path: read the body, normalise it
        got = json_windows.read_windows(body, {"sensor_data"}, pred.window, cont.shape[1], cat.shape[1])
        model_inputs(pred.features, got[1], got[2])

    # Why a served batch-1 call is slower than this tight loop: the same call after the request's own
    # parse, and after 1 ms idle (a closed-loop client's round trip), each measured here.
    return {"graph_run_ms": p50(lambda: sess.run(None, feeds)), "predict_ms": p50(lambda: pred.predict(c, k)),
            "normalise_ms": p50(lambda: model_inputs(pred.features, cont[None], cat[None])),
            "predict_after_parse_ms": p50_after(parse), "predict_after_1ms_idle_ms": p50_after(lambda: time.sleep(0.001)),
            "variant": pred.variant}


def paired_inference(server: Server, package: Path, req: dict, rounds: int = 5) -> dict:
    """The server's inference at batch 1 against the bare predict, timed in alternating rounds (bare
    loop, then one client back to back for 1.5 s): this shared machine's speed drifts by tens of
    percent within minutes, and a ratio of two figures taken minutes apart measured that drift."""
    out = []
    for _ in range(rounds):
        bare = bare_graph(package, iterations=150)["predict_ms"]
        _, tally = http_load.run(http_load.closed_loop(server.port, req["json"], 1, 1.5))
        times = [t for t in (json.loads(b).get("inference_time_ms") for b in tally.bodies[:500]) if t is not None]
        served = round(float(np.median(times)), 4) if times else float("nan")
        out.append({"bare_predict_ms": bare, "server_inference_ms": served, "ratio": round(served / bare, 3)})
    ratio = float(np.median([r["ratio"] for r in out]))
    print(f"paired inference at batch 1: ratio server / bare per round {[r['ratio'] for r in out]}, median {ratio:.3f}",
          flush=True)
    return {"rounds": out, "ratio_median": round(ratio, 3)}


def measure(server: Server, name: str, fn) -> dict:
    before, cpu = serving_report.scrape(server.metrics()), server.cpu_by_worker()
    summary, tally = http_load.run(fn())
    spent = {pid: t - cpu.get(pid, 0.0) for pid, t in server.cpu_by_worker().items()}
    summary["server_cpu_ms_per_request"] = round(sum(spent.values()) * 1000 / max(summary["requests"], 1), 3)
    # how evenly the work spread: each worker's share of the step's server CPU (a replaced worker counts from 0)
    summary["server_cpu_share_per_worker"] = [round(t / max(sum(spent.values()), 1e-9), 3) for t in spent.values()]
    summary["server"] = serving_report.split(before, serving_report.scrape(server.metrics()))
    summary["rss_mb_per_worker"] = server.rss_mb()  # after the step: /stream sessions accumulate over a sweep
    if "machines" in summary:   # the sessions all workers hold: one per machine (reconnects are handed over)
        held = [ln for ln in server.metrics().splitlines() if ln.startswith("gcodefp_stream_sessions ")]
        summary["stream_sessions"] = int(float(held[0].split()[-1])) if held else None
    times = [json.loads(b).get("inference_time_ms") for b in tally.bodies[:500]]
    times = [t for t in times if t is not None]
    if times:
        summary["response_inference_ms_p50"] = round(float(np.median(times)), 4)
    print(serving_report.line(name, summary), flush=True)
    return summary


def sweep(server: Server, mode: str, rates: list, duration: float, req: dict) -> list[dict]:
    steps = []
    for rate in rates:
        if mode == "stream":
            fn = lambda r=rate: http_load.stream_machines(server.port, r, req["stream_first"], req["stream_chunk"],
                                                          duration)
        else:
            fn = lambda r=rate: http_load.open_loop(server.port, req[mode], r, duration)
        s = measure(server, f"{mode} @{rate}", fn)
        s["load_average"] = os.getloadavg()[0]
        steps.append(s)
        if s["achieved_rate"] < 0.9 * rate or s["p99_ms"] > 1000:
            break  # saturated: higher rates only queue longer
    return steps


def run_workers(reg: Path, workers: int, args, req: dict, work: Path, tokens: Path | None = None) -> dict:
    from gcodefp_core import package as pkg

    server = Server(reg, workers, work / f"server-w{workers}.log", tokens)
    out: dict = {"workers": workers, "sweeps": {}, "concurrency": {}}
    try:
        http_load.run(http_load.open_loop(server.port, req["json"], 50, 2))  # warm-up
        for mode in args.modes:
            out["sweeps"][mode] = sweep(server, mode, (QUICK if args.quick else RATES)[mode], args.duration, req)
        for mode in [m for m in ("json", "binary") if m in args.modes]:
            out["concurrency"][mode] = [measure(server, f"{mode} c={c}", lambda c=c: http_load.closed_loop(
                server.port, req[mode], c, args.duration)) for c in (QUICK_CONCURRENCY if args.quick else CONCURRENCY)]
        # one request at a time, back to back: every call is batch 1 and the server stays warm (as the
        # bare loop does; on a shared machine, a call after an idle gap can take 2-3x longer, cold caches)
        out["low_load"] = measure(server, "json c=1 (inference at batch 1)",
                                  lambda: http_load.closed_loop(server.port, req["json"], 1, min(args.duration, 3)))
        out["paired_inference"] = paired_inference(server, pkg.current_package(reg), req, 2 if args.quick else 5)
        if args.swap_rate:
            current = pkg.current_version(reg)
            new = f"{current}-swap{workers}"
            pkg.build_package(reg / "packages" / current / "model.json", reg, version=new)
            s = measure(server, f"json @{args.swap_rate} + hot swap", lambda: http_load.open_loop(
                server.port, req["json"], args.swap_rate, max(args.duration, 8), at_half=lambda: pkg.promote(reg, new)))
            out["swap"] = s | {"to": new, "load_average": os.getloadavg()[0]}
        out["rss_mb_per_worker"] = server.rss_mb()
    finally:
        server.stop()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--registry", type=Path, required=True, help="the pipeline's registry (copied, not modified)")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--modes", nargs="+", default=["json", "binary", "batch", "stream"],
                    choices=["json", "binary", "batch", "stream"])
    ap.add_argument("--duration", type=float, default=6.0, help="seconds per step (<= 60)")
    ap.add_argument("--batch", type=int, default=8, help="windows per /batch_predict request")
    ap.add_argument("--stream-rows", type=int, default=4, help="rows per /stream chunk, one chunk per second")
    ap.add_argument("--swap-rate", type=float, default=800.0, help="rate of the hot-swap run (0: none)")
    ap.add_argument("--quick", action="store_true", help="a few low rates only (a smoke run)")
    ap.add_argument("--tokens", action="store_true",
                    help="serve with a client tokens file (GCODEFP_API_TOKENS_FILE); every request sends the token")
    ap.add_argument("--output", type=Path, default=REPO / "results" / "serving.json")
    args = ap.parse_args()
    if not 0 < args.duration <= 60:
        ap.error("--duration: 0 < seconds <= 60")
    from gcodefp_core import package as pkg

    work = Path(tempfile.mkdtemp(prefix="gcodefp-serving-"))
    try:
        reg = shutil.copytree(args.registry, work / "registry")
        package = pkg.current_package(reg)
        tokens, headers = None, None
        if args.tokens:   # one token for the load, limited to the machines it streams (m0, m1, ...)
            from api import auth
            tokens = work / "api_tokens"
            headers = {"Authorization": f"Bearer {auth.add(tokens, 'serving-bench', ['m*'])}"}
        req = bodies(package, args.batch, args.stream_rows, headers)
        result = {"registry": str(args.registry), "package": package.name, "date": time.strftime("%Y-%m-%d %H:%M"),
                  "client_tokens": bool(args.tokens),
                  "cpu_count": os.cpu_count(), "load_average_start": os.getloadavg()[0],
                  "machine_start": machine_speed.machine_speed(package), "bare": bare_graph(package), "runs": []}
        print(f"package {package.name}: bare graph {result['bare']}; machine {result['machine_start']}", flush=True)
        for workers in args.workers:
            run = run_workers(reg, workers, args, req, work, tokens)
            result["runs"].append(run)
            args.output.parent.mkdir(parents=True, exist_ok=True)
            serving_report.write_json(args.output.with_name(f"{args.output.stem}_w{workers}.json"), run)
        result["machine_end"] = machine_speed.machine_speed(package)   # the VM's speed drifts: both ends of the run
        result["bars"] = serving_report.bars(result)
        serving_report.write_json(args.output, result)
        serving_report.plot(result, args.output.with_suffix(".png"))
        print(serving_report.table(result))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
