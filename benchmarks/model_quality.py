"""Model quality on unseen runs: train both feature sets over 3 seeds on the real data, evaluate on
the test split (by run, stride 1), print per-operation tables (mean and spread over seeds), the
3-seed ensemble against the best single member, and an ablation of the side-channel inputs.

    .venv/bin/python benchmarks/model_quality.py [--configs configs/production.json configs/side_channel.json]
        [--seeds 42 43 44] [--jobs 2] [--device cpu] [--ablation] [--latency] [--checkpoints NAME=A.pt,B.pt,C.pt]
        [--dataset production=DIR ...] [--work artifacts/model-quality] [--output results/model_quality.json]

Training runs as `gcodefp train` subprocesses (--jobs at a time). --dataset NAME=DIR reuses a
prebuilt dataset for the config named NAME (its file stem); otherwise each config's data section is
built into <work>/<name>/dataset. --checkpoints NAME=... evaluates checkpoints trained elsewhere (on
a GPU, say) for the config NAME instead of training it. The ablation drops one channel group at a time from the
side-channel dataset (one seed); dropping columns from a built dataset equals rebuilding without
them, because every column is normalised on its own. --latency exports the best member and the
ensemble's members to ONNX and times the batch-1 line prediction on this machine.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import shutil
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
METRICS = ("op_acc", "exact_match", "word_acc", "token_acc_tf", "decoder_exact_match", "fingerprint_nn_acc")
ABLATIONS = {  # group -> (board channel kinds, single columns) dropped from the side-channel inputs
    "(nothing)": ((), ()),
    "motor currents": ((), ("spindle", "x_motor", "y_motor", "z_motor")),
    "accelerometers (A*)": (("Ax", "Ay", "Az"), ()),
    "gyroscopes (G*)": (("Gx", "Gy", "Gz"), ()),
    "magnetometers (M*)": (("Mx", "My", "Mz"), ()),
    "vibration RMS": (("RMS",), ()),
    "all sensor boards": (("Ax", "Ay", "Az", "Gx", "Gy", "Gz", "Mx", "My", "Mz", "RMS"), ()),
}


def subset_dataset(src: Path, dst: Path, kinds: tuple[str, ...], columns: tuple[str, ...]) -> Path:
    """A copy of a built dataset without some continuous columns (board channel kinds or names)."""
    manifest = json.loads((src / "manifest.json").read_text())
    feats = manifest["features"]
    keep = [i for i, c in enumerate(feats["continuous"]) if c not in columns and c.rsplit(".", 1)[-1] not in kinds]
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("rows_continuous.npy"))
    np.save(dst / "rows_continuous.npy", np.load(src / "rows_continuous.npy")[:, keep])
    for key in ("continuous", "mean", "std"):
        feats[key] = [feats[key][i] for i in keep]
    manifest["content_hash"] = f"{manifest['content_hash']}-minus-{len(feats['continuous'])}"
    (dst / "manifest.json").write_text(json.dumps(manifest))
    return dst


def train_job(config: Path, dataset: Path, out: Path, seed: int, device: str, threads: int, overrides: dict) -> Path:
    cfg = json.loads(config.read_text())
    cfg["train"] = {**cfg.get("train", {}), "device": device, **overrides}
    cfg["wandb"] = {"mode": "disabled"}
    out.mkdir(parents=True, exist_ok=True)
    run_cfg = out / f"config_seed{seed}.json"
    run_cfg.write_text(json.dumps(cfg))
    log = out / f"train_seed{seed}.log"
    cmd = [sys.executable, "-m", "gcodefp_core.cli", "train", "--config", str(run_cfg), "--output", str(out),
           "--dataset", str(dataset), "--seed", str(seed), "--threads", str(threads)]
    with log.open("w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT).returncode
    if rc:
        raise RuntimeError(f"training {out} seed {seed} failed; see {log}")
    return out / f"model_seed{seed}" / "checkpoint_best.pt"


def evaluate(checkpoints: list[Path], dataset: Path) -> dict:
    import torch

    from gcodefp_core.checkpoints import load_checkpoint
    from gcodefp_core.dataset import load_dataset
    from gcodefp_core.evaluate import evaluate_models

    torch.set_num_threads(1)
    loaded = [load_checkpoint(c) for c in checkpoints]
    report = evaluate_models([c.model for c in loaded], loaded[0].bundle, load_dataset(dataset), "test")
    out = {"overall": report["overall"], "per_operation": report["per_operation"]}
    if "stream" in report:  # streaming mode (gcodefp_core.runtime.clock; see benchmarks/streaming.py)
        out["stream"] = report["stream"]
    return out


def latency(checkpoints: list[Path], work: Path, dataset: Path, repeats: int = 2000) -> dict:
    """Batch-1 median latency (ms) of the exported line prediction: one member, and all members' predict
    graphs run one after another (the ensemble's cost; averaging their outputs is negligible next to
    the graph calls, so only the operation scores are averaged here)."""
    from gcodefp_core.benchmark import time_calls
    from gcodefp_core.dataset import load_dataset
    from gcodefp_core.export import export_checkpoint
    from gcodefp_core.runtime import OnnxPredictor

    preds = []
    for i, ck in enumerate(checkpoints):
        export_checkpoint(ck, work / f"onnx_{i}" / "model.onnx", dataset=dataset, verify_windows=256)
        preds.append(OnnxPredictor.load(work / f"onnx_{i}"))
    ds = load_dataset(dataset)
    b = ds.batch(ds.split_windows("test")[:1])
    c, k = b["continuous"], b["categorical"]

    def timed(fn) -> float:
        return 1000 * float(np.median(time_calls(fn, warmup=50, iterations=repeats)))

    def ensemble():
        outs = [p.sessions["predict"].run(None, {"continuous": c, "categorical": k}) for p in preds]
        return np.mean([o[2] for o in outs], axis=0)

    return {"single_ms": timed(lambda: preds[0].predict_lines(c, k)), "ensemble_ms": timed(ensemble),
            "members": len(preds)}


def fmt_table(title: str, stats: dict) -> str:
    lines = [title, f"{'operation':<16}" + "".join(f"{m:>24}" for m in METRICS)]
    for row, vals in stats.items():
        cells = "".join(f"{100 * v[0]:>10.2f} [{100 * v[1]:5.1f}-{100 * v[2]:5.1f}]" if v else f"{'':>24}"
                        for v in (vals.get(m) for m in METRICS))
        lines.append(f"{row:<16}{cells}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", nargs="+", type=Path,
                    default=[ROOT / "configs/production.json", ROOT / "configs/side_channel.json"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[42, 43, 44])
    ap.add_argument("--jobs", type=int, default=1, help="trainings at a time")
    ap.add_argument("--threads", type=int, default=None, help="torch threads per training (default: 2 // jobs, min 1)")
    ap.add_argument("--device", default="cpu", help="where training steps run (cpu, cuda)")
    ap.add_argument("--dataset", action="append", default=[], metavar="NAME=DIR", help="prebuilt dataset for a config")
    ap.add_argument("--ablation", action="store_true", help="also train the side-channel ablation (one seed)")
    ap.add_argument("--ablation-epochs", type=int, default=None)
    ap.add_argument("--ablation-only", action="store_true", help="skip the multi-seed runs")
    ap.add_argument("--latency", action="store_true", help="export and time the best member and the ensemble")
    ap.add_argument("--checkpoints", action="append", default=[], metavar="NAME=A.pt,B.pt,C.pt",
                    help="evaluate these checkpoints (one per --seeds entry) for the config NAME instead of training it")
    ap.add_argument("--work", type=Path, default=ROOT / "artifacts/model-quality")
    ap.add_argument("--output", type=Path, default=ROOT / "results/model_quality.json")
    args = ap.parse_args()
    threads = args.threads or max(1, 2 // args.jobs)
    prebuilt = dict(d.split("=", 1) for d in args.dataset)
    t_start = time.perf_counter()

    from gcodefp_core.config import load_config
    from gcodefp_core.evaluate import seed_spread
    from gcodefp_core.train import prepare_dataset

    datasets = {}
    for config in args.configs:
        name = config.stem
        if name in prebuilt:
            datasets[name] = Path(prebuilt[name])
        else:
            datasets[name] = Path(prepare_dataset(load_config(config), args.work / name).path)
    given = {name: [Path(p) for p in paths.split(",")] for name, paths in (c.split("=", 1) for c in args.checkpoints)}
    for name, paths in given.items():
        if len(paths) != len(args.seeds):
            raise SystemExit(f"--checkpoints {name}: {len(paths)} checkpoints for {len(args.seeds)} seeds")
    jobs = [] if args.ablation_only else [(c, datasets[c.stem], args.work / c.stem, s, {})
                                          for c in args.configs for s in args.seeds if c.stem not in given]
    side = next((c for c in args.configs if json.loads(c.read_text())["data"].get("feature_set") == "side_channel"), None)
    if args.ablation and side is not None:
        over = {"epochs": args.ablation_epochs} if args.ablation_epochs else {}
        over["val_max_windows"] = 3000  # a cheaper per-epoch check: the ablation compares, it does not ship
        for group, (kinds, cols) in ABLATIONS.items():
            slug = "ablation-" + (group.split(" (")[0].replace(" ", "-") if group != "(nothing)" else "none")
            ds = subset_dataset(datasets[side.stem], args.work / slug / "dataset", kinds, cols)
            jobs.append((side, ds, args.work / slug, args.seeds[0], over))
    with ThreadPoolExecutor(args.jobs) as pool:
        ckpts = list(pool.map(lambda j: train_job(j[0], j[1], j[2], j[3], args.device, threads, j[4]), jobs))
    train_seconds = time.perf_counter() - t_start
    members_of = {c.stem: given.get(c.stem) or [ck for (cfg, _, out, _, _), ck in zip(jobs, ckpts)
                                                 if cfg == c and "ablation" not in str(out)] for c in args.configs}

    # Evaluate every checkpoint (and each ensemble) in separate processes (decoding is Python-bound).
    eval_jobs = {}
    for config in [] if args.ablation_only else args.configs:
        members = members_of[config.stem]
        for s, ck in zip(args.seeds, members):
            eval_jobs[(config.stem, f"seed{s}")] = ([ck], datasets[config.stem])
        eval_jobs[(config.stem, "ensemble")] = (members, datasets[config.stem])
    for (c, ds, out, s, o), ck in zip(jobs, ckpts):
        if "ablation" in str(out):
            eval_jobs[("ablation", out.name)] = ([ck], ds)
    ctx = multiprocessing.get_context("spawn")  # torch is imported here already: never fork it
    with ProcessPoolExecutor(max(1, min(len(eval_jobs), args.jobs * 2)), mp_context=ctx) as pool:
        futures = {k: pool.submit(evaluate, *v) for k, v in eval_jobs.items()}
        reports = {k: f.result() for k, f in futures.items()}

    import torch

    results = {"seeds": args.seeds, "device": args.device, "train_seconds": round(train_seconds), "feature_sets": {}}
    for config in [] if args.ablation_only else args.configs:
        name = config.stem
        singles = [reports[(name, f"seed{s}")] for s in args.seeds]
        members = members_of[name]
        val = [torch.load(ck, weights_only=True)["metrics"]["val_score"] for ck in members]
        best = int(np.argmax(val))
        entry = {"config": str(config), "checkpoints": [str(m) for m in members],
                 "spread": seed_spread(singles, METRICS), "singles": singles,
                 "ensemble": reports[(name, "ensemble")], "best_member": {"seed": args.seeds[best], **singles[best]}}
        if args.latency:
            entry["latency"] = latency(members, args.work / name, datasets[name])
        results["feature_sets"][name] = entry
        print(fmt_table(f"\n== {name}: test split, mean [min-max] over seeds {args.seeds} (%)", entry["spread"]))
        if all("stream" in r for r in singles):
            entry["stream_spread"] = seed_spread([r["stream"] for r in singles], METRICS)
            print(fmt_table("streaming mode (each run followed from its start), mean [min-max] (%)",
                            entry["stream_spread"]))
        ens, one = entry["ensemble"]["overall"], entry["best_member"]
        print(f"ensemble of {len(members)} vs best member (seed {one['seed']}, by validation score):")
        for m in METRICS:
            if m in ens:
                print(f"  {m:<22} ensemble {100 * ens[m]:6.2f}   best member {100 * one['overall'][m]:6.2f}")
        if "latency" in entry:
            print(f"  batch-1 line prediction (ONNX fp32, median): member {entry['latency']['single_ms']:.3f} ms, "
                  f"ensemble {entry['latency']['ensemble_ms']:.3f} ms")
    abl = {k[1]: v for k, v in reports.items() if k[0] == "ablation"}
    if abl:
        results["ablation"] = {"seed": args.seeds[0], "epochs": args.ablation_epochs, "groups": abl}
        cols = ("op_acc", "exact_match", "word_acc", "token_acc_tf")
        print(f"\n== side-channel ablation (seed {args.seeds[0]}; test split, %)")
        print(f"{'dropped':<28}" + "".join(f"{c:>14}" for c in cols))
        for name, rep in abl.items():
            print(f"{name:<28}" + "".join(f"{100 * rep['overall'][c]:>14.2f}" for c in cols))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=1))
    print(f"\nwrote {args.output} ({round(time.perf_counter() - t_start)} s)")


if __name__ == "__main__":
    main()
