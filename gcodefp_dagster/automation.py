"""When assets rebuild on their own (Declarative Automation, evaluated by the daemon's automation
sensor in defs/automation.py):

- RETRAIN on the raw logs: re-read them on a cron (weekly by default; GCODEFP_RETRAIN_CRON, a
  deployment setting read when the code location loads), which is what starts a retraining;
- DOWNSTREAM on everything after them: eager (when a parent updates, and none is missing or in
  progress), and only after the parents' blocking checks passed, so a model that failed its
  parity or latency gate is never packaged, whichever way it was materialized.
"""
import os

import dagster as dg

RETRAIN_CRON = os.environ.get("GCODEFP_RETRAIN_CRON", "0 3 * * 1")  # Mondays 03:00 UTC

RETRAIN = dg.AutomationCondition.on_cron(RETRAIN_CRON, "UTC")
DOWNSTREAM = (dg.AutomationCondition.eager() & dg.AutomationCondition.all_deps_blocking_checks_passed()
              ).with_label("eager after blocking checks")
