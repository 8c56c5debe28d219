"""Configuration: the JSON config file's sections, loaded and checked without torch.

A config file has sections "data" (gcodefp_core.dataset.DatasetConfig), "model" (ModelConfig's
hyper-parameters: TUNABLE), "train" (TrainConfig) and "wandb" (gcodefp_core.tracking). An unknown
section or field is refused, naming it. Environment settings are read in gcodefp_core.settings.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import tracking
from .fileio import check_known_fields, read_json

SECTIONS = ("data", "model", "train", "wandb")
# Validation metrics a run can monitor for early stopping and member selection (higher is better).
VALIDATION_METRICS = ("op_acc", "token_acc_tf", "token_acc_greedy", "exact_match", "word_acc", "decoder_exact_match",
                      "fingerprint_nn_acc")


@dataclass
class ModelConfig:
    n_continuous: int
    cardinalities: list[int]           # one per categorical feature ([] for side_channel)
    n_operations: int
    vocab_size: int
    window: int
    max_decode_len: int                # tokens after BOS, EOS included
    d_model: int = 128
    conv_blocks: int = 2               # each halves the time axis
    kernel_size: int = 3
    last_rows: int = 8                 # rows read by the direct last-rows path
    fourier_inputs: list[int] = field(default_factory=list)  # continuous columns (positions) to expand
    fourier_features: int = 128        # sin/cos pairs over fourier_inputs of the last rows (0 = off)
    fourier_scale: float = 10.0        # init std of their frequencies (radians per standard deviation)
    delta_scale: float = 0.0           # > 0: also feed the last rows' steps (row - previous row) of the
                                       # fourier_inputs, times this (the direction of motion; 0 = off)
    line_hidden: int = 0               # width of the line head's hidden layer (0 = d_model)
    # What the line head reads: "summary" (everything) or "controller" (only the last rows' controller
    # state: fourier_inputs, their Fourier features and steps, categorical state). With controller
    # state the line is a lookup of the position in the program; sensor cues that identify the
    # recording day only add ways to be wrong on an unseen run.
    line_source: str = "summary"
    line_rows: int = 0                 # rows the controller line head reads, the newest (0 = last_rows)
    variant_stats: bool = False        # the damaged-or-not head also reads per-channel window mean/std
    token_dim: int = 64
    fingerprint_dim: int = 128
    dropout: float = 0.1
    # Set from the dataset's LineTable (gcodefp_core.programs), not by hand:
    n_lines: int = 0                   # classes of the line head (0 = no line head)
    operation_program: list[int] = field(default_factory=list)  # program index per operation
    operation_variant: list[int] = field(default_factory=list)  # 1 = damaged variant of its program
    factorise_operations: bool = False  # op = program x variant (needs operation_program); training sets it

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        check_known_fields(d, cls, "model")
        cfg = cls(**d)
        if cfg.window <= cfg.last_rows or cfg.window % (2 ** cfg.conv_blocks):
            raise ValueError(f"model config: window {cfg.window} must be > last_rows ({cfg.last_rows}) "
                             f"and divisible by 2**conv_blocks ({2 ** cfg.conv_blocks})")
        if any(not 0 <= i < cfg.n_continuous for i in cfg.fourier_inputs):
            raise ValueError(f"model config: fourier_inputs must index the {cfg.n_continuous} continuous features")
        if (cfg.n_lines or cfg.factorise_operations) and len(cfg.operation_program) != cfg.n_operations:
            raise ValueError("model config: the line head and factorised operations need operation_program "
                             f"(one program index per operation, {cfg.n_operations})")
        if cfg.line_source not in ("summary", "controller") or (cfg.line_source == "controller" and not cfg.fourier_inputs):
            raise ValueError("model config: line_source must be 'summary' or 'controller' (which needs "
                             "controller inputs, i.e. the full feature set)")
        if not 0 <= cfg.line_rows <= cfg.last_rows:
            raise ValueError(f"model config: line_rows must be in [0, last_rows={cfg.last_rows}] (0 = last_rows)")
        if cfg.d_model < 8 or cfg.kernel_size % 2 == 0:
            raise ValueError("model config: d_model must be >= 8 and kernel_size odd")
        return cfg

    def to_dict(self) -> dict:
        return asdict(self)


# Hyper-parameters a config's "model" section may set (the rest come from the dataset).
TUNABLE = ("d_model", "conv_blocks", "kernel_size", "last_rows", "token_dim", "fingerprint_dim", "dropout",
           "fourier_features", "fourier_scale", "delta_scale", "line_hidden", "line_source", "line_rows", "variant_stats",
           "line_head")

@dataclass
class TrainConfig:
    epochs: int = 30
    batch_size: int = 256
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 200
    grad_clip: float = 1.0
    patience: int = 5                    # epochs without improvement of `monitor` before stopping
    monitor: str = "score"               # a validation metric, higher is better
    label_smoothing: float = 0.05
    # Augmentation against what changes between recording days rather than between operations:
    # each training window's sensor channels (currents and boards, never controller state) get one
    # random offset per channel, N(0, sensor_offset_std) in normalised units (board calibration and
    # mounting drift shift a channel's level for a whole session).
    sensor_offset_std: float = 0.0
    # Probability that a training window's categorical column is replaced by "unknown" (index 0), so
    # that index is trained: a controller state never seen in training (e.g. jogging after M30)
    # then reads as "state unknown" instead of an untrained random embedding.
    categorical_dropout: float = 0.0
    # Probability that a training window loses a whole sensor board (its channels set to the
    # training mean, exactly how a board a run did not record is filled). Which boards a run has
    # identifies its recording day (6 to 12 of 16 per run), not the operation; dropping boards at
    # random keeps the model from reading the presence pattern and teaches it to survive a dead board.
    board_dropout: float = 0.0
    samples_per_epoch: int | None = None  # windows per epoch (seeded subsample); None = all
    val_max_windows: int = 8000          # evenly spaced val windows scored every epoch
    tracker_streams: int | None = None   # validation streams the program tracker is tuned on (None: all, 2 per
                                         # validation run; a tiny model's tests need no more than 8)
    max_minutes: float | None = None     # stop (keeping the best checkpoint) after this long
    num_threads: int | None = None       # None = leave torch's setting alone
    # Where the training steps run ("cpu", "cuda", "cuda:1"). Validation and checkpoints stay on the
    # CPU, so a checkpoint is the same file wherever it was trained (the numbers differ slightly).
    device: str = "cpu"

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        check_known_fields(d, cls, "train")
        cfg = cls(**d)
        if cfg.epochs < 1 or cfg.batch_size < 1 or cfg.lr <= 0 or cfg.patience < 1:
            raise ValueError("train config: epochs, batch_size, patience must be >= 1 and lr > 0")
        if cfg.sensor_offset_std < 0 or not 0 <= cfg.categorical_dropout < 1 or not 0 <= cfg.board_dropout < 1:
            raise ValueError("train config: sensor_offset_std must be >= 0, categorical_dropout and board_dropout "
                             "in [0, 1)")
        if cfg.monitor not in ("score", "loss") + VALIDATION_METRICS:
            raise ValueError(f"train config: monitor {cfg.monitor!r} is not a validation metric")
        return cfg


TUNABLE_FIELDS = {"model": set(TUNABLE), "train": set(TrainConfig.__dataclass_fields__)}   # `train --set`


def load_config(path: Path | str) -> dict:
    path = Path(path)
    cfg = read_json(path, "config")
    validate_config(cfg, str(path))
    return cfg


def validate_config(cfg: dict, where: str = "config") -> None:
    from .dataset import DatasetConfig

    unknown = sorted(set(cfg) - set(SECTIONS))
    if unknown:
        raise ValueError(f"{where}: unknown section(s) {unknown}; known: {list(SECTIONS)}")
    DatasetConfig.from_dict(cfg.get("data", {}))
    bad = sorted(set(cfg.get("model", {})) - set(TUNABLE))
    if bad:
        raise ValueError(f"{where}: model: unknown field(s) {bad}; known: {list(TUNABLE)}")
    TrainConfig.from_dict(cfg.get("train", {}))
    tracking.validate_config(cfg.get("wandb", {}))
