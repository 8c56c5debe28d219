"""The code location: `dagster dev -w workspace.yaml` (or `dagster dev -m gcodefp_dagster.definitions`).

The asset graph, its checks, jobs and sensors come from the defs/ folder (one subfolder per domain,
loaded with dg.load_from_defs_folder); the resources are configured from the environment
(resources.py). build_definitions() swaps resources for tests and the `gcodefp pipeline` command.
"""
from pathlib import Path

import dagster as dg

from .resources import default_resources


def graph_definitions() -> dg.Definitions:
    return dg.load_from_defs_folder(path_within_project=Path(__file__).parent)


def build_definitions(resources: dict | None = None, executor: dg.ExecutorDefinition | None = None) -> dg.Definitions:
    return dg.Definitions.merge(graph_definitions(), dg.Definitions(
        resources=default_resources() | (resources or {}), executor=executor or dg.multi_or_in_process_executor))


defs = build_definitions()
