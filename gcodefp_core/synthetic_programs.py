"""The synthetic G-code programs (one fixed program per operation) and their motion plan.

Programs use only what the real logs use: inches (G20), absolute (G90), R-format arcs, at most 5 words
and 28 characters a line, characters `space - . 0-9 F G M R S T X Y Z`. damage* operations reuse the
*150025 programs exactly, as in the real data: only the machine's behaviour differs.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from .schema import MM_PER_INCH, OPERATIONS, PROGRAM_OF

RAPID_IPM = 110.0          # G0 speed of the desktop mill (inches per minute)
ACCEL_IPS2 = 8.0           # trapezoidal acceleration limit (inches per second squared)
DWELL_S = {"M6": 3.0, "M3": 2.5, "M5": 2.0, "default": 0.02}


def _n(v: float, nd: int = 4) -> str:
    """A coordinate in the real files' style: 3.291, -0.1254, 0., 40."""
    s = f"{round(v, nd):.{nd}f}".rstrip("0")
    return "0." if s in ("-0.", "-.") else s


def _preamble(spindle_rpm: int) -> list[str]:
    return ["G90 G94 G17", "G20", "G53 G0 Z0.", "T1 M6", f"S{spindle_rpm} M3", "G54"]


def _ending() -> list[str]:
    return ["G0 Z0.6", "M5", "G53 G0 Z0.", "M30"]


def _approach(x: float, y: float, z_cut: float, plunge_feed: float) -> list[str]:
    return [f"G0 X{_n(x)} Y{_n(y)}", "Z0.6", "G0 Z0.2", f"G1 Z0.025 F{_n(plunge_feed, 1)}", f"Z{_n(z_cut)}"]


def _face(width: float, height: float, radius: float, z_cut: float, feed: float, rpm: int) -> list[str]:
    """Zig-zag rows along X, turning round with two quarter arcs (G3 on the right, G2 on the left)."""
    x0, x1 = -0.1254, width
    lines = _preamble(rpm) + _approach(x0, 0.0, z_cut, feed / 3)
    y, first = 0.0, True
    while y + 2 * radius <= height + 1e-9:
        lines.append(f"G1 X{_n(x1)}" + (f" F{_n(feed, 1)}" if first else ""))
        lines += [f"G3 X{_n(x1 + radius)} Y{_n(y + radius)} R{_n(radius)}", f"X{_n(x1)} Y{_n(y + 2 * radius)} R{_n(radius)}"]
        y += 2 * radius
        lines.append(f"G1 X{_n(x0)}")
        lines += [f"G2 X{_n(x0 - radius)} Y{_n(y + radius)} R{_n(radius)}", f"X{_n(x0)} Y{_n(y + 2 * radius)} R{_n(radius)}"]
        y += 2 * radius
        first = False
    return lines + [f"G1 X{_n(x1)}"] + _ending()


def _pocket(half_x: float, half_y: float, rings: int, depths: list[float], feed: float, rpm: int) -> list[str]:
    """Concentric rectangles from the centre outwards, one set per Z step-down."""
    cx, cy = 1.0, 0.75
    lines = _preamble(rpm) + _approach(cx, cy, 0.0, feed / 4)
    for z in depths:
        lines.append(f"G1 Z{_n(z)} F{_n(feed / 4, 1)}")
        for i in range(1, rings + 1):
            hx, hy = half_x * i / rings, half_y * i / rings
            lines.append(f"G1 X{_n(cx + hx)} Y{_n(cy - hy)}" + (f" F{_n(feed, 1)}" if i == 1 else ""))
            lines += [f"Y{_n(cy + hy)}", f"X{_n(cx - hx)}", f"Y{_n(cy - hy)}", f"X{_n(cx + hx)}"]
        lines += ["G0 Z0.1", f"X{_n(cx)} Y{_n(cy)}"]
    return lines + _ending()


def _adaptive(x_start: float, length: float, step: float, half_width: float, depths: list[float],
              feed: float, rpm: int) -> list[str]:
    """Trochoidal slot: a climbing G2 arc across the slot, then a G1 or G3 return, `step` forward each loop."""
    y = 1.0
    lines = _preamble(rpm) + _approach(x_start, y - half_width, 0.0, feed / 4)
    for level, z in enumerate(depths):
        lines += [f"G1 Z{_n(z)} F{_n(feed / 4, 1)}", f"G1 X{_n(x_start)} Y{_n(y - half_width)} F{_n(feed, 1)}"]
        x, k = x_start, 0
        while x + step <= x_start + length + 1e-9:
            chord = np.hypot(step, 2 * half_width)
            lines.append(f"G2 X{_n(x + step)} Y{_n(y + half_width)} R{_n(chord / 2 * 1.02)}")
            x += step
            if k % 2 == 0:
                lines.append(f"G1 X{_n(x)} Y{_n(y - half_width)}")
            else:
                lines.append(f"G3 X{_n(x)} Y{_n(y - half_width)} R{_n(half_width * 1.6)}")
            k += 1
        lines += ["G0 Z0.1", f"X{_n(x_start)} Y{_n(y - half_width)}"]
    return lines + _ending()


_BUILDERS = {
    "adaptive": lambda: _adaptive(0.2, 2.5, 0.05, 0.15, [-0.1], 22.0, 10000),
    "adaptive150025": lambda: _adaptive(0.3, 1.8, 0.045, 0.12, [-0.025, -0.05], 40.0, 15000),
    "face": lambda: _face(3.2, 3.0, 0.083, 0.0, 22.0, 10000),
    "face150025": lambda: _face(3.0, 3.0, 0.075, -0.025, 40.0, 15000),
    "pocket": lambda: _pocket(0.9, 0.65, 4, [-0.05, -0.1, -0.15], 22.0, 10000),
    "pocket150025": lambda: _pocket(0.9, 0.65, 6, [-0.025, -0.05, -0.075, -0.1, -0.125], 40.0, 15000),
}


def check_operation(operation: str) -> str:
    if operation not in OPERATIONS:
        raise ValueError(f"operation: unknown value {operation!r}; choose one of {', '.join(OPERATIONS)}")
    return operation


@lru_cache(maxsize=None)
def _program(name: str) -> tuple[str, ...]:
    return tuple(_BUILDERS[name]())


def program_for(operation: str) -> list[str]:
    """The fixed G-code program of an operation (line i of the list is program line i + 1)."""
    return list(_program(PROGRAM_OF[check_operation(operation)]))


@dataclass
class MotionPlan:
    """One segment per program line, in work coordinates (inches); zero-length lines are dwells."""

    start: np.ndarray      # (n, 3)
    end: np.ndarray        # (n, 3)
    mode: np.ndarray       # (n,) modal motion mode while the line runs: 0 G0, 1 G1, 2 G2, 3 G3
    feed_ipm: np.ndarray   # (n,) programmed (modal) feed, inches per minute; 0 before the first F
    speed: np.ndarray      # (n,) cruise speed in inches per second (after the feed override)
    center: np.ndarray     # (n, 2) arc centre (NaN for lines)
    theta0: np.ndarray     # (n,) start angle of arcs
    sweep: np.ndarray      # (n,) signed swept angle (negative = clockwise)
    length: np.ndarray     # (n,) path length (0 for dwells)
    duration: np.ndarray   # (n,) seconds, trapezoidal profile or dwell
    t_acc: np.ndarray      # (n,) acceleration phase length
    v_peak: np.ndarray     # (n,) speed reached (<= speed on short moves)
    spindle_on: np.ndarray  # (n,) bool


def _arc(p0, p1, mode: int, words: dict[str, float], line_no: int):
    """Centre, start angle and signed sweep of a G2/G3 move given by R or I/J."""
    (x0, y0), (x1, y1) = p0[:2], p1[:2]
    if "R" in words:
        r = words["R"]
        dx, dy = x1 - x0, y1 - y0
        d = np.hypot(dx, dy)
        if d == 0 or abs(r) < d / 2 - 1e-6:
            raise ValueError(f"program line {line_no}: arc radius R{r} too small for its chord {d:.4f}")
        h = np.sqrt(max(r * r - d * d / 4, 0.0)) * (1 if r > 0 else -1)
        side = 1 if mode == 2 else -1      # G2: centre right of the chord for the minor arc
        cx, cy = (x0 + x1) / 2 + side * h * dy / d, (y0 + y1) / 2 - side * h * dx / d
    else:
        cx, cy = x0 + words.get("I", 0.0), y0 + words.get("J", 0.0)
    a0, a1 = np.arctan2(y0 - cy, x0 - cx), np.arctan2(y1 - cy, x1 - cx)
    sweep = (a1 - a0) % (2 * np.pi) if mode == 3 else -((a0 - a1) % (2 * np.pi))
    if abs(sweep) < 1e-9:
        sweep = 2 * np.pi if mode == 3 else -2 * np.pi
    return (cx, cy), a0, sweep


def plan_motion(lines: list[str], work_offset_mm: np.ndarray, start_machine_mm: np.ndarray,
                feed_override: float = 1.0) -> MotionPlan:
    """Walk the program with modal state (motion mode, feed, position) and time every line."""
    if not lines:
        raise ValueError("program: no lines")
    pos = (np.asarray(start_machine_mm, float) - work_offset_mm) / MM_PER_INCH
    out = {k: [] for k in ("start", "end", "mode", "feed", "center", "theta0", "sweep", "length", "spindle")}
    mode, feed, spindle = 0, 0.0, False
    for i, text in enumerate(lines):
        words, gs, ms = {}, [], []
        for w in text.split():
            letter, num = w[0], float(w[1:])
            if letter == "G":
                gs.append(int(num))
            elif letter == "M":
                ms.append(int(num))
            else:
                words[letter] = num
        mode = next((g for g in gs if g in (0, 1, 2, 3)), mode)
        feed = words.get("F", feed)
        spindle = (spindle or 3 in ms) and 5 not in ms and 30 not in ms
        end = pos.copy()
        for axis, letter in enumerate("XYZ"):
            if letter in words:     # G53: this one move is in machine coordinates
                end[axis] = (words[letter] - work_offset_mm[axis] / MM_PER_INCH) if 53 in gs else words[letter]
        center, theta0, sweep = (np.nan, np.nan), 0.0, 0.0
        if mode in (2, 3) and any(k in words for k in "XY"):
            center, theta0, sweep = _arc(pos, end, mode, words, i + 1)
            radius = np.hypot(pos[0] - center[0], pos[1] - center[1])
            length = np.hypot(radius * sweep, end[2] - pos[2])
        else:
            length = float(np.linalg.norm(end - pos))
        for k, v in zip(out, (pos, end, mode, feed, center, theta0, sweep, length, spindle)):
            out[k].append(v)
        pos = end
    mode_a, feed_a, length_a = np.array(out["mode"]), np.array(out["feed"]), np.array(out["length"])
    speed = np.where(mode_a == 0, RAPID_IPM, np.maximum(feed_a, 1.0) * feed_override) / 60.0
    v_peak = np.minimum(speed, np.sqrt(length_a * ACCEL_IPS2))
    t_acc = v_peak / ACCEL_IPS2
    moving = length_a > 0
    cruise = np.where(moving, (length_a - v_peak * t_acc) / np.maximum(v_peak, 1e-9), 0.0)
    dwell = np.array([DWELL_S["M6"] if "M6" in t.split() else DWELL_S["M3"] if "M3" in t.split()
                      else DWELL_S["M5"] if "M5" in t.split() else DWELL_S["default"] for t in lines])
    duration = np.where(moving, 2 * t_acc + cruise, dwell)
    return MotionPlan(np.array(out["start"]), np.array(out["end"]), mode_a, feed_a, speed,
                      np.array(out["center"], float), np.array(out["theta0"]), np.array(out["sweep"]),
                      length_a, duration, np.where(moving, t_acc, 0.0), np.where(moving, v_peak, 0.0),
                      np.array(out["spindle"], bool))
