"""Dagster definitions of the gcodefp pipeline, split by concern; each asset body calls gcodefp_core."""
