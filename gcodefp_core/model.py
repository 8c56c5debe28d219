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
from typing import NamedTuple

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
    factorise_operations: bool = False  # op = program x variant (needs operation_program)

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
           "line_head", "line_classes", "factorise_operations")
# Masked-out line logits: a large finite value, not -inf (quantizers and softmax choke on infinities).
MASKED = -1e4


class Encoded(NamedTuple):
    summary: torch.Tensor
    conv: torch.Tensor
    line_input: torch.Tensor
    stats: torch.Tensor | None


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
        n_delta = len(cfg.fourier_inputs) if cfg.delta_scale > 0 else 0
        per_row = d + 2 * n_fourier + n_delta
        self.last_proj = nn.Sequential(nn.Linear(cfg.last_rows * per_row, d), nn.GELU(), nn.Linear(d, d))
        self.summary = nn.Sequential(nn.Linear(2 * d, d), nn.GELU(), nn.Dropout(cfg.dropout), nn.Linear(d, d))
        programs = cfg.operation_program or list(range(cfg.n_operations))
        n_programs = max(programs) + 1
        self.register_buffer("op_program", torch.as_tensor(programs, dtype=torch.long), persistent=False)
        if cfg.factorise_operations:
            # log p(op) = log p(program) + log p(variant | program): the variant logit ("damaged?")
            # is shared by every program that has a damaged variant.
            self.program_head = nn.Linear(d, n_programs)
            if cfg.variant_stats:  # window mean and std of every continuous channel
                self.stats_proj = nn.Sequential(nn.Linear(2 * cfg.n_continuous, d), nn.GELU())
            self.variant_head = nn.Linear(2 * d if cfg.variant_stats else d, 1)
            counts = np.bincount(programs, minlength=n_programs)
            has_variant = [float(counts[p] > 1) for p in programs]
            sign = [1.0 if v else -1.0 for v in (cfg.operation_variant or [0] * cfg.n_operations)]
            self.register_buffer("op_has_variant", torch.tensor(has_variant), persistent=False)
            self.register_buffer("op_variant_sign", torch.tensor(sign), persistent=False)
        else:
            self.op_head = nn.Linear(d, cfg.n_operations)
        if cfg.n_lines:
            # The line head: which line of the (known) program is active at the window's last row.
            hidden = cfg.line_hidden or d
            if cfg.line_source == "controller":
                n_in = len(cfg.fourier_inputs)
                per_ctrl_row = n_in + 2 * n_fourier + n_delta + (d if cfg.cardinalities else 0)
                n_rows = cfg.line_rows or cfg.last_rows
                self.line_head = nn.Sequential(nn.Linear(n_rows * per_ctrl_row, hidden), nn.GELU(),
                                               nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, cfg.n_lines))
            else:
                self.line_head = nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, cfg.n_lines))
            # Which lines each program has, 1.0 / 0.0 (filled from the LineTable by set_line_mask; saved
            # with the weights). Float, not bool: casting a bool constant in-graph trips the fp16 converter.
            self.register_buffer("line_mask", torch.ones(n_programs, cfg.n_lines))
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

    def set_line_mask(self, mask) -> None:
        """mask [programs, n_lines] bool (LineTable.mask)."""
        self.line_mask.copy_(torch.as_tensor(np.asarray(mask), dtype=torch.float32))

    def allowed_lines(self, op_index: torch.Tensor) -> torch.Tensor:
        """op_index [B] -> bool [B, n_lines]: the lines of each operation's program."""
        return self.line_mask.index_select(0, self.op_program.index_select(0, op_index)) > 0.5

    def heads(self, enc: "Encoded"):
        """-> op_logits [B,ops], line_logits [B,n_lines] (None without a line head).
        With factorise_operations the op scores are log-probabilities (softmax-invariant):
        log p(op) = log p(program) + log p(variant | program), and when there is a line head the
        program is judged by both the program head and the line head's mass on each program's lines
        (a product of experts): with controller state the line is a near-exact position lookup, far
        more reliable than sensor-level cues that also identify the recording day."""
        summary = enc.summary
        line_logits = self.line_head(enc.line_input) if self.cfg.n_lines else None
        if not self.cfg.factorise_operations:
            return self.op_head(summary), line_logits
        program = self.program_head(summary)
        if line_logits is not None:
            # A broadcast product, not a MatMul: quantizers would store an int8 copy of the 0/1 mask.
            mass = (torch.softmax(line_logits, dim=-1).unsqueeze(1) * self.line_mask).sum(dim=-1)
            program = program + torch.log(mass + 1e-4)
        program = torch.log_softmax(program, dim=-1).index_select(1, self.op_program)
        variant_in = torch.cat([summary, self.stats_proj(enc.stats)], dim=1) if self.cfg.variant_stats else summary
        variant = F.logsigmoid(self.variant_head(variant_in) * self.op_variant_sign)
        return program + variant * self.op_has_variant, line_logits

    def summarise(self, continuous: torch.Tensor, categorical: torch.Tensor) -> "Encoded":
        """-> Encoded: summary [B,D] (what most heads read), conv [B,T',D] (the decoder's memory
        slots), line_input (the line head's input), stats [B,2F] (window mean/std, or None)."""
        rows = self.cfg.last_rows
        x = self.input_proj(continuous)
        cat = self.cat_embed(categorical + self.cat_offsets).sum(dim=2) if self.cat_embed is not None else None
        if cat is not None:
            x = x + cat
        x = F.gelu(x)
        extra, pos = [], None  # per-row controller features of the last rows
        if self.cfg.fourier_inputs:
            pos = continuous[:, -rows - 1:, :].index_select(2, self.fourier_index)
        if self.fourier is not None:
            z = self.fourier(pos[:, 1:])
            extra += [torch.sin(z), torch.cos(z)]
        if pos is not None and self.cfg.delta_scale > 0:
            # Where the tool is heading tells apart lines that pass through the same point.
            extra.append((pos[:, 1:] - pos[:, :-1]) * self.cfg.delta_scale)
        last = torch.cat([x[:, -rows:, :]] + extra, dim=2).flatten(1)
        conv = self.blocks(x.transpose(1, 2)).transpose(1, 2)               # [B, T', D]
        summary = self.summary(torch.cat([conv.mean(dim=1), self.last_proj(last)], dim=1))
        line_input = summary
        if self.cfg.line_source == "controller":
            ctrl = [pos[:, 1:]] + extra + ([cat[:, -rows:, :]] if cat is not None else [])
            line_input = torch.cat(ctrl, dim=2)[:, -(self.cfg.line_rows or rows):].flatten(1)
        stats = None
        if self.cfg.variant_stats:
            mean = continuous.mean(dim=1)
            stats = torch.cat([mean, (continuous - mean.unsqueeze(1)).square().mean(dim=1).sqrt()], dim=1)
        return Encoded(summary, conv, line_input, stats)

    def encode(self, continuous: torch.Tensor, categorical: torch.Tensor):
        """continuous [B,W,F] float, categorical [B,W,C] int64 ->
        memory [B,T'+1,D], op_logits [B,ops], fingerprint [B,fp] (unit norm), h0 [B,D]."""
        enc = self.summarise(continuous, categorical)
        memory = torch.cat([enc.summary.unsqueeze(1), enc.conv], dim=1)
        fingerprint = F.normalize(self.fp_head(enc.summary), dim=-1)
        return memory, self.heads(enc)[0], fingerprint, torch.tanh(self.h0_proj(enc.summary))

    def predict_line(self, continuous: torch.Tensor, categorical: torch.Tensor):
        """The whole prediction without a decoding loop: the active line as a class of the line table,
        among the lines of the predicted operation's program ->
        line [B] int64, line_confidence [B] (softmax within the program), op_logits, fingerprint."""
        enc = self.summarise(continuous, categorical)
        op_logits, line_logits = self.heads(enc)
        allowed = self.allowed_lines(op_logits.argmax(dim=-1))
        scores = torch.where(allowed, line_logits, torch.full_like(allowed, MASKED, dtype=line_logits.dtype))
        probs = torch.softmax(scores, dim=-1)
        confidence, line = probs.max(dim=-1)
        return line, confidence, op_logits, F.normalize(self.fp_head(enc.summary), dim=-1)

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
        """Teacher forcing. tokens [B,L] (BOS .. EOS PAD) -> token logits [B,L-1,V], op logits,
        fingerprint, line logits [B,n_lines] (unmasked; None without a line head)."""
        enc = self.summarise(continuous, categorical)
        memory = torch.cat([enc.summary.unsqueeze(1), enc.conv], dim=1)
        h = torch.tanh(self.h0_proj(enc.summary))
        steps = []
        for t in range(tokens.shape[1] - 1):
            logits, h = self.decode_step(tokens[:, t], h, memory)
            steps.append(logits)
        op_logits, line_logits = self.heads(enc)
        return torch.stack(steps, dim=1), op_logits, F.normalize(self.fp_head(enc.summary), dim=-1), line_logits


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
    if "line_table" in ckpt:
        from .programs import LineTable

        model.line_table = LineTable.from_dict(ckpt["line_table"])
    if ckpt.get("program_path"):
        from .program_path import ProgramPath

        model.program_path = ProgramPath.from_dict(ckpt["program_path"])
    if "program_clock" in ckpt:
        from .stream import ProgramClock

        model.program_clock = ProgramClock.from_dict(ckpt["program_clock"])
    model.eval()
    return model, ckpt
