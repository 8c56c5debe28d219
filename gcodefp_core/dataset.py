"""The training dataset artifact: windows over validated logs, split by run, normalised on train.

Layout of a built dataset folder (written to a temp folder, then renamed into place):
    manifest.json          feature schema + normalisation, categorical maps, vocabulary, runs and
                           their split, window counts, build config, content hash
    rows_continuous.npy    float32 [R, F]  every kept row of every run, normalised
    rows_categorical.npy   int32   [R, C]
    row_line.npy           int32   [R]     index into manifest["lines"] (the canonical G-code)
    row_run.npy            int32   [R]     index into manifest["runs"]
    line_tokens.npy        int32   [L, T]  tokenised lines, BOS .. EOS PAD
    windows_<split>.npy    int64   [N]     window ids = global index of the window's LAST row

A window is the `window` rows ending at its id, never crossing runs; its target is the line active
at its last row ("what is the machine executing now"). Windows start at every `stride`-th row
offset; stride 1 (every offset) is the default because a model trained at stride 4 lost 15 points
when tested at other offsets. Splits are by run (windows of one run overlap), stratified by
operation, seeded.
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .features import FeatureSpec
from .fileio import check_known_fields, write_json
from .logs import LogFormatError, RunLog, list_log_files, read_log
from .schema import LINE_NUMBER_COLUMN, OPERATIONS, SESSION_CHANNELS, TARGET_COLUMN, feature_columns
from .tokenizer import GCodeTokenizer, canonicalize

log = logging.getLogger(__name__)
SPLITS = ("train", "val", "test")
ARRAYS = ("rows_continuous", "rows_categorical", "row_line", "row_run", "line_tokens") + tuple(f"windows_{s}" for s in SPLITS)
FORMAT_VERSION = 1
# Label-side arrays that datasets built before they existed lack (loaders must cope without them).
OPTIONAL_ARRAYS = ("row_line_number",)


@dataclass
class DatasetConfig:
    source: str = "synthetic"          # "synthetic", or a folder of *_aligned.csv[.gz] logs
    feature_set: str = "full"          # "full" or "side_channel"
    window: int = 64
    stride: int = 1
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    seed: int = 0                      # split seed
    exclude_channels: list[str] = field(default_factory=lambda: list(SESSION_CHANNELS))
    exclude_columns: list[str] = field(default_factory=list)   # single columns, e.g. ["mpox", "mpoy", "mpoz"]
    skip_bad_files: bool = False
    clip: float = 8.0
    synthetic_runs_per_operation: int = 4
    synthetic_seed: int = 0

    @classmethod
    def from_dict(cls, d: dict) -> "DatasetConfig":
        check_known_fields(d, cls, "data")
        cfg = cls(**d)
        if cfg.window < 2 or cfg.stride < 1:
            raise ValueError("data config: window must be >= 2 and stride >= 1")
        if not 0 <= cfg.val_fraction < 1 or not 0 <= cfg.test_fraction < 1:
            raise ValueError("data config: val_fraction and test_fraction must be in [0, 1)")
        return cfg

    def columns(self):
        """The raw columns this config reads (schema.FeatureColumns)."""
        return feature_columns(self.feature_set, tuple(self.exclude_channels), tuple(self.exclude_columns))


def split_runs(runs: list[RunLog], val_fraction: float, test_fraction: float, seed: int) -> dict[str, str]:
    """Run name -> split. Per operation: shuffle (seeded), then test, val, train; every operation with
    >= 3 runs gets at least one test and one validation run."""
    rng = np.random.default_rng(seed)
    out: dict[str, str] = {}
    for op in OPERATIONS:
        names = sorted(r.name for r in runs if r.operation == op)
        names = [names[i] for i in rng.permutation(len(names))]
        n_test = max(1, round(len(names) * test_fraction)) if len(names) >= 3 and test_fraction > 0 else 0
        n_val = max(1, round(len(names) * val_fraction)) if len(names) >= 3 and val_fraction > 0 else 0
        for i, name in enumerate(names):
            out[name] = "test" if i < n_test else "val" if i < n_test + n_val else "train"
    return out


def read_runs(files: list[Path], cfg: DatasetConfig) -> tuple[list[RunLog], list[dict]]:
    columns = cfg.columns()
    runs, skipped = [], []
    for path in files:
        try:
            run = read_log(path, columns)
        except LogFormatError as exc:
            if not cfg.skip_bad_files:
                raise
            log.warning("skipping bad file: %s", exc)
            skipped.append({"file": path.name, "error": str(exc)})
            continue
        if len(run) < cfg.window:
            log.warning("%s: %d rows is shorter than one window (%d); skipped", run.name, len(run), cfg.window)
            skipped.append({"file": path.name, "error": f"{len(run)} rows < window {cfg.window}"})
            continue
        runs.append(run)
    if not runs:
        raise ValueError("no usable runs: every log was skipped")
    return runs, skipped


def build_dataset(cfg: DatasetConfig, out_dir: Path | str, logs_dir: Path | str | None = None) -> Path:
    """Build the dataset artifact into `out_dir` (replaced atomically). Returns `out_dir`."""
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        if cfg.source == "synthetic":
            from .synthetic import write_synthetic_logs

            logs_dir = Path(logs_dir) if logs_dir else tmp / "logs"
            write_synthetic_logs(logs_dir, runs_per_operation=cfg.synthetic_runs_per_operation, seed=cfg.synthetic_seed)
            source = logs_dir
        else:
            from .paths import resolve

            source = resolve(cfg.source)
        runs, skipped = read_runs(list_log_files(source), cfg)
        manifest = _write_arrays(runs, cfg, tmp)
        manifest.update(source=str(source), skipped_files=skipped)
        manifest["content_hash"] = _content_hash(tmp, manifest)
        manifest["build_seconds"] = round(time.perf_counter() - t0, 3)
        write_json(tmp / "manifest.json", manifest)
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    c = manifest["counts"]
    log.info("dataset %s: %d runs, windows %s, %d features, vocab %d, %.1fs", out_dir, c["runs"], c["windows"],
             len(manifest["features"]["continuous"]), manifest["tokenizer"]["vocab_size"], manifest["build_seconds"])
    return out_dir


def _write_arrays(runs: list[RunLog], cfg: DatasetConfig, dest: Path) -> dict:
    split_of = split_runs(runs, cfg.val_fraction, cfg.test_fraction, cfg.seed)
    train = [r for r in runs if split_of[r.name] == "train"]
    spec = FeatureSpec.for_columns(cfg.feature_set, cfg.columns(), cfg.clip)
    spec.fit([r.frame for r in train])
    tokenizer = GCodeTokenizer.build([canonicalize(g) for r in train for g in r.frame[TARGET_COLUMN]])

    canon = [[canonicalize(g) for g in r.frame[TARGET_COLUMN]] for r in runs]
    lines = sorted({g for c in canon for g in c})
    line_index = {g: i for i, g in enumerate(lines)}
    max_tokens = tokenizer.max_encoded_length(lines)
    arrays = {"line_tokens": tokenizer.encode_batch(lines, max_tokens).astype(np.int32)}
    conts, cats, row_line, row_number, row_run, run_meta = [], [], [], [], [], []
    windows: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    offset = 0
    for i, (run, lines_of_run) in enumerate(zip(runs, canon)):
        cont, cat = spec.transform(run.frame)
        conts.append(cont)
        cats.append(cat.astype(np.int32))
        row_line.append(np.fromiter((line_index[g] for g in lines_of_run), np.int32, len(run)))
        row_number.append(_line_numbers(run.frame))
        row_run.append(np.full(len(run), i, np.int32))
        ends = offset + np.arange(cfg.window - 1, len(run), cfg.stride, dtype=np.int64)
        windows[split_of[run.name]].append(ends)
        run_meta.append({"name": run.name, "operation": run.operation, "split": split_of[run.name], "rows": len(run),
                         "first_row": offset, "windows": len(ends), "dropped_rows": run.dropped_rows,
                         "filled_cells": run.filled_cells, "boards_present": run.boards_present})
        offset += len(run)
    arrays.update(rows_continuous=np.concatenate(conts), rows_categorical=np.concatenate(cats),
                  row_line=np.concatenate(row_line), row_run=np.concatenate(row_run),
                  row_line_number=np.concatenate(row_number))
    for s in SPLITS:
        arrays[f"windows_{s}"] = np.concatenate(windows[s]) if windows[s] else np.empty(0, np.int64)
    for name in ARRAYS + OPTIONAL_ARRAYS:
        np.save(dest / f"{name}.npy", arrays[name])

    dropped = sum(r.dropped_rows for r in runs)
    if dropped:
        log.info("dropped %d rows without G-code in total", dropped)
    return {
        "format_version": FORMAT_VERSION,
        "config": asdict(cfg),
        "operations": list(OPERATIONS),
        "window": cfg.window,
        "stride": cfg.stride,
        "features": spec.to_dict(),
        "tokenizer": tokenizer.to_dict() | {"vocab_size": tokenizer.vocab_size},
        "max_tokens": max_tokens,
        "lines": lines,
        "runs": run_meta,
        "splits": {s: [r["name"] for r in run_meta if r["split"] == s] for s in SPLITS},
        "counts": {"runs": len(runs), "rows": offset, "dropped_rows": dropped,
                   "windows": {s: int(len(arrays[f"windows_{s}"])) for s in SPLITS}},
    }


def _line_numbers(frame) -> np.ndarray:
    """The program line number of each row (-1 where the log has none)."""
    if LINE_NUMBER_COLUMN not in frame:
        return np.full(len(frame), -1, np.int32)
    return pd.to_numeric(frame[LINE_NUMBER_COLUMN], errors="coerce").fillna(-1).to_numpy().astype(np.int32)


def _content_hash(folder: Path, manifest: dict) -> str:
    h = hashlib.sha256()
    for name in ARRAYS + OPTIONAL_ARRAYS:
        if (folder / f"{name}.npy").is_file():
            h.update((folder / f"{name}.npy").read_bytes())
    core = {k: v for k, v in manifest.items() if k not in ("source", "content_hash", "build_seconds")}
    h.update(json.dumps(core, sort_keys=True).encode())
    return h.hexdigest()


def _replace_dir(src: Path, dst: Path) -> None:
    """Move a finished folder into place; an existing one is moved aside first, then removed."""
    old = None
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{time.time_ns()}")
        dst.rename(old)
    src.rename(dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


class Dataset:
    """A built dataset, loaded into memory (the real one is ~50 MB)."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        manifest_path = self.path / "manifest.json"
        if not manifest_path.is_file():
            raise FileNotFoundError(f"not a dataset folder (no manifest.json): {self.path}")
        self.manifest = json.loads(manifest_path.read_text())
        self.arrays = {name: np.load(self.path / f"{name}.npy") for name in ARRAYS}
        self.arrays |= {name: np.load(self.path / f"{name}.npy") for name in OPTIONAL_ARRAYS
                        if (self.path / f"{name}.npy").is_file()}
        self.features = FeatureSpec.from_dict(self.manifest["features"])
        tok = dict(self.manifest["tokenizer"])
        tok.pop("vocab_size", None)
        self.tokenizer = GCodeTokenizer.from_dict(tok)
        self.window: int = self.manifest["window"]
        self.max_tokens: int = self.manifest["max_tokens"]
        self.operations: list[str] = self.manifest["operations"]
        self._run_op = np.array([self.operations.index(r["operation"]) for r in self.manifest["runs"]], np.int64)
        self._offsets = np.arange(-self.window + 1, 1, dtype=np.int64)

    @property
    def continuous_features(self) -> list[str]:
        return self.features.continuous

    @property
    def categorical_features(self) -> list[str]:
        return self.features.categorical

    @property
    def categorical_cardinalities(self) -> list[int]:
        return self.features.cardinalities

    def split_windows(self, split: str) -> np.ndarray:
        if split not in SPLITS:
            raise ValueError(f"split: unknown {split!r}; choose one of {', '.join(SPLITS)}")
        return self.arrays[f"windows_{split}"]

    def batch(self, window_ids) -> dict[str, np.ndarray]:
        ends = np.asarray(window_ids, dtype=np.int64)
        rows = ends[:, None] + self._offsets
        run = self.arrays["row_run"][ends].astype(np.int64)
        return {
            "continuous": self.arrays["rows_continuous"][rows],
            "categorical": self.arrays["rows_categorical"][rows].astype(np.int64),
            "operation": self._run_op[run],
            "tokens": self.arrays["line_tokens"][self.arrays["row_line"][ends]].astype(np.int64),
            "run": run,
        }

    def operation_labels(self, window_ids) -> np.ndarray:
        """Operation index of each window (its run's file-name prefix)."""
        return self._run_op[self.arrays["row_run"][np.asarray(window_ids, dtype=np.int64)]]

    def target_lines(self, window_ids) -> list[str]:
        idx = self.arrays["row_line"][np.asarray(window_ids, dtype=np.int64)]
        return [self.manifest["lines"][i] for i in idx]


def load_dataset(path: Path | str) -> Dataset:
    return Dataset(path)


def build_synthetic_dataset(out_dir: Path | str, runs_per_operation: int = 3, seed: int = 0, window: int = 32,
                            feature_set: str = "full", stride: int = 1) -> Path:
    """A small dataset from freshly generated synthetic logs (for tests and demos)."""
    cfg = DatasetConfig(source="synthetic", feature_set=feature_set, window=window, stride=stride,
                        synthetic_runs_per_operation=runs_per_operation, synthetic_seed=seed, seed=seed)
    return build_dataset(cfg, out_dir)
