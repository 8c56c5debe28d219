"""`gcodefp synth` and `gcodefp build-dataset`."""
from __future__ import annotations

import json
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("synth", help="write synthetic sensor logs (the embedded default data)",
                       description="Write synthetic CNC sensor logs in the real logs' CSV schema.")
    p.add_argument("--output", "-o", type=Path, required=True, help="folder for the *_aligned.csv.gz files")
    p.add_argument("--runs-per-op", type=int, default=4, help="runs per operation class (default 4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--machine-id", type=int, default=0, help="simulated machine (its signature)")
    p.set_defaults(handler=_synth)

    p = sub.add_parser("build-dataset", help="build the windowed training dataset from logs",
                       description="Build the dataset artifact (arrays + manifest.json) from a folder of logs "
                                   "or from synthetic logs.")
    p.add_argument("--output", "-o", type=Path, required=True, help="dataset folder (replaced atomically)")
    p.add_argument("--config", type=Path, help='JSON config: its "data" section (or the whole file) '
                                               "holds DatasetConfig fields")
    p.add_argument("--source", help='"synthetic" or a folder of logs (overrides the config)')
    p.add_argument("--feature-set", choices=["full", "side_channel"])
    p.add_argument("--window", type=int)
    p.add_argument("--stride", type=int)
    p.add_argument("--seed", type=int, help="split seed")
    p.add_argument("--skip-bad-files", action="store_true", help="skip malformed logs and report them")
    p.set_defaults(handler=_build)


def _synth(args) -> int:
    from gcodefp_core.synthetic import write_synthetic_logs

    files = write_synthetic_logs(args.output, runs_per_operation=args.runs_per_op, seed=args.seed,
                                 machine_id=args.machine_id)
    print(f"wrote {len(files)} logs to {args.output}")
    return 0


def load_data_config(path: Path | None, **overrides):
    from gcodefp_core.dataset import DatasetConfig

    raw: dict = {}
    if path is not None:
        from gcodefp_core.fileio import read_json

        doc = read_json(path, "config")
        raw = dict(doc.get("data", doc))
    raw.update({k: v for k, v in overrides.items() if v is not None})
    return DatasetConfig.from_dict(raw)


def _build(args) -> int:
    from gcodefp_core.dataset import build_dataset

    cfg = load_data_config(args.config, source=args.source, feature_set=args.feature_set, window=args.window,
                           stride=args.stride, seed=args.seed, skip_bad_files=args.skip_bad_files or None)
    out = build_dataset(cfg, args.output)
    m = json.loads((out / "manifest.json").read_text())
    c = m["counts"]
    print(f"dataset: {out}")
    print(f"  runs {c['runs']}  rows {c['rows']}  dropped rows {c['dropped_rows']}  windows {c['windows']}")
    print(f"  features {len(m['features']['continuous'])} continuous + {len(m['features']['categorical'])} categorical"
          f"  vocab {m['tokenizer']['vocab_size']}  max tokens {m['max_tokens']}  build {m['build_seconds']}s")
    for s in m["skipped_files"]:
        print(f"  skipped {s['file']}: {s['error']}")
    print(f"  content hash {m['content_hash'][:16]}")
    return 0
