"""`gcodefp track`: follow a machine through recorded logs offline, as POST /stream/{machine} would
(gcodefp_core.runtime.tracked_stream), with a package's graphs and program tracker; no server, no torch."""
from __future__ import annotations

import json
import sys
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("track", help="follow a machine through recorded logs offline with a package's program tracker",
                       description="Each log is one machine's rows, fed to a new tracker session as one /stream "
                                   "chunk: the answers at its last row and every --every-th row before it, as JSON "
                                   "lines (with the logged line and operation beside them), then a summary per log.")
    p.add_argument("logs", type=Path, nargs="+", help="aligned sensor logs (<operation>_<NNN>_aligned.csv[.gz])")
    p.add_argument("--package", type=Path, required=True, help="a package folder (or its model.json)")
    p.add_argument("--every", type=int, default=4, help="judge every Nth row (default 4, as the server)")
    p.add_argument("--start", action="store_true", help="each log starts at its program's start")
    p.add_argument("--output", "-o", type=Path, help="write the JSON lines here (default: stdout)")
    p.set_defaults(handler=_track)


def _track(args) -> int:
    from gcodefp_core.fileio import write_atomic
    from gcodefp_core.logs import read_log
    from gcodefp_core.runtime import OnnxPredictor
    from gcodefp_core.runtime.tracked_stream import track_rows
    from gcodefp_core.schema import TARGET_COLUMN, FeatureColumns
    from gcodefp_core.tokenizer import canonicalize

    if args.every < 1:
        raise ValueError(f"--every: must be >= 1, got {args.every}")
    package = args.package.parent if args.package.name == "model.json" else args.package
    predictor = OnnxPredictor.load(package)
    spec = predictor.features
    columns = FeatureColumns(tuple(spec.continuous), tuple(spec.categorical))
    lines, summaries = [], []
    for path in args.logs:
        run = read_log(path, columns)
        cont, cat = spec.transform(run.frame)
        logged = [canonicalize(g) for g in run.frame[TARGET_COLUMN]]
        answers = track_rows(predictor, cont, cat, args.every, args.start)
        for a in answers:
            lines.append(json.dumps({"log": run.name, **a, "logged": {"operation": run.operation,
                                                                      "gcode_sequence": logged[a["row"]]}}))
        n = max(len(answers), 1)
        summaries.append({"log": run.name, "rows": len(run), "answers": len(answers),
                          "operation": answers[-1]["operation"]["name"] if answers else None,
                          "operation_acc": sum(a["operation"]["name"] == run.operation for a in answers) / n,
                          "exact_line": sum(a["gcode_sequence"] == logged[a["row"]] for a in answers) / n})
    text = "\n".join(lines) + "\n"
    if args.output:
        write_atomic(args.output, text)
    else:
        sys.stdout.write(text)
    for s in summaries:
        print(f"{s['log']}: {s['rows']} rows, {s['answers']} answers; last operation {s['operation']}; "
              f"operation {100 * s['operation_acc']:.1f}%, exact line {100 * s['exact_line']:.1f}% "
              f"(against the logged labels)", file=sys.stderr)
    return 0
