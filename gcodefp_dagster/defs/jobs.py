"""Jobs over the asset graph. Each seed trains in its own run (train_seed, partitioned by seed);
the stages around it are unpartitioned runs. `full_pipeline` runs the whole graph for one seed
partition in one run (the quick path of the UI and the tests)."""

import dagster as dg

from .training.assets import SEEDS

DATA = dg.AssetSelection.groups("data")
TRAINING = dg.AssetSelection.assets("checkpoint")
RELEASE = dg.AssetSelection.all() - DATA - TRAINING

prepare_data = dg.define_asset_job("prepare_data", selection=DATA, description="Logs -> dataset.")
train_seed = dg.define_asset_job("train_seed", selection=TRAINING, partitions_def=SEEDS,
                                 description="One seed's checkpoint; one run per seed partition.")
release = dg.define_asset_job("release", selection=RELEASE,
                              description="Ensemble -> ONNX + variants -> benchmark -> package, over the seeds trained.")
full_pipeline = dg.define_asset_job("full_pipeline", selection=dg.AssetSelection.all(), partitions_def=SEEDS,
                                    description="The whole graph for one seed partition, in one run.")
