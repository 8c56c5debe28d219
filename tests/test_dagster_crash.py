"""Crash safety: a run SIGKILLed in the middle of training, export or packaging leaves the
registry consistent (CURRENT and PREVIOUS name complete, verified packages; no half-written package
is listed) and the stage's last complete output in place, and a re-run completes."""
from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gcodefp_core import package as pkg

CHILD = Path(__file__).with_name("dagster_crash_child.py")
pytestmark = pytest.mark.slow


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def assert_registry_consistent(registry: Path) -> list[str]:
    versions = pkg.list_versions(registry)
    for version in versions:  # every listed package is complete
        pkg.verify_package(registry / "packages" / version)
    assert pkg.current_version(registry) in versions and pkg.previous_version(registry) in versions
    return versions


@pytest.fixture(scope="module")
def served_registry(dagster_pipeline):
    """The session's pipeline with two packages promoted in turn: CURRENT and PREVIOUS both set."""
    from dagster_fixtures import PACKAGE, run

    root, instance, defs, _ = dagster_pipeline
    registry = root / "registry"
    run(defs, instance, selection=[PACKAGE], raise_on_error=True)
    first, second = pkg.list_versions(registry)[-2:]
    pkg.promote(registry, first)
    pkg.promote(registry, second)
    return root


def child(stage: str, root: Path, marker: Path, mode: str) -> subprocess.Popen:
    env = os.environ | {"WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1",
                        "PYTHONPATH": os.pathsep.join([str(CHILD.parent), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, str(CHILD), stage, str(root), str(marker), mode], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def kill_mid_stage(stage: str, root: Path, tmp_path: Path) -> None:
    marker = tmp_path / f"{stage}.paused"
    proc = child(stage, root, marker, "pause")
    deadline = time.monotonic() + 300
    while not marker.exists():
        if proc.poll() is not None:
            pytest.fail(f"{stage} child exited ({proc.returncode}) before pausing:\n{proc.stdout.read()[-3000:]}")
        assert time.monotonic() < deadline, f"{stage} child never reached its pause"
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)


def rerun(stage: str, root: Path, tmp_path: Path) -> None:
    proc = child(stage, root, tmp_path / "unused", "run")
    out, _ = proc.communicate(timeout=400)
    assert proc.returncode == 0, out[-3000:]


@pytest.mark.parametrize("stage, folder", [("training", "checkpoints/seed42"), ("export", "onnx/fp32")])
def test_sigkill_mid_stage_keeps_the_last_complete_output_and_a_rerun_completes(served_registry, tmp_path, stage, folder):
    root = served_registry
    out = root / "store" / folder
    before, versions = digest(out), assert_registry_consistent(root / "registry")
    kill_mid_stage(stage, root, tmp_path)
    assert digest(out) == before  # the half-done stage wrote only into its staging folder
    assert list(out.parent.glob(f".staging-{out.name}-*"))  # ... which is left behind, never read
    assert assert_registry_consistent(root / "registry") == versions
    rerun(stage, root, tmp_path)
    assert digest(out) != before and not list(out.parent.glob(f".staging-{out.name}-*"))
    assert assert_registry_consistent(root / "registry") == versions


def test_sigkill_mid_packaging_lists_no_half_written_package_and_a_rerun_completes(served_registry, tmp_path):
    root = served_registry
    registry = root / "registry"
    versions = assert_registry_consistent(registry)
    current, previous = pkg.current_version(registry), pkg.previous_version(registry)
    kill_mid_stage("packaging", root, tmp_path)
    assert list((registry / "packages").glob(".tmp-*"))  # the half-written package exists on disk ...
    assert assert_registry_consistent(registry) == versions  # ... and is not listed
    assert (pkg.current_version(registry), pkg.previous_version(registry)) == (current, previous)
    rerun("packaging", root, tmp_path)
    after = assert_registry_consistent(registry)
    assert len(after) == len(versions) + 1 and after[:-1] == versions
