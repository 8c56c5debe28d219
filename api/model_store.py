"""The model a worker serves, and hot swapping it.

Source: a registry (GCODEFP_REGISTRY: serve its CURRENT package, follow promotions) or one package
folder (GCODEFP_PACKAGE). Every worker polls its source (a pointer file read and a stat, every
GCODEFP_POLL_SECONDS) so a promotion reaches all workers without any coordination between them.

A swap: verify the package's checksums, create the onnxruntime sessions and warm them up on the
package's sample request, all in a thread while the old model keeps serving; then one attribute
assignment makes the new model current. A request takes a reference to the current model once
and uses it to the end, so requests in flight finish on the old model. A package that fails any
step is refused: the old model keeps serving, the error is logged and counted, and the same
package is not retried until its pointer or manifest changes (or an admin reload asks for it).
"""
from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from gcodefp_core import package as pkg

from . import inputs, metrics
from .settings import SETTINGS

log = logging.getLogger("api.model_store")


@dataclass(frozen=True)
class LoadedModel:
    predictor: object            # gcodefp_core.runtime.OnnxPredictor
    version: str
    variant: str
    path: Path
    manifest: dict
    load_seconds: float
    loaded_at: float = field(default_factory=time.time)

    @property
    def spec(self):
        return self.predictor.features

    @property
    def window(self) -> int:
        return self.predictor.window


def warm_up(predictor, package_dir: Path) -> None:
    """Run every path a request can take once (sessions allocate on first run); raise if any fails."""
    doc = json.loads((package_dir / "sample_request.json").read_text())
    cont, cat = inputs.parse_sensor_data(doc["sensor_data"], predictor.features, predictor.window)
    c, k = inputs.model_inputs(predictor.features, cont[None], cat[None])
    for _ in range(3):
        out = predictor.predict(c, k)
    c8, k8 = np.repeat(c, 8, axis=0), np.repeat(k, 8, axis=0)
    predictor.predict(c8, k8)
    predictor.fingerprint(c8, k8)
    if predictor.can_decode:
        predictor.predict(c, k, method="beam", beam_width=2, max_length=2)
    if not isinstance(out[0]["gcode"], str) or not np.isfinite(out[0]["fingerprint"]).all():
        raise ValueError("warm-up produced an invalid prediction")


def memory_allows_previous(min_free_mb: int | None = None) -> bool:
    """Keep the previous model only while the machine has GCODEFP_KEEP_PREVIOUS_MIN_FREE_MB available
    (MemAvailable; where it cannot be read, keep it)."""
    need = SETTINGS.keep_previous_min_free_mb if min_free_mb is None else min_free_mb
    try:
        with open("/proc/meminfo") as f:
            avail_kb = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return True
    if avail_kb // 1024 < need:
        log.warning("previous model not kept: %d MB available < GCODEFP_KEEP_PREVIOUS_MIN_FREE_MB=%d",
                    avail_kb // 1024, need, extra={"event": "previous_dropped"})
        return False
    return True


def settle_collector() -> None:
    """Keep what a worker has loaded out of the cyclic collector's full passes: they walk every tracked
    object while the event loop waits, and a loaded worker holds ~160,000 (modules, routes, the model),
    so a full pass stalled serving for 40-100 ms every so often. After a load (at start-up and after a
    swap) every object is unfrozen, garbage is collected (a swapped-out model's cycles with it: frozen
    objects are never collected), and what is alive is frozen again. One such pause per load, none
    while serving."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()


class ModelStore:
    def __init__(self, registry: str | os.PathLike | None = None, package: str | os.PathLike | None = None,
                 poll_seconds: float = 1.0, intra_op_threads: int = 1, keep_previous: bool = True):
        if (registry is None) == (package is None):
            raise ValueError("give exactly one of GCODEFP_REGISTRY (a registry) or GCODEFP_PACKAGE (a package)")
        self.registry = Path(registry) if registry is not None else None
        self.package = Path(package) if package is not None else None
        self.poll_seconds, self.intra_op_threads = poll_seconds, intra_op_threads
        self.model: LoadedModel | None = None
        # The version served before the last swap, kept loaded so that a caller can pin it during a
        # rollout (/v2/models/{name}/versions/{v}); GCODEFP_KEEP_PREVIOUS=0 frees it at the swap instead.
        self.previous: LoadedModel | None = None
        self.keep_previous = keep_previous
        self.last_error: str | None = None
        self._seen: tuple | None = None      # the source state last acted upon (loaded or refused)
        self._lock = asyncio.Lock()

    @classmethod
    def from_env(cls) -> "ModelStore":
        s = SETTINGS
        return cls(s.registry, s.package, s.poll_seconds, s.intra_op_threads, s.keep_previous)

    @property
    def ready(self) -> bool:
        return self.model is not None

    def loaded(self) -> list[LoadedModel]:
        """The loaded models, current first."""
        return [m for m in (self.model, self.previous) if m is not None]

    def get(self, version: str | None = None) -> LoadedModel | None:
        """The current model (version None), or the loaded model of that version; None if not loaded."""
        if version is None:
            return self.model
        return next((m for m in self.loaded() if m.version == version), None)

    # ---- source ---------------------------------------------------------------------------
    def _resolve(self, version: str | None) -> Path:
        if self.package is not None:
            if version is not None:
                raise inputs.InputError("version", "this server serves one package (GCODEFP_PACKAGE), not a registry")
            return self.package
        return pkg.package_dir(self.registry, version) if version else pkg.current_package(self.registry)

    def source_state(self) -> tuple:
        """(version, manifest mtime) of what the source designates now; changes when it must be reloaded."""
        try:
            path = self._resolve(None)
            return (path.name, (path / pkg.MANIFEST).stat().st_mtime_ns)
        except (OSError, ValueError) as exc:
            return ("unavailable", str(exc))

    # ---- loading ---------------------------------------------------------------------------
    def _load(self, path: Path) -> LoadedModel:
        from gcodefp_core.runtime import OnnxPredictor

        t0 = time.perf_counter()
        manifest = pkg.verify_package(path)
        predictor = OnnxPredictor.load(path, intra_op_threads=self.intra_op_threads)
        warm_up(predictor, path)
        return LoadedModel(predictor, manifest.get("version", path.name), predictor.variant, path, manifest,
                           round(time.perf_counter() - t0, 3))

    async def reload(self, version: str | None = None, trigger: str = "admin", promote: bool = False) -> LoadedModel:
        """Load `version` (default: the source's current package) and swap it in; raise on failure,
        leaving the old model serving. promote=True also makes it the registry's CURRENT once it has
        loaded here, so that every other worker follows."""
        async with self._lock:
            state = self.source_state()
            try:
                path = self._resolve(version)
                new = await asyncio.to_thread(self._load, path)
            except Exception as exc:
                if version is None:
                    self._seen = state  # do not retry the same broken package on every poll
                self.last_error = f"{type(exc).__name__}: {exc}"
                metrics.RELOADS.labels(trigger, "failure").inc()
                metrics.LOAD_FAILURES.inc()
                log.error("package refused; still serving %s", self.model.version if self.model else "nothing",
                          extra={"event": "load_failed", "trigger": trigger, "error": self.last_error,
                                 "package": str(version or state[0])})
                raise
            if promote and self.registry is not None:
                pkg.promote(self.registry, new.version)
                state = self.source_state()
            old = self.model
            self.model = new  # the swap: requests that already hold `old` finish on it
            if old is not None and old.version != new.version:
                self.previous = old if self.keep_previous and memory_allows_previous() else None
            self._seen, self.last_error = state, None
            metrics.set_model(new.version, new.variant, (old.version, old.variant) if old else None)
            metrics.RELOADS.labels(trigger, "success").inc()
            log.info("serving %s", new.version, extra={
                "event": "model_loaded", "trigger": trigger, "version": new.version, "variant": new.variant,
                "previous": old.version if old else None, "load_seconds": new.load_seconds})
            old = None   # a model no longer served must be collectable now
            settle_collector()
            return new

    async def watch(self) -> None:
        """Poll the source; reload when it changes. Runs for the worker's lifetime."""
        while True:
            await asyncio.sleep(self.poll_seconds)
            try:
                state = await asyncio.to_thread(self.source_state)
                if state != self._seen and state[0] != "unavailable":
                    await self.reload(trigger="watch")
                elif state[0] == "unavailable" and state != self._seen:
                    self._seen = state
                    log.warning("package source unavailable: %s", state[1], extra={"event": "source_unavailable"})
            except asyncio.CancelledError:
                raise
            except Exception:  # refused packages are already logged and counted by reload()
                pass
