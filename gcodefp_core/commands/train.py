"""`gcodefp train` and `gcodefp evaluate`."""
from __future__ import annotations

import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)


def register(sub) -> None:
    p = sub.add_parser("train", help="train a model (or an ensemble) from a JSON config",
                       description="Train the fingerprinting model. Writes <output>/model_seed<SEED>/checkpoint_best.pt "
                                   "(+ checkpoint_last.pt, metrics.json, wandb/), or with --ensemble N the members "
                                   "<output>/ensemble_model_<i>_seed<SEED+i-1>/ and <output>/ensemble_config.json.")
    p.add_argument("--config", type=Path, required=True, help="JSON config with data/model/train/wandb sections")
    p.add_argument("--output", "-o", type=Path, required=True, help="output folder")
    p.add_argument("--seed", type=int, default=42, help="random seed (default 42)")
    p.add_argument("--ensemble", type=int, metavar="N", help="train N members with seeds SEED .. SEED+N-1")
    p.add_argument("--dataset", type=Path, help="a prebuilt dataset folder (default: build from the config's "
                                                "data section into <output>/dataset)")
    p.add_argument("--resume", action="store_true", help="continue from each run's checkpoint_last.pt")
    p.add_argument("--epochs", type=int, help="override train.epochs")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's own setting)")
    p.add_argument("--sweep-id", metavar="ENTITY/PROJECT/ID",
                   help="take the best run's config of this W&B sweep (needs WANDB_MODE=online)")
    p.set_defaults(handler=_train)

    p = sub.add_parser("evaluate", help="evaluate a checkpoint (or an ensemble) on a split",
                       description="Operation accuracy, token accuracy (teacher-forced and free-running), exact-line "
                                   "match, G-code word accuracy and fingerprint retrieval, overall and per operation.")
    p.add_argument("--checkpoint", type=Path, required=True,
                   help="a checkpoint .pt, a model folder holding checkpoint_best.pt, or an ensemble_config.json "
                        "(or its folder: evaluates the selected member, and with --ensemble the ensemble too)")
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--dataset", type=Path, help="dataset folder (default: the one recorded in the checkpoint)")
    p.add_argument("--output", "-o", type=Path, help="write the report as JSON here")
    p.add_argument("--ensemble", action="store_true", help="also evaluate the ensemble (averaged probabilities)")
    p.add_argument("--beam-width", type=int, default=1, help="free-running decoding: 1 = greedy (default)")
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--max-windows", type=int, help="evaluate an evenly spaced subset of this many windows")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's own setting)")
    p.set_defaults(handler=_evaluate)


def _train(args) -> int:
    import torch

    from gcodefp_core import tracking
    from gcodefp_core.config import TUNABLE_FIELDS, load_config, validate_config
    from gcodefp_core.train import train

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.dataset is not None and not (args.dataset / "manifest.json").is_file():
        raise FileNotFoundError(f"--dataset: not a dataset folder (no manifest.json): {args.dataset}")
    config = load_config(args.config)
    if args.sweep_id:
        sweep_cfg, run_id = tracking.best_sweep_config(args.sweep_id, config.get("wandb"))
        config = tracking.apply_sweep_config(config, sweep_cfg, TUNABLE_FIELDS)
        validate_config(config, f"sweep {args.sweep_id} best run {run_id}")
        print(f"using the config of sweep {args.sweep_id}'s best run {run_id}")
    if args.epochs:
        config.setdefault("train", {})["epochs"] = args.epochs
    result = train(config, args.output, seed=args.seed, ensemble=args.ensemble, dataset_dir=args.dataset,
                   resume=args.resume)
    if args.ensemble:
        print(f"ensemble of {len(result['members'])}: selected {result['selected']} "
              f"({result['selection_metric']}); see {args.output / 'ensemble_config.json'}")
        for m in result["members"]:
            print(f"  {m['name']}: " + "  ".join(f"{k} {v:.4f}" for k, v in m["val_metrics"].items()))
    else:
        print(f"best epoch {result['best_epoch']}/{result['epochs']} in {result['train_seconds']}s, "
              f"{result['parameters']} parameters: {result['run_dir']}/checkpoint_best.pt")
        print("  " + "  ".join(f"{k} {v:.4f}" for k, v in result.items() if k.startswith("val_")))
    return 0


def _resolve_checkpoints(path: Path) -> tuple[list[Path], Path | None]:
    """-> (member checkpoints, selected first; the ensemble_config.json or None)."""
    if path.is_dir():
        if (path / "ensemble_config.json").is_file():
            path = path / "ensemble_config.json"
        elif (path / "checkpoint_best.pt").is_file():
            return [path / "checkpoint_best.pt"], None
        else:
            raise FileNotFoundError(f"--checkpoint: {path} holds neither checkpoint_best.pt nor ensemble_config.json")
    if not path.is_file():
        raise FileNotFoundError(f"--checkpoint: not found: {path}")
    if path.suffix != ".json":
        return [path], None
    try:
        doc = json.loads(path.read_text())
        names = [m["checkpoint"] for m in doc["members"]]
        selected = next(m["checkpoint"] for m in doc["members"] if m["name"] == doc["selected"])
    except (json.JSONDecodeError, KeyError, TypeError, StopIteration):
        raise ValueError(f"{path}: not an ensemble_config.json (needs members[].checkpoint and selected)") from None
    ordered = [selected] + [n for n in names if n != selected]
    return [path.parent / n for n in ordered], path


def _load_dataset_for(ckpt: dict, override: Path | None):
    from gcodefp_core.dataset import load_dataset

    ref = ckpt["dataset"]
    path = override or Path(ref["path"])
    if not (path / "manifest.json").is_file():
        raise FileNotFoundError(f"dataset not found: {path} (recorded in the checkpoint; pass --dataset)")
    ds = load_dataset(path)
    for key, have in (("features", ds.manifest["features"]), ("tokenizer", ds.manifest["tokenizer"]),
                      ("operations", list(ds.operations)), ("window", ds.window)):
        if ref[key] != have:
            raise ValueError(f"dataset {path}: its {key} differ from the checkpoint's; it is not the data the model "
                             "was trained on")
    if ref.get("content_hash") and ref["content_hash"] != ds.manifest.get("content_hash"):
        log.warning("dataset %s: content hash differs from the checkpoint's (same schema, other rows)", path)
    return ds


def _evaluate(args) -> int:
    import torch

    from gcodefp_core.checkpoints import load_checkpoint
    from gcodefp_core.evaluate import evaluate_models, format_table

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.beam_width < 1:
        raise ValueError("--beam-width must be >= 1")
    paths, ensemble_cfg = _resolve_checkpoints(args.checkpoint)
    if args.ensemble and ensemble_cfg is None:
        raise ValueError("--ensemble needs --checkpoint to name an ensemble_config.json (or its folder)")
    loaded = [load_checkpoint(p) for p in (paths if args.ensemble else paths[:1])]
    ds = _load_dataset_for(loaded[0].payload, args.dataset)
    for p, member in zip(paths, loaded):
        if member.bundle.tokenizer != loaded[0].bundle.tokenizer:
            raise ValueError(f"{p}: ensemble members were trained on different vocabularies")
    kw = dict(split=args.split, batch_size=args.batch_size, beam_width=args.beam_width, max_windows=args.max_windows)
    report = {"checkpoint": str(paths[0]), "dataset": str(ds.path), "beam_width": args.beam_width,
              "single": evaluate_models([loaded[0].model], loaded[0].bundle, ds, **kw)}
    print(f"{paths[0]} on {args.split} ({report['single']['overall']['windows']} windows)")
    print(format_table(report["single"]))
    if args.ensemble:
        report["ensemble"] = evaluate_models([m.model for m in loaded], loaded[0].bundle, ds, **kw)
        report["members"] = [str(p) for p in paths]
        print(f"\nensemble of {len(loaded)} (averaged probabilities) on {args.split}")
        print(format_table(report["ensemble"]))
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.output.with_name(args.output.name + ".tmp")
        tmp.write_text(json.dumps(report, indent=1))
        tmp.replace(args.output)
        print(f"report written to {args.output}")
    return 0
