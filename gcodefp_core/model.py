"""The fingerprinting model: a convolutional sensor encoder and a GRU + attention G-code decoder.

Built for fast batch-1 CPU inference after ONNX export (budget: encode + decode one line <= 2 ms):
- `encode(continuous, categorical) -> (memory, op_logits, fingerprint, h0)` and
  `decode_step(tokens, h, memory) -> (logits, h)` are separate tensor-only methods, so each exports
  as its own graph with a dynamic batch axis and the runtime drives the (<= 6 step) loop itself.
- The encoder is a short strided Conv1d stack (64 -> 16 steps), cheap and export-friendly; a direct
  path reads the window's last rows (plus learned Fourier features of their positions, when the
  feature set has them), because the target is the line active at the last row.
- The decoder is one GRU cell with dot-product attention over 17 memory slots: a step is a handful
  of small matmuls, and the tokenizer is word-level, so a line takes at most 6 steps.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig

# Masked-out line logits: a large finite value, not -inf (quantizers and softmax choke on infinities).
MASKED = -1e4
VARIANT_FLOOR = -1e4  # log p(variant | program) never below this: finite for any input


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
        # Floored: an exported LogSigmoid of a far-off logit (an out-of-range window) is -inf, and
        # -inf x 0 for the operations without a variant would be NaN in every answer.
        variant = F.logsigmoid(self.variant_head(variant_in) * self.op_variant_sign).clamp(min=VARIANT_FLOOR)
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
        line [B] int64, line_confidence [B] (softmax within the program), op_logits, fingerprint, and
        line_logits [B, n_lines]: the line head's own scores over every line, unrestricted (the
        program tracker weighs every line against every program position itself)."""
        enc = self.summarise(continuous, categorical)
        op_logits, line_logits = self.heads(enc)
        allowed = self.allowed_lines(op_logits.argmax(dim=-1))
        scores = torch.where(allowed, line_logits, torch.full_like(allowed, MASKED, dtype=line_logits.dtype))
        probs = torch.softmax(scores, dim=-1)
        confidence, line = probs.max(dim=-1)
        return line, confidence, op_logits, F.normalize(self.fp_head(enc.summary), dim=-1), line_logits

    def decode_step(self, tokens: torch.Tensor, h: torch.Tensor, memory: torch.Tensor):
        """tokens [B] int64 (previous token), h [B,D], memory [B,T,D] -> logits [B,V], new h [B,D]."""
        h = self.gru(self.drop(self.token_embed(tokens)), h)
        scores = torch.bmm(memory, h.unsqueeze(2)).squeeze(2) * (memory.shape[-1] ** -0.5)
        context = torch.bmm(torch.softmax(scores, dim=1).unsqueeze(1), memory).squeeze(1)
        out = torch.tanh(self.attn_out(torch.cat([h, context], dim=1)))
        logits = F.linear(self.out_proj(self.drop(out)), self.token_embed.weight, self.out_bias)
        return logits, h

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
