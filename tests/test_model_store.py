"""api/model_store.py in process: what a load leaves to the cyclic garbage collector."""
from __future__ import annotations

import asyncio
import gc
import weakref



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
    before = full_passes()
    gc.collect()
    assert full_passes() == before + 1
    assert REGISTRY.get_sample_value("gcodefp_gc_pause_seconds_sum", {"generation": "2"}) > 0
