"""Deployment packages and the registry that says which one is served.

Layout:
    <registry>/packages/<version>/   the exported graphs (shipped variant + encoder-only), model.json,
                                     model_card.md, benchmark.json, sample_request.json and
                                     manifest.json (sha256 + size of every other file, version, created_at)
    <registry>/CURRENT               the version being served (replaced atomically: write + rename)
    <registry>/PREVIOUS              the version served before it (for rollback)

A package is written to a hidden temp folder and renamed into place, so a server polling the
registry never sees half a package; a package is never modified after that (a new model is a new
version). Servers verify the checksums before loading, so a corrupted or hand-edited package is
refused rather than served. Plain library: no torch, no onnxruntime.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path

from .fileio import sha256_file, write_atomic, write_json
from .runtime.bundle import read_model_json, write_model_json

MANIFEST = "manifest.json"
MODEL_JSON = "model.json"
PACKAGE_FORMAT = 1
VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class PackageError(ValueError):
    """A package or registry that cannot be used; the message names the file."""


# ---- small helpers ------------------------------------------------------------------------
def check_version(version: str) -> str:
    if not isinstance(version, str) or not VERSION_RE.match(version):
        raise PackageError(f"version: {version!r} is not a valid name (letters, digits, '.', '_', '-'; max 64)")
    return version


def read_export(model) -> tuple[dict, Path]:
    """An exported model's model.json (a folder holding it, or a `<stem>.json`) through the one
    reader (gcodefp_core.runtime.bundle) -> (its contents, its path); PackageError otherwise."""
    try:
        meta, _, path = read_model_json(model)
    except (ValueError, FileNotFoundError) as exc:
        raise PackageError(str(exc)) from None
    return meta, path


# ---- package contents ---------------------------------------------------------------------
def default_sample_window(meta: dict) -> dict:
    """A valid raw window for sample_request.json: every continuous feature at its training mean
    and every categorical feature at its first known code."""
    feats = meta["features"]
    window = int(meta["window"])
    cont = [[round(float(m), 6) for m in feats["mean"]] for _ in range(window)]
    first = []
    for name in feats["categorical"]:
        codes = feats.get("categorical_maps", {}).get(name) or {"0": 1}
        key = min(codes, key=codes.get)
        first.append(int(float(key)) if re.fullmatch(r"-?\d+(\.0+)?", key) else key)
    return {"continuous": cont, "categorical": [list(first) for _ in range(window)]}


# Training settings that change what the model has learned to ignore (gcodefp_core.train.TrainConfig).
AUGMENTATION = ("board_dropout", "sensor_offset_std", "categorical_dropout")


def model_card(meta: dict, version: str, metrics: dict, benchmark: dict) -> str:
    feats = meta.get("features", {})
    tok = meta.get("tokenizer", {})
    table = meta.get("line_table") or {}
    train = meta.get("train_config") or {}
    augmentation = ", ".join(f"{k} {train[k]}" for k in AUGMENTATION if train.get(k))
    answers = (f"the line head (a lookup among the {len(table['lines'])} program lines of the training runs); "
               "the token decoder on request" if table.get("lines") else "the token decoder")
    clock, tracker = meta.get("program_clock") or {}, meta.get("program_tracker") or {}
    outputs = {o["name"] for o in (meta.get("graphs") or {}).get("predict", {}).get("outputs", [])}
    streaming = (f"program clock over {len(clock['programs'])} programs, clock weight {clock['weight']:g} "
                 "(chosen on validation)" if clock.get("programs") else "operation evidence only (no program clock)")
    if tracker.get("programs") and "line_logits" in outputs:
        templates, spread = tracker.get("templates"), tracker.get("spread")
        evidence = (f"; operation templates of {len(templates['columns'])} channels, weight "
                    f"{tracker['params']['template_weight']:g}" if templates else "")
        evidence += (f"; operation evidence from the spread of {len(spread['weights'])} channels over the last "
                     f"{spread['rows']} rows, weight {tracker['params']['spread_weight']:g}" if spread else "")
        streaming = (f"program tracker (a forward filter over the row offsets of {len(tracker['programs'])} programs; "
                     f"no row counter needed{evidence})")
    path = meta.get("program_path") or {}
    snapping = (f"onto the programs' tool paths ({sum(len(e) for e in path['ends'])} segments) within "
                f"{path['tolerance_mm']:g} mm (chosen on validation)" if path.get("tolerance_mm") else "off")
    lines = [
        f"# G-code fingerprint model {version}", "",
        f"- variant: {meta.get('variant', '?')}",
        f"- window: {meta.get('window')} rows; feature set {feats.get('feature_set', '?')}: "
        f"{len(feats.get('continuous', []))} continuous + {len(feats.get('categorical', []))} categorical inputs",
        f"- vocabulary: {tok.get('vocab_size', len(tok.get('vocab', tok.get('tokens', []))))} tokens; "
        f"max {meta.get('max_tokens', '?')} decode steps",
        f"- answers with: {answers}",
        f"- side-channel only (no controller state read): {'yes' if feats.get('feature_set') == 'side_channel' else 'no'}",
        f"- training augmentation: {augmentation or 'none'}",
        f"- streaming mode (POST /stream/{{machine}}): {streaming}",
        f"- line snapping (the last row's position on the program path): {snapping}",
        f"- operations: {', '.join(meta.get('operations', []))}",
        f"- parameters: {meta.get('parameter_count', meta.get('parameters', '?'))}",
        f"- source checkpoint sha256: {meta.get('source_checkpoint', {}).get('sha256', '?')}",
        "", "## Metrics", "",
    ]
    lines += [f"- {k}: {v}" for k, v in sorted(metrics.items())] or ["- (none recorded)"]
    lines += ["", "## Benchmark", ""]
    lines += [f"- {k}: {v}" for k, v in sorted(benchmark.items())] or ["- (none recorded)"]
    lines += ["", "Inputs are raw log readings; the server normalises them with the packaged feature spec.", ""]
    return "\n".join(lines)


def _new_version(meta_bytes: bytes) -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    return f"v{stamp}-{hashlib.sha256(meta_bytes).hexdigest()[:8]}"


def build_package(model_dir, registry, version: str | None = None, benchmark: dict | None = None,
                  metrics: dict | None = None, sample_window: dict | None = None) -> Path:
    """Copy an exported model (folder with model.json, or a `<stem>.json`)  into `<registry>/packages/<version>/` with its card, benchmark,
    sample request and checksums. Does not promote it. Returns the package folder."""
    registry = Path(registry)
    meta, meta_path = read_export(model_dir)
    model_dir = meta_path.parent
    files = list(dict.fromkeys(meta["files"].values()))
    named = version is not None
    version = check_version(version or _new_version(meta_path.read_bytes()))
    if metrics is None:
        metrics = meta.get("metrics") or meta.get("source_checkpoint", {}).get("metrics", {})
    metrics = dict(metrics)
    benchmark = dict(benchmark or {})
    packages = registry / "packages"
    dest = packages / version
    if dest.exists() and named:
        raise FileExistsError(f"package {version} already exists in {registry} (packages are immutable)")
    if dest.exists():   # the same model.json packaged again within the same second: the next free name
        n = 2
        while (packages / f"{version}-{n}").exists():
            n += 1
        version, dest = f"{version}-{n}", packages / f"{version}-{n}"
    packages.mkdir(parents=True, exist_ok=True)
    tmp = packages / f".tmp-{version}-{os.getpid()}-{time.time_ns()}"
    tmp.mkdir()
    try:
        for name in files:
            shutil.copy2(model_dir / name, tmp / name)
        meta_out = dict(meta, metrics=metrics, package_version=version)
        write_model_json(tmp / MODEL_JSON, meta_out)
        (tmp / "model_card.md").write_text(model_card(meta_out, version, metrics, benchmark))
        write_json(tmp / "benchmark.json", benchmark)
        window = sample_window or default_sample_window(meta)
        method = "line" if (meta.get("line_table") or {}).get("lines") else "greedy"  # the model's default
        write_json(tmp / "sample_request.json", {"sensor_data": window, "return_fingerprint": True,
                                                   "inference_config": {"method": method}})
        entries = {p.name: {"sha256": sha256_file(p), "size": p.stat().st_size}
                   for p in sorted(tmp.iterdir()) if p.is_file()}
        write_json(tmp / MANIFEST, {
            "format": PACKAGE_FORMAT, "version": version, "variant": meta.get("variant"),
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "source": str(meta_path.resolve()), "files": entries})
        tmp.rename(dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def verify_package(package_dir) -> dict:
    """Check every file listed in the manifest (size, then sha256) and that nothing else is there.
    Returns the manifest; raises PackageError naming the first bad file."""
    package_dir = Path(package_dir)
    mpath = package_dir / MANIFEST
    if not mpath.is_file():
        raise PackageError(f"{mpath}: not found (not a package folder)")
    try:
        manifest = json.loads(mpath.read_text())
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise PackageError(f"{mpath}: unreadable manifest ({exc})") from None
    for name, entry in files.items():
        path = package_dir / name
        if not path.is_file():
            raise PackageError(f"{path}: listed in the manifest but missing")
        if path.stat().st_size != entry["size"]:
            raise PackageError(f"{path}: size {path.stat().st_size} != {entry['size']} in the manifest")
        if sha256_file(path) != entry["sha256"]:
            raise PackageError(f"{path}: sha256 does not match the manifest (file changed or corrupted)")
    extra = sorted(p.name for p in package_dir.iterdir() if p.name not in files and p.name != MANIFEST)
    if extra:
        raise PackageError(f"{package_dir / extra[0]}: not listed in the manifest")
    return manifest


# ---- registry ------------------------------------------------------------------------------
def _read_pointer(path: Path) -> str | None:
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        return None
    return text or None


def current_version(registry) -> str | None:
    return _read_pointer(Path(registry) / "CURRENT")


def previous_version(registry) -> str | None:
    return _read_pointer(Path(registry) / "PREVIOUS")


def package_dir(registry, version: str) -> Path:
    path = Path(registry) / "packages" / check_version(version)
    if not path.is_dir():
        raise PackageError(f"{path}: no such package in the registry")
    return path


def current_package(registry) -> Path:
    version = current_version(registry)
    if version is None:
        raise PackageError(f"{Path(registry) / 'CURRENT'}: no version promoted yet")
    return package_dir(registry, version)


def list_versions(registry) -> list[str]:
    """Package versions in the registry, oldest first (by created_at, then name)."""
    root = Path(registry) / "packages"
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        if d.is_dir() and not d.name.startswith(".") and (d / MANIFEST).is_file():
            try:
                created = json.loads((d / MANIFEST).read_text()).get("created_at", "")
            except json.JSONDecodeError:
                created = ""
            found.append((created, d.name))
    return [name for _, name in sorted(found)]


def promote(registry, version: str) -> str | None:
    """Verify a package and make it CURRENT; the old current becomes PREVIOUS. Returns the old one."""
    registry = Path(registry)
    verify_package(package_dir(registry, version))
    old = current_version(registry)
    if old == version:
        return old
    if old is not None:
        write_atomic(registry / "PREVIOUS", old + "\n")
    write_atomic(registry / "CURRENT", version + "\n")
    return old


def rollback(registry) -> str:
    """Serve PREVIOUS again (verified first); the rolled-back version becomes PREVIOUS."""
    registry = Path(registry)
    prev = previous_version(registry)
    if prev is None:
        raise PackageError(f"{registry / 'PREVIOUS'}: nothing to roll back to")
    promote(registry, prev)
    return prev
