"""`gcodefp pipeline` as its users run it: one run per seed partition (here 3 seeds, 2 at a time,
up to training), each seed's epoch lines on the terminal while it trains."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import dagster as dg
import pytest

from gcodefp_dagster.cli import threads_per_run

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def test_three_seeds_are_three_runs_with_progress(tmp_path):
    home = tmp_path / "home"
    env = os.environ | {"DAGSTER_HOME": str(home), "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([str(Path(sys.executable).with_name("gcodefp")), "pipeline", "--config",
                           str(REPO / "configs" / "tiny.json"), "--seeds", "1", "2", "3", "--parallel-seeds", "2",
                           "--epochs", "1", "--until", "training", "--artifacts", str(tmp_path / "store"),
                           "--registry", str(tmp_path / "registry")],
                          cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=540)
    assert proc.returncode == 0, proc.stdout[-4000:]
    threads = max(1, (os.cpu_count() or 1) // 2)
    assert f"(2 at a time, {threads} torch thread(s) each)" in proc.stdout
    for seed in (1, 2, 3):
        assert f"train_seed[{seed}] seed {seed} epoch 1/1: loss" in proc.stdout and "ETA" in proc.stdout
    with dg.DagsterInstance.from_config(str(home)) as instance:
        runs = instance.get_runs(dg.RunsFilter(job_name="train_seed"))
        assert sorted(r.tags["dagster/partition"] for r in runs) == ["1", "2", "3"]
        assert all(r.status == dg.DagsterRunStatus.SUCCESS for r in runs)
        for run in runs:  # each run materialized exactly its own seed
            mats = [e.dagster_event.event_specific_data.materialization for e in
                    instance.all_logs(run.run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION)]
            assert [m.partition for m in mats] == [run.tags["dagster/partition"]]
            assert run.run_config["ops"]["checkpoint"]["config"]["num_threads"] == threads
    assert not list((tmp_path / "store").rglob(".staging-*"))


def test_seed_runs_share_the_cores_unless_threads_are_given():
    # Each concurrent seed run gets its share of the cores; torch's own default (a thread per core in
    # every run) oversubscribes them.
    def args(parallel, seeds=(42, 43, 44), threads=None):
        return SimpleNamespace(parallel_seeds=parallel, seeds=list(seeds), threads=threads)

    assert threads_per_run(args(3), cores=2) == 1
    assert threads_per_run(args(1), cores=2) == 2
    assert threads_per_run(args(2), cores=16) == 8
    assert threads_per_run(args(8, seeds=(1, 2)), cores=16) == 8   # only 2 runs can be at once
    assert threads_per_run(args(3, threads=4), cores=2) == 4       # --threads wins
