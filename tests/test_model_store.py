"""api/model_store.py in process: what a load leaves to the cyclic garbage collector."""
from __future__ import annotations

import asyncio
import gc
import os
import subprocess
import sys
import weakref
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def tracked(obj) -> bool:
    """Whether the collector's generations 0-2 (not the frozen, permanent one) hold obj."""
    return any(o is obj for g in range(3) for o in gc.get_objects(g))


def test_a_loaded_model_is_frozen_and_a_swapped_out_one_is_still_collected(api_registry):
    from api.model_store import ModelStore

    async def scenario():
        store = ModelStore(registry=api_registry, keep_previous=False)
        await store.reload("v1", trigger="test")
        first = store.model.predictor
        assert gc.get_freeze_count() > 0 and not tracked(first)   # full passes no longer walk the loaded model
        first.cycle = first   # a model held in a reference cycle: only the cyclic collector can free it
        gone = weakref.ref(first)
        del first
        await store.reload("v2", trigger="test")
        assert store.model.version == "v2" and store.previous is None
        assert gone() is None   # frozen objects are never collected: the swap unfroze, collected, froze again
        assert not tracked(store.model.predictor)

    try:
        asyncio.run(scenario())
    finally:
        gc.unfreeze()   # the rest of the suite runs with the collector as it found it


def test_collector_passes_are_timed_per_generation_in_the_metrics():
    from prometheus_client import REGISTRY

    from api import metrics

    def full_passes() -> float:
        return REGISTRY.get_sample_value("gcodefp_gc_pause_seconds_count", {"generation": "2"}) or 0.0

    metrics.watch_gc()
    metrics.watch_gc()   # once per process, however often a worker starts its app
    metrics.flush_gc()
    before = full_passes()
    gc.collect()
    assert full_passes() == before   # noted, published outside the collector
    metrics.flush_gc()
    assert full_passes() == before + 1
    assert REGISTRY.get_sample_value("gcodefp_gc_pause_seconds_sum", {"generation": "2"}) > 0


# A collection that starts while prometheus-client holds its value lock (here: while a new label's child
# is created, with the collector running at almost every allocation) must not wait on that lock from the
# gc callback.
DEADLOCK_PROBE = """
import gc, sys
sys.path.insert(0, sys.argv[1])
from api import metrics
metrics.watch_gc()
gc.set_threshold(1)
for i in range(300):
    metrics.REQUESTS.labels("/predict", "POST", str(1000 + i)).inc()
    metrics.REQUEST_LATENCY.labels("/predict", str(1000 + i)).observe(0.001)
gc.set_threshold(700, 10, 10)
metrics.flush_gc()
print(sum(s.value for m in metrics.GC_PAUSE.collect() for s in m.samples if s.name.endswith("_count")))
"""


def test_a_collection_inside_a_metric_update_does_not_freeze_the_worker(tmp_path):
    # multiprocess mode, as `gcodefp serve` runs: one lock guards every value of the process
    env = {k: v for k, v in os.environ.items() if k != "prometheus_multiproc_dir"} | {
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    try:
        out = subprocess.run([sys.executable, "-c", DEADLOCK_PROBE, str(REPO)], env=env, capture_output=True,
                             text=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("metric updates hung: the gc callback waited on prometheus-client's value lock")
    assert out.returncode == 0, out.stderr[-2000:]
    assert float(out.stdout.split()[-1]) > 100   # the passes were still counted, once published
