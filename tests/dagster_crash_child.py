"""Child process of tests/test_dagster_crash.py: materialize one stage of the asset graph in the
artifact store ROOT; with `pause`, stop half way through the stage (after the stage has written part
of its output), write MARKER and wait there to be killed.

    python tests/dagster_crash_child.py STAGE ROOT MARKER pause|run
"""
import sys
import time
from pathlib import Path

import dagster as dg

from dagster_fixtures import make_defs, run

STAGES = {"training": ["checkpoint"], "export": ["onnx_model"], "packaging": ["deployment_package"]}


def pause_here(marker: Path) -> None:
    marker.write_text("paused\n")
    time.sleep(600)


def install_pause(stage: str, marker: Path) -> None:
    if stage == "training":  # after the first epoch's checkpoint is on disk
        import gcodefp_core.train as train

        save = train.save_checkpoint

        def save_then_pause(path, payload):
            save(path, payload)
            if path.name == "checkpoint_best.pt":
                pause_here(marker)
        train.save_checkpoint = save_then_pause
    elif stage == "export":  # the first graph written into the staging folder, the others not yet
        import gcodefp_core.export as export

        real = export.export_graph

        def export_then_pause(*args, **kwargs):
            real(*args, **kwargs)
            pause_here(marker)
        export.export_graph = export_then_pause
    elif stage == "packaging":  # graphs copied into the package, manifest not yet written
        import gcodefp_core.package as package

        write_json = package.write_json

        def pause_before_manifest(path, obj):
            if Path(path).name == "manifest.json":
                pause_here(marker)
            write_json(path, obj)
        package.write_json = pause_before_manifest


if __name__ == "__main__":
    stage, root, marker, mode = sys.argv[1:5]
    if mode == "pause":
        install_pause(stage, Path(marker))
    result = run(make_defs(Path(root)), dg.DagsterInstance.ephemeral(),
                 selection=[dg.AssetKey(k) for k in STAGES[stage]])
    sys.exit(0 if result.success else 1)
