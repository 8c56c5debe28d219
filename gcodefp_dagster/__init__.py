"""Dagster definitions for gcodefp: thin assets, checks, sensors and schedules over gcodefp_core."""
import warnings

import dagster as dg

# backfill_policy and sensor owners are "beta" in Dagster 1.13; the warnings repeat in every
# step subprocess and drown the pipeline's own progress lines.
warnings.filterwarnings("ignore", category=dg.BetaWarning)
warnings.filterwarnings("ignore", category=dg.PreviewWarning)
