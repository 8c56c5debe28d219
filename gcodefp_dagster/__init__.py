"""Dagster definitions for gcodefp: assets with their checks, one folder per domain (defs/), jobs,
sensors and declarative automation, all calling gcodefp_core."""
import warnings

import dagster as dg

# Sensor owners and some automation APIs are "beta" in Dagster 1.13; the warnings repeat in every
# step subprocess and drown the pipeline's own progress lines.
warnings.filterwarnings("ignore", category=dg.BetaWarning)
warnings.filterwarnings("ignore", category=dg.PreviewWarning)
