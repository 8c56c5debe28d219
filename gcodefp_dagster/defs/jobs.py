"""Jobs over the asset graph. Each seed trains in its own run (train_seed, partitioned by seed);
the stages around it are unpartitioned runs. `full_pipeline` runs the whole graph for one seed
partition in one run (the quick path of the UI and the tests).

A seed's run executes its step in the run's own process (always a fresh one: the run launcher's, or
the `dagster job execute` that `gcodefp pipeline` starts per seed): a step process would cost it
another import of torch and Dagster (~8 s of a core here) for one step. The data run, which
`gcodefp pipeline` executes inside its own process, and the release run, whose variants and checks
run side by side, keep a process per step."""

import dagster as dg

from .training.assets import SEEDS

DATA = dg.AssetSelection.groups("data")
TRAINING = dg.AssetSelection.assets("checkpoint")
RELEASE = dg.AssetSelection.all() - DATA - TRAINING

prepare_data = dg.define_asset_job("prepare_data", selection=DATA, description="Logs -> dataset.")
train_seed = dg.define_asset_job("train_seed", selection=TRAINING, partitions_def=SEEDS, executor_def=dg.in_process_executor,
                                 description="One seed's checkpoint; one run per seed partition.")
release = dg.define_asset_job("release", selection=RELEASE,
                              description="Ensemble -> ONNX + variants -> benchmark -> package, over the seeds trained.")
full_pipeline = dg.define_asset_job("full_pipeline", selection=dg.AssetSelection.all(), partitions_def=SEEDS,
                                    description="The whole graph for one seed partition, in one run.")
