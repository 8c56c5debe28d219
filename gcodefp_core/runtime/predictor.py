"""Serving-time inference over an exported model: onnxruntime + numpy only (never torch).

An export is a `model.json` (gcodefp_core.runtime.bundle) beside its graph files:
    predict       continuous, categorical -> line [B] i64, line_confidence [B], op_logits, fingerprint
                  (+ line_logits [B, n_lines], the unrestricted line scores the program tracker reads;
                  exports made before the tracker lack them)
    encoder       continuous [B,W,F] f32, categorical [B,W,C] i64 -> memory, op_logits, fingerprint, h0
    decoder       tokens [B] i64, h [B,H] f32, memory [B,T,D] f32  -> logits [B,V], h_next [B,H]
    encoder_only  continuous, categorical -> op_logits, fingerprint
The `predict` graph (models with a line head) is the default answer: one call, no decoding loop;
`line` indexes the bundle's line table (the training runs' lines), restricted in-graph to the
predicted operation's program, then snapped onto the program's tool path where the model has one.
The encoder and decoder graphs serve method="greedy" | "beam" | "sample": decoding.py drives the
decoder step by step and stops when every line has emitted EOS.

Hot path: sessions, their input names and the session options are resolved once at load time. The
feed dict is built per call on purpose: the FastAPI server calls one predictor from several
threads, and onnxruntime sessions are thread-safe while a shared feed dict is not.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..variants import REFERENCE, VARIANTS
from . import decoding
from .bundle import ModelBundle, read_model_json
from .clock import ProgramClock, StreamTracker

METHODS = ("line", "greedy", "beam", "sample")


def session_options(intra_op_threads: int = 1, variant: str = REFERENCE):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = intra_op_threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # Spinning threads steal the second core from concurrent requests (measured: worse p99).
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL
                                   if VARIANTS[variant].full_graph_optimization
                                   else ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED)
    so.log_severity_level = 3
    return so


class OnnxPredictor:
    """Predictions from an exported model; one instance serves concurrent callers."""

    def __init__(self, metadata: dict, folder: Path, intra_op_threads: int = 1, providers: list[str] | None = None,
                 bundle: ModelBundle | None = None):
        import onnxruntime as ort

        self.metadata, self.folder = metadata, Path(folder)
        self.bundle = bundle or ModelBundle.from_dict(metadata, str(self.folder / "model.json"))
        self.variant: str = metadata["variant"]
        self.features, self.tokenizer = self.bundle.features, self.bundle.tokenizer
        self.operations: list[str] = self.bundle.operations
        self.window, self.max_tokens = self.bundle.window, self.bundle.max_tokens
        so = session_options(intra_op_threads, self.variant)
        providers = providers or ["CPUExecutionProvider"]
        self.sessions = {name: ort.InferenceSession(str(self.folder / file), so, providers=providers)
                         for name, file in metadata["files"].items()}
        self._inputs = {name: {i.name for i in s.get_inputs()} for name, s in self.sessions.items()}
        self._skip = {decoding.PAD, decoding.BOS}
        self._fixed_batch = metadata.get("batch_size")  # None: dynamic batch axis
        table = self.bundle.line_table
        self.lines: list[str] = list(table.lines) if table else []
        if "predict" in self.sessions and not self.lines:
            raise ValueError(f"{self.folder}: model.json has a predict graph but no line_table")
        # Each line's token ids (w1 .. EOS PAD ..), so a line-head answer looks like a decoded one.
        self._line_tokens = np.full((len(self.lines), self.max_tokens), decoding.PAD, np.int64)
        for i, line in enumerate(self.lines):
            ids = self.tokenizer.encode(line)[1:self.max_tokens + 1]  # drop BOS
            self._line_tokens[i, :len(ids)] = ids
        self._line_answers: dict[int, tuple] = {}  # line index -> (gcode, tokens, token ids), filled on first use
        self.default_method = "line" if "predict" in self.sessions else "greedy"
        self.program_clock = self.bundle.program_clock        # streaming mode; None for older exports
        # The program tracker weighs the predict graph's line_logits: a package whose graph lacks them
        # (exported before the tracker) streams with the clock.
        outputs = {o.name for o in self.sessions["predict"].get_outputs()} if "predict" in self.sessions else set()
        self.program_tracker = self.bundle.program_tracker if "line_logits" in outputs else None
        # Snapping onto the program's tool path: models with positions only. The lookup grid is built now,
        # at load, not on the first request.
        self.program_path = self.bundle.program_path.prepare() if self.bundle.program_path else None
        self._operation_program = np.asarray(self.bundle.operation_program, np.int64)
        if "predict" in self.sessions and len(self._operation_program) != len(self.operations):
            raise ValueError(f"{self.folder}: model.json line_table.operation_program must give a program for each "
                             f"of the {len(self.operations)} operations, has {len(self._operation_program)}")

    @classmethod
    def load(cls, path: str | Path, intra_op_threads: int = 1, providers: list[str] | None = None) -> "OnnxPredictor":
        meta, bundle, meta_path = read_model_json(path)
        return cls(meta, meta_path.parent, intra_op_threads, providers, bundle)

    @property
    def can_decode(self) -> bool:
        """Whether this model can produce G-code (a line head or a decoder)."""
        return "predict" in self.sessions or "decoder" in self.sessions

    def methods(self) -> list[str]:
        return [m for m in METHODS if (m == "line" and "predict" in self.sessions)
                or (m != "line" and "decoder" in self.sessions)]

    def stream_tracker(self) -> StreamTracker:
        """A fresh tracker for one machine's program run (feed it predict_lines answers in row order)."""
        if "predict" not in self.sessions:
            raise ValueError(f"{self.folder}: streaming needs a model with a line head (a predict graph)")
        return StreamTracker(self.program_clock or ProgramClock.empty(), self._operation_program)

    def predict_lines(self, continuous: np.ndarray, categorical: np.ndarray | None = None,
                      snap: bool = True) -> dict[str, np.ndarray]:
        """The predict graph -> line [B] (index into self.lines), line_confidence, op_logits, fingerprint
        (+ line_logits when the graph has them, unchanged by snapping).
        With a program path (and snap), the line is snapped onto the predicted program's tool path where
        the last row's position lies on it (confidence 1.0 there, and `on_path` [B] says where);
        snap=False gives the graph's own."""
        sess = self.sessions["predict"]
        feeds = self._window_feeds("predict", continuous, categorical)
        out = dict(zip((o.name for o in sess.get_outputs()), sess.run(None, feeds)))
        if snap and self.program_path is not None:
            program = self._operation_program[out["op_logits"].argmax(1)]
            out["line"], out["line_confidence"], out["on_path"] = self.program_path.snap(
                program, feeds["continuous"][:, -1], out["line"], out["line_confidence"])
        else:
            out["on_path"] = np.zeros(len(out["line"]), bool)
        return out

    # ---- array level ----------------------------------------------------------------------------
    def _window_feeds(self, graph: str, continuous: np.ndarray, categorical: np.ndarray | None) -> dict:
        cont = np.ascontiguousarray(continuous, dtype=np.float32)
        if cont.ndim != 3 or cont.shape[1] != self.window or cont.shape[2] != len(self.features.continuous):
            raise ValueError(f"continuous: expected shape [B, {self.window}, {len(self.features.continuous)}], "
                             f"got {list(cont.shape)}")
        if self._fixed_batch and cont.shape[0] != self._fixed_batch:
            raise ValueError(f"this model was exported for batches of exactly {self._fixed_batch} windows, "
                             f"got {cont.shape[0]}")
        feeds = {"continuous": cont}
        if "categorical" in self._inputs[graph]:  # absent for feature sets without categorical columns
            if categorical is None:
                if self.features.categorical:
                    raise ValueError(f"categorical: required ({len(self.features.categorical)} columns: "
                                     f"{', '.join(self.features.categorical)})")
                categorical = np.zeros((cont.shape[0], self.window, 0), np.int64)
            cat = np.ascontiguousarray(categorical, dtype=np.int64)
            if cat.shape != (cont.shape[0], self.window, len(self.features.categorical)):
                raise ValueError(f"categorical: expected shape [{cont.shape[0]}, {self.window}, "
                                 f"{len(self.features.categorical)}], got {list(cat.shape)}")
            feeds["categorical"] = cat
        return feeds

    def encode(self, continuous: np.ndarray, categorical: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Normalised inputs -> op_logits, fingerprint (+ memory, h0 when the model has a decoder)."""
        graph = "encoder" if "encoder" in self.sessions else "encoder_only"
        sess = self.sessions[graph]
        out = sess.run(None, self._window_feeds(graph, continuous, categorical))
        return dict(zip((o.name for o in sess.get_outputs()), out))

    def fingerprint(self, continuous: np.ndarray, categorical: np.ndarray | None = None) -> np.ndarray:
        graph = "encoder_only" if "encoder_only" in self.sessions else "encoder"
        return self.sessions[graph].run(["fingerprint"], self._window_feeds(graph, continuous, categorical))[0]

    def step(self, tokens: np.ndarray, state: dict) -> tuple[np.ndarray, dict]:
        """A decoding.StepFn over the decoder graph (state: h, memory)."""
        logits, h = self.sessions["decoder"].run(["logits", "h_next"],
                                                 {"tokens": tokens, "h": state["h"], "memory": state["memory"]})
        return logits, {"h": h, "memory": state["memory"]}

    def predict_arrays(self, continuous: np.ndarray, categorical: np.ndarray | None = None, method: str | None = None,
                       beam_width: int = 4, temperature: float = 1.0, max_length: int | None = None,
                       seed: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """-> (tokens [B, L] int64 after BOS: w1 .. EOS PAD .., op_logits [B, ops], fingerprint [B, E]).
        method None = the model's default ("line" when it has a line head, else "greedy")."""
        tokens, op_logits, fp, _ = self._predict(continuous, categorical, method, beam_width, temperature,
                                                 max_length, seed)
        return tokens, op_logits, fp

    def _predict(self, continuous, categorical, method, beam_width, temperature, max_length, seed):
        """predict_arrays plus the line head's answer (line index, confidence) or None."""
        method = method or self.default_method
        if not self.can_decode:
            raise ValueError(f"{self.folder}: an encoder-only model cannot decode G-code")
        if method not in self.methods():
            raise ValueError(f"method: {method!r} is not available for this model; choose one of "
                             f"{', '.join(self.methods())}")
        limit = self.max_tokens if max_length is None else int(max_length)
        if not 1 <= limit <= self.max_tokens:
            raise ValueError(f"max_length must be in 1..{self.max_tokens}, got {max_length}")
        if method == "line":
            out = self.predict_lines(continuous, categorical)
            line = out["line"]
            return (self._line_tokens[line, :limit], out["op_logits"], out["fingerprint"],
                    (line, out["line_confidence"], out["on_path"]))
        enc = self.encode(continuous, categorical)
        state, n = {"h": enc["h0"], "memory": enc["memory"]}, len(enc["h0"])
        if method == "beam":
            tokens = decoding.beam_search(self.step, state, n, limit, beam_width=beam_width)[0]
        elif method == "sample":
            tokens = decoding.sample(self.step, state, n, limit, temperature=temperature, seed=seed or 0)
        else:
            tokens = decoding.greedy(self.step, state, n, limit)
        return tokens, enc["op_logits"], enc["fingerprint"], None

    # ---- request level ----------------------------------------------------------------------------
    def predict(self, continuous: np.ndarray, categorical: np.ndarray | None = None, method: str | None = None,
                beam_width: int = 4, temperature: float = 1.0, max_length: int | None = None,
                seed: int | None = None) -> list[dict]:
        """Normalised windows -> one dict per window: gcode, tokens, token_ids, operation,
        operation_confidence, fingerprint, method (+ line_confidence and line_source, "path" or "model", for the line head)."""
        method = method or self.default_method
        tokens, op_logits, fp, line = self._predict(continuous, categorical, method, beam_width, temperature,
                                                    max_length, seed)
        z = op_logits - op_logits.max(axis=1, keepdims=True)
        probs = np.exp(z)
        probs /= probs.sum(axis=1, keepdims=True)
        best = probs.argmax(axis=1)
        out = []
        whole_lines = line is not None and max_length is None
        for i, (row, op, p, f) in enumerate(zip(tokens.tolist(), best.tolist(), probs, fp.tolist())):
            gcode, toks, ids = self._line_answer(int(line[0][i])) if whole_lines else self._decoded(row)
            item = {"gcode": gcode, "tokens": list(toks), "token_ids": list(ids), "method": method,
                    "operation": self.operations[op], "operation_confidence": float(p[op]), "fingerprint": f}
            if line is not None:  # the table's text itself (identical to decoding its tokens unless truncated)
                item["line_confidence"] = float(line[1][i])
                # "path": the position lies on the program's tool path, which named the line; "model": the line head.
                item["line_source"] = "path" if line[2][i] else "model"
            out.append(item)
        return out

    def _decoded(self, row: list[int]) -> tuple[str, list[str], list[int]]:
        ids = []
        for t in row:
            if t == decoding.EOS:
                break
            if t not in self._skip:
                ids.append(t)
        return self.tokenizer.decode(ids), self.tokenizer.tokens(ids), ids

    def _line_answer(self, line: int) -> tuple[str, tuple, tuple]:
        """A line-head answer (the table's text itself, its tokens), decoded once per line, not per request."""
        hit = self._line_answers.get(line)
        if hit is None:
            _, toks, ids = self._decoded(self._line_tokens[line].tolist())
            hit = self._line_answers[line] = (self.lines[line], tuple(toks), tuple(ids))
        return hit
