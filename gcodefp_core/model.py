"""The fingerprinting model: a convolutional sensor encoder and a GRU + attention G-code decoder.

Built for fast batch-1 CPU inference after ONNX export (budget: encode + decode one line <= 2 ms):
- `encode(continuous, categorical) -> (memory, op_logits, fingerprint, h0)` and
  `decode_step(tokens, h, memory) -> (logits, h)` are separate tensor-only methods, so each exports
  as its own graph with a dynamic batch axis and the runtime drives the (<= 6 step) loop itself.
- The encoder is a short strided Conv1d stack (64 -> 16 steps), cheap and export-friendly; a direct
  path reads the window's last rows (plus learned Fourier features of their positions, when the
  feature set has them), because the target is the line active at the last row.
- `greedy_decode` is encode + the unrolled greedy loop in one graph: one runtime call per prediction.
- The decoder is one GRU cell with dot-product attention over 17 memory slots: a step is a handful
  of small matmuls, and the tokenizer is word-level, so a line takes at most 6 steps.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .fileio import check_known_fields


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
    token_dim: int = 64
    fingerprint_dim: int = 128
    dropout: float = 0.1

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        check_known_fields(d, cls, "model")
        cfg = cls(**d)
        if cfg.window < cfg.last_rows or cfg.window % (2 ** cfg.conv_blocks):
            raise ValueError(f"model config: window {cfg.window} must be >= last_rows ({cfg.last_rows}) "
                             f"and divisible by 2**conv_blocks ({2 ** cfg.conv_blocks})")
        if any(not 0 <= i < cfg.n_continuous for i in cfg.fourier_inputs):
            raise ValueError(f"model config: fourier_inputs must index the {cfg.n_continuous} continuous features")
        if cfg.d_model < 8 or cfg.kernel_size % 2 == 0:
            raise ValueError("model config: d_model must be >= 8 and kernel_size odd")
        return cfg

    def to_dict(self) -> dict:
        return asdict(self)


# Hyper-parameters a config's "model" section may set (the rest come from the dataset).
TUNABLE = ("d_model", "conv_blocks", "kernel_size", "last_rows", "token_dim", "fingerprint_dim", "dropout",
           "fourier_features", "fourier_scale")


class ConvBlock(nn.Module):
    """Strided conv (halves time) + residual conv, channels-first."""

    def __init__(self, d: int, k: int, dropout: float):
        super().__init__()
        self.down = nn.Conv1d(d, d, k, stride=2, padding=k // 2)
        self.conv = nn.Conv1d(d, d, k, padding=k // 2)
        self.norm = nn.BatchNorm1d(d)    # folds into the convs at export time
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.down(x))
        return x + self.drop(F.gelu(self.norm(self.conv(x))))


class GCodeFingerprintModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.input_proj = nn.Linear(cfg.n_continuous, d)
        # One table for all categorical columns: column j's codes live at offset[j] + code.
        self.cat_embed = nn.Embedding(sum(cfg.cardinalities), d) if cfg.cardinalities else None
        offsets = np.concatenate([[0], np.cumsum(cfg.cardinalities)[:-1]]) if cfg.cardinalities else np.zeros(0)
        self.register_buffer("cat_offsets", torch.as_tensor(offsets, dtype=torch.long), persistent=False)
        self.blocks = nn.Sequential(*[ConvBlock(d, cfg.kernel_size, cfg.dropout) for _ in range(cfg.conv_blocks)])
        # Learned Fourier features of the last rows: the active line is a sharp function of the
        # position (neighbouring lines differ by fractions of a standard deviation), which a plain
        # linear+GELU path resolves only after many epochs.
        n_fourier = cfg.fourier_features if cfg.fourier_inputs else 0
        self.fourier = nn.Linear(len(cfg.fourier_inputs), n_fourier, bias=False) if n_fourier else None
        if self.fourier is not None:
            nn.init.normal_(self.fourier.weight, std=cfg.fourier_scale)
        self.register_buffer("fourier_index", torch.as_tensor(cfg.fourier_inputs, dtype=torch.long), persistent=False)
        per_row = d + 2 * n_fourier
        self.last_proj = nn.Sequential(nn.Linear(cfg.last_rows * per_row, d), nn.GELU(), nn.Linear(d, d))
        self.summary = nn.Sequential(nn.Linear(2 * d, d), nn.GELU(), nn.Dropout(cfg.dropout), nn.Linear(d, d))
        self.op_head = nn.Linear(d, cfg.n_operations)
        self.fp_head = nn.Linear(d, cfg.fingerprint_dim)
        self.h0_proj = nn.Linear(d, d)
        # Training-only cosine-classifier "proxies", one unit direction per operation, that shape the
        # fingerprint space (see train.compute_loss); not part of any exported graph.
        self.fp_proxies = nn.Parameter(torch.randn(cfg.n_operations, cfg.fingerprint_dim) * 0.1)
        # Decoder: GRU over token embeddings, Luong attention over the memory, then a small MLP.
        self.token_embed = nn.Embedding(cfg.vocab_size, cfg.token_dim)
        self.gru = nn.GRUCell(cfg.token_dim, d)
        self.attn_out = nn.Linear(2 * d, d)
        # Output logits reuse the token embedding (weight tying): the vocabulary matrix is the one
        # big read per step, and a token_dim-wide one halves it (and regularises rare words).
        self.out_proj = nn.Linear(d, cfg.token_dim)
        self.out_bias = nn.Parameter(torch.zeros(cfg.vocab_size))
        self.drop = nn.Dropout(cfg.dropout)

    def encode(self, continuous: torch.Tensor, categorical: torch.Tensor):
        """continuous [B,W,F] float, categorical [B,W,C] int64 ->
        memory [B,T'+1,D], op_logits [B,ops], fingerprint [B,fp] (unit norm), h0 [B,D]."""
        x = self.input_proj(continuous)
        if self.cat_embed is not None:
            x = x + self.cat_embed(categorical + self.cat_offsets).sum(dim=2)
        x = F.gelu(x)
        last = x[:, -self.cfg.last_rows:, :]
        if self.fourier is not None:
            z = self.fourier(continuous[:, -self.cfg.last_rows:, :].index_select(2, self.fourier_index))
            last = torch.cat([last, torch.sin(z), torch.cos(z)], dim=2)
        last = last.flatten(1)
        conv = self.blocks(x.transpose(1, 2)).transpose(1, 2)               # [B, T', D]
        summary = self.summary(torch.cat([conv.mean(dim=1), self.last_proj(last)], dim=1))
        memory = torch.cat([summary.unsqueeze(1), conv], dim=1)
        fingerprint = F.normalize(self.fp_head(summary), dim=-1)
        return memory, self.op_head(summary), fingerprint, torch.tanh(self.h0_proj(summary))

    def decode_step(self, tokens: torch.Tensor, h: torch.Tensor, memory: torch.Tensor):
        """tokens [B] int64 (previous token), h [B,D], memory [B,T,D] -> logits [B,V], new h [B,D]."""
        h = self.gru(self.drop(self.token_embed(tokens)), h)
        scores = torch.bmm(memory, h.unsqueeze(2)).squeeze(2) * (memory.shape[-1] ** -0.5)
        context = torch.bmm(torch.softmax(scores, dim=1).unsqueeze(1), memory).squeeze(1)
        out = torch.tanh(self.attn_out(torch.cat([h, context], dim=1)))
        logits = F.linear(self.out_proj(self.drop(out)), self.token_embed.weight, self.out_bias)
        return logits, h

    def greedy_decode(self, continuous: torch.Tensor, categorical: torch.Tensor, bos: int = 1, eos: int = 2, pad: int = 0):
        """Whole prediction in one graph: encode + max_decode_len unrolled greedy steps ->
        tokens [B, max_decode_len] (w1 .. EOS PAD ..), op_logits, fingerprint. Exported as one ONNX
        graph, a batch-1 prediction is a single runtime call (per-call overhead dominates otherwise)."""
        memory, op_logits, fingerprint, h = self.encode(continuous, categorical)
        prev = torch.full_like(op_logits[:, 0], bos, dtype=torch.long)
        done = torch.zeros_like(prev, dtype=torch.bool)
        out = []
        for _ in range(self.cfg.max_decode_len):
            logits, h = self.decode_step(prev, h, memory)
            tok = torch.where(done, torch.full_like(prev, pad), logits.argmax(dim=-1))
            done = done | (tok == eos)
            out.append(tok)
            prev = torch.where(done, torch.full_like(prev, eos), tok)
        return torch.stack(out, dim=1), op_logits, fingerprint

    def forward(self, continuous, categorical, tokens):
        """Teacher forcing. tokens [B,L] (BOS .. EOS PAD) -> token logits [B,L-1,V], op logits, fingerprint."""
        memory, op_logits, fingerprint, h = self.encode(continuous, categorical)
        steps = []
        for t in range(tokens.shape[1] - 1):
            logits, h = self.decode_step(tokens[:, t], h, memory)
            steps.append(logits)
        return torch.stack(steps, dim=1), op_logits, fingerprint


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class TorchStep:
    """A numpy `decoding.StepFn` backed by the PyTorch model (state: {"h", "memory"})."""

    def __init__(self, model: GCodeFingerprintModel):
        self.model = model

    def initial_state(self, continuous: np.ndarray, categorical: np.ndarray):
        """-> (state, op_logits [B,ops], fingerprint [B,fp]) as numpy."""
        with torch.no_grad():
            memory, op_logits, fp, h0 = self.model.encode(torch.as_tensor(continuous), torch.as_tensor(categorical))
        return {"h": h0.numpy(), "memory": memory.numpy()}, op_logits.numpy(), fp.numpy()

    def __call__(self, tokens: np.ndarray, state: dict) -> tuple[np.ndarray, dict]:
        with torch.no_grad():
            logits, h = self.model.decode_step(torch.as_tensor(tokens, dtype=torch.long),
                                               torch.as_tensor(state["h"]), torch.as_tensor(state["memory"]))
        return logits.numpy(), {"h": h.numpy(), "memory": state["memory"]}


def build_model(cfg: ModelConfig | dict) -> GCodeFingerprintModel:
    return GCodeFingerprintModel(cfg if isinstance(cfg, ModelConfig) else ModelConfig.from_dict(cfg))


def load_checkpoint(path, map_location="cpu") -> tuple[GCodeFingerprintModel, dict]:
    """Load a checkpoint written by gcodefp_core.train (weights_only: no pickled code) -> (model in eval mode, ckpt)."""
    from pathlib import Path

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # a truncated or foreign file
        raise ValueError(f"{path}: not a readable checkpoint ({type(exc).__name__}: {exc})") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "model_config" not in ckpt:
        raise ValueError(f"{path}: not a gcodefp checkpoint (missing state_dict/model_config)")
    model = build_model(ckpt["model_config"])
    model.load_state_dict(ckpt["state_dict"])
    model.eval()
    return model, ckpt
