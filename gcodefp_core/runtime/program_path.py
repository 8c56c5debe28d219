"""The program path: snap a window's last position onto the known tool path of its program.

With controller state (the `full` feature set) the active line is, in principle, geometry: each
program is fixed, a motion line moves the tool from the previous line's end point to its own, and a
status report names the line whose segment the tool is on. A learned head gets this only roughly
(neighbouring lines of an adaptive program end 0.2 mm apart, and the tool reports a line while
sitting within hundredths of a millimetre of its end point), so the model misses where a lookup is
exact. The path supplies that lookup:

- built from the *training* runs: per program, the lines they executed in line-number order, each
  with its end point (the X/Y/Z words of its text, in millimetres; an axis the line does not name
  stays where the training runs saw it while that line ran); G2/G3 arcs are followed as chords;
- `snap`: when the last row's position lies within `tolerance_mm` of a segment (the previous
  executed line's end point -> this line's end point), that segment's line is the answer, with
  confidence 1.0; anywhere else (rapids from home, idle rows after M30, a line no training run
  executed) the model's line head answers as before. A grid of CELL_MM cubes lists the segments
  near each, so one lookup reads a handful of segments, not thousands. Where several
  segments are equally near (within 1 um: the tool sits where lines meet, or a later pass retraces an
  earlier one), geometry cannot choose: the model's line wins if it is one of them, else the earliest
  (the controller still reports a line while the tool sits at its end point). Breaking those ties by
  sub-micrometre distance differences instead scored ~1 point lower on validation.

The tolerance is chosen on the validation windows (0 turns snapping off) by
gcodefp_core.path_fitting, which also builds the path. Plain data and numpy: it travels in
checkpoints and in model.json, and the ONNX runtime applies it after the predict graph.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

TOLERANCES_MM = (0.0, 0.003, 0.01, 0.03, 0.1, 0.3)   # the validation grid (0 = off)
_AXIS_WORD = re.compile(r"(?<![A-Z])([XYZR])\s*([-+]?(?:\d+\.?\d*|\.\d+))")
_MACHINE_COORDINATES = re.compile(r"\bG0*53(?!\d)")   # G53: the words are machine, not work, coordinates
MOTION_COLUMN = "momo"          # the controller's motion mode: 2 = G2 (clockwise arc), 3 = G3
ARC_POINTS = 12                 # an arc is followed as this many chords
TIE_MM = 1e-3                   # segments this close to the nearest one are equally near
MARGIN_MM = max(TOLERANCES_MM) + TIE_MM   # the farthest a snapping decision ever looks
CELL_MM = 2.0                   # the lookup grid's cell (a cube): > 2 * (MARGIN_MM + CELL_MM / 4)


def axis_words(line: str) -> dict[str, float]:
    """The X/Y/Z targets (and arc radius R) a G-code line names -> {word: value in the line's unit};
    empty for a G53 line (machine coordinates: not points of the work path)."""
    text = line.upper()
    if _MACHINE_COORDINATES.search(text):
        return {}
    return {axis: float(value) for axis, value in _AXIS_WORD.findall(text)}


def arc_points(start: np.ndarray, end: np.ndarray, radius: float, clockwise: bool, n: int = ARC_POINTS) -> np.ndarray:
    """The points of an R-format arc in the XY plane (Z moves linearly: a helix), from just after
    `start` to `end` inclusive -> [n, 3]; just [end] when the radius cannot span the chord."""
    chord = end[:2] - start[:2]
    c = float(np.hypot(*chord))
    if c == 0 or abs(radius) < c / 2 - 1e-6:
        return end[None].copy()
    h = np.sqrt(max(radius * radius - c * c / 4, 0.0))
    left = np.array([-chord[1], chord[0]]) / c
    # A minor arc (R > 0) has its centre on the side it turns towards; R < 0 asks for the major arc.
    side = (-1.0 if clockwise else 1.0) * (1.0 if radius > 0 else -1.0)
    centre = start[:2] + chord / 2 + side * h * left
    a0 = np.arctan2(*(start[:2] - centre)[::-1])
    a1 = np.arctan2(*(end[:2] - centre)[::-1])
    sweep = -((a0 - a1) % (2 * np.pi)) if clockwise else (a1 - a0) % (2 * np.pi)
    f = np.arange(1, n + 1) / n
    r = abs(radius)
    pts = np.stack([centre[0] + r * np.cos(a0 + sweep * f), centre[1] + r * np.sin(a0 + sweep * f),
                    start[2] + (end[2] - start[2]) * f], axis=1)
    pts[-1] = end
    return pts


@dataclass
class ProgramPath:
    programs: list[str]                 # the line table's programs, in its order
    ends: list[np.ndarray]              # per program [n, 3] float64: each executed line's end point (mm)
    classes: list[np.ndarray]           # per program [n] int64: the line-table class of each segment
    position_index: list[int]           # where posx, posy, posz sit among the continuous features
    mean: np.ndarray                    # [3] their normalisation (features in mm)
    std: np.ndarray
    tolerance_mm: float = 0.0           # 0 = off

    def positions_mm(self, last_rows: np.ndarray) -> np.ndarray:
        """Normalised continuous rows [B, F] -> positions [B, 3] in millimetres."""
        return np.asarray(last_rows, np.float64)[:, self.position_index] * self.std + self.mean

    def locate(self, program: np.ndarray, positions: np.ndarray,
               prefer: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """program [B] int, positions [B, 3] mm -> (line class [B], -1 where no moving segment is within
        MARGIN_MM; distance to the nearest such segment in mm [B], inf where there is none).
        Segments within TIE_MM of the nearest are equally near (the tool sits where several lines meet
        or overlap): among them `prefer` (the model's line, [B]) wins if it is one, else the earliest."""
        program = np.asarray(program, np.int64)
        line = np.full(len(program), -1, np.int64)
        dist = np.full(len(program), np.inf)
        for i, (p, pos) in enumerate(zip(program.tolist(), np.asarray(positions, np.float64))):
            index = self._index(p)
            if index is None:
                continue
            start, seg, inv_length2, cells = index
            key = _cell_key(math.floor(pos[0] / CELL_MM), math.floor(pos[1] / CELL_MM), math.floor(pos[2] / CELL_MM))
            near = cells.get(key)
            if near is None:
                continue
            rel = pos - start[near]
            t = np.clip((rel * seg[near]).sum(1) * inv_length2[near], 0.0, 1.0)
            d = np.sqrt(((rel - t[:, None] * seg[near]) ** 2).sum(1))
            if d.min() > MARGIN_MM:   # the cell's segments pass by farther away: beyond the grid's promise
                continue
            tied = near[d <= d.min() + TIE_MM]                  # in program order: the earliest first
            classes = self.classes[p][tied]
            mine = None if prefer is None else int(prefer[i])
            line[i] = mine if mine is not None and (classes == mine).any() else classes[0]
            dist[i] = d.min()
        return line, dist

    def prepare(self) -> "ProgramPath":
        """Build every program's lookup grid now (a server does this at load, not on a request)."""
        for p in range(len(self.ends)):
            self._index(p)
        return self

    def _index(self, p: int):
        """Program p's segments and a grid of CELL_MM cells -> the segments within MARGIN_MM of each
        (so a query reads a handful of segments, not thousands); built once, None without segments."""
        cache = self.__dict__.setdefault("_cache", {})
        if p not in cache:
            cache[p] = _grid_index(self.ends[p]) if 0 <= p < len(self.ends) and len(self.ends[p]) else None
        return cache[p]

    def snap(self, program: np.ndarray, last_rows: np.ndarray, line: np.ndarray, confidence: np.ndarray,
             tolerance_mm: float | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The model's (line, confidence) with the path's line wherever the last row's position lies on
        the program's path (within the tolerance) -> (line, confidence, on_path [B] bool)."""
        tol = self.tolerance_mm if tolerance_mm is None else tolerance_mm
        line, confidence = np.asarray(line).copy(), np.asarray(confidence).copy()
        if tol <= 0:
            return line, confidence, np.zeros(len(line), bool)
        if tol > max(TOLERANCES_MM):
            raise ValueError(f"tolerance_mm: at most {max(TOLERANCES_MM)} (the lookup grid's reach), got {tol}")
        path_line, dist = self.locate(program, self.positions_mm(last_rows), prefer=line)
        on_path = (dist <= tol) & (path_line >= 0)
        line[on_path] = path_line[on_path]
        confidence[on_path] = 1.0
        return line, confidence, on_path

    @property
    def n_segments(self) -> int:
        return int(sum(len(e) for e in self.ends))

    def to_dict(self) -> dict:
        return {"programs": self.programs, "position_index": self.position_index,
                "mean": [float(v) for v in self.mean], "std": [float(v) for v in self.std],
                "tolerance_mm": float(self.tolerance_mm),
                "ends": [np.round(e, 6).tolist() for e in self.ends], "classes": [c.tolist() for c in self.classes]}

    @classmethod
    def from_dict(cls, d: dict) -> "ProgramPath":
        for key in ("programs", "position_index", "mean", "std", "ends", "classes"):
            if key not in d:
                raise ValueError(f"program path: missing field {key!r}")
        ends = [np.asarray(e, np.float64).reshape(-1, 3) for e in d["ends"]]
        classes = [np.asarray(c, np.int64) for c in d["classes"]]
        if not len(ends) == len(classes) == len(d["programs"]) or any(len(e) != len(c) for e, c in zip(ends, classes)):
            raise ValueError("program path: ends and classes must give one list per program, of equal lengths")
        if len(d["position_index"]) != 3 or len(d["mean"]) != 3 or len(d["std"]) != 3:
            raise ValueError("program path: position_index, mean and std need one entry per axis (x, y, z)")
        if not 0 <= float(d.get("tolerance_mm", 0.0)) <= max(TOLERANCES_MM):
            raise ValueError(f"program path: tolerance_mm must be in [0, {max(TOLERANCES_MM)}]")
        return cls(list(d["programs"]), ends, classes, [int(i) for i in d["position_index"]],
                   np.asarray(d["mean"], np.float64), np.asarray(d["std"], np.float64),
                   float(d.get("tolerance_mm", 0.0)))


def _cell_key(x, y, z):
    """One int64 per grid cell (cell indices within +-2^19, i.e. +-1 km at CELL_MM = 2)."""
    return ((x + 2 ** 19) * 2 ** 20 + (y + 2 ** 19)) * 2 ** 20 + (z + 2 ** 19)


def _grid_index(ends: np.ndarray):
    """-> (start [n,3], seg [n,3], 1/|seg|^2 [n] (0 for a line that does not move), {cell key: moving
    segment indices, ascending}). Each moving segment is sampled every CELL_MM / 2, so any point of
    it is within CELL_MM / 4 of a sample, and registered in every cell that a cube of half-side
    MARGIN_MM + CELL_MM / 4 around a sample touches (at most 2 per axis, as that cube is narrower
    than a cell): a position within MARGIN_MM of the segment lies in one of those cells."""
    start = np.concatenate([ends[:1], ends[:-1]])
    seg = ends - start
    length2 = (seg * seg).sum(1)
    inv_length2 = np.divide(1.0, length2, out=np.zeros_like(length2), where=length2 > 0)
    moving = np.flatnonzero(length2 > 0)
    steps = np.ceil(np.sqrt(length2[moving]) / (CELL_MM / 2)).astype(np.int64) + 1
    seg_id = np.repeat(moving, steps)
    frac = np.concatenate([np.linspace(0.0, 1.0, k) for k in steps]) if len(moving) else np.zeros(0)
    samples = start[seg_id] + frac[:, None] * seg[seg_id]
    r = MARGIN_MM + CELL_MM / 4
    lo, hi = np.floor((samples - r) / CELL_MM).astype(np.int64), np.floor((samples + r) / CELL_MM).astype(np.int64)
    keys, ids = [], []
    for corner in np.ndindex(2, 2, 2):
        cell = lo + np.asarray(corner)
        ok = (cell <= hi).all(1)
        keys.append(_cell_key(cell[ok, 0], cell[ok, 1], cell[ok, 2]))
        ids.append(seg_id[ok])
    pairs = np.unique(np.stack([np.concatenate(keys), np.concatenate(ids)], 1), axis=0)  # sorted: key, then segment
    bounds = np.flatnonzero(np.diff(pairs[:, 0])) + 1
    cells = {int(group[0, 0]): group[:, 1] for group in np.split(pairs, bounds)} if len(pairs) else {}
    return start, seg, inv_length2, cells
