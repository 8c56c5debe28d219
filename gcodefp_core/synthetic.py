"""Synthetic CNC sensor logs: the embedded default data, shaped like the real aligned CSVs.

A run = one fixed program (synthetic_programs) driven through trapezoidal motion, sampled at the
controller's status-report cadence, with motor currents and sensor boards that respond to velocity,
acceleration and cutting load. Everything random comes from numpy generators seeded by
(seed, operation, run, machine): output is deterministic and byte-identical for a given seed.
"""
from __future__ import annotations

import gzip
import io
import os
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from .schema import CHANNELS, CURRENTS, MM_PER_INCH, NODES, OPERATIONS
from .synthetic_programs import ACCEL_IPS2, check_operation, plan_motion, program_for

__all__ = ["OPERATIONS", "program_for", "generate_run", "write_synthetic_logs"]

REPORT_S = 0.2565          # status-report period while moving; idle reports come half as often
STOCK_TOP_IN = 0.02        # the tool engages below this work Z
CONTROLLER_COLUMNS = ("t_console", "stat", "line", "posx", "posy", "posz", "mpox", "mpoy", "mpoz", "vel",
                      "feed", "unit", "dist", "plane", "coor", "momo", "raw_json")


def _machine(machine_id: int) -> dict[str, np.ndarray]:
    """A machine's fixed signature: sensor gains, offsets, couplings and resonances per node."""
    r = np.random.default_rng([0x6C0DE, int(machine_id)])
    k = len(NODES)
    kind = np.array([[n.startswith(p) for p in ("xa_", "y_bed", "z_gant", "spindle")] for n in NODES], float)
    emphasis = 0.3 + kind[:, [0, 1, 2]] * 1.5       # x / y / z axis nodes react most to their axis
    return {
        "gravity": r.normal([-1.0, 0.0, 0.0], [0.02, 0.08, 0.03], (k, 3)),
        "acc_couple": r.normal(0, 1, (k, 3, 3)) * emphasis[:, None, :] * 0.6,
        "gyro_bias": r.normal(0, 3.0, (k, 3)),
        "gyro_couple": r.normal(0, 2.5, (k, 3, 3)) * emphasis[:, None, :],
        "mag_offset": r.normal(0, 40.0, (k, 3)),
        "mag_couple": r.normal(0, 12.0, (k, 3, 3)),
        "node_loc": r.uniform([0, 0, -60], [200, 120, 0], (k, 3)),
        "vib_gain": r.uniform(0.01, 0.05, k) * (1 + 2 * kind[:, 3]),
        "resonance": r.uniform(0.7, 1.4, (k, 3)),
        "rms_base": r.uniform(250, 700, k), "rms_gain": r.uniform(300, 1200, k) * (1 + kind[:, 3]),
        "temp_base": r.uniform(26, 33, k) + 4 * kind[:, 3],
        "current_gain": r.uniform(0.9, 1.1, 4), "current_base": r.uniform([4.8, 0.19, 0.19, 0.19], [5.2, 0.21, 0.21, 0.21]),
        "motion_gain": r.uniform(0.025, 0.045, 4), "load_gain": r.uniform(0.2, 0.4, 4),
    }


def _run_rng(seed: int, operation: str, run_index: int, machine_id: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), OPERATIONS.index(operation), int(run_index), int(machine_id)])


def _sample_motion(plan, times: np.ndarray):
    """Position, per-axis velocity and acceleration (inches, s) and the line index at each time."""
    ends = np.cumsum(plan.duration)
    seg = np.minimum(np.searchsorted(ends, times, side="right"), len(ends) - 1)
    tau = np.clip(times - (ends[seg] - plan.duration[seg]), 0, plan.duration[seg])
    L, T, ta, vp = plan.length[seg], plan.duration[seg], plan.t_acc[seg], plan.v_peak[seg]
    a = ACCEL_IPS2
    accelerating, decelerating = tau < ta, tau > T - ta
    s = np.where(accelerating, 0.5 * a * tau**2, np.where(decelerating, L - 0.5 * a * (T - tau) ** 2, 0.5 * vp * ta + vp * (tau - ta)))
    speed = np.where(accelerating, a * tau, np.where(decelerating, a * (T - tau), vp))
    acc_t = np.where(accelerating, a, np.where(decelerating, -a, 0.0)) * (L > 0)
    frac = np.where(L > 0, np.clip(s / np.where(L > 0, L, 1), 0, 1), 1.0)
    p0, p1 = plan.start[seg], plan.end[seg]
    pos = p0 + frac[:, None] * (p1 - p0)
    direction = (p1 - p0) / np.where(L > 0, L, 1)[:, None]
    acc = acc_t[:, None] * direction
    arc = ~np.isnan(plan.center[seg, 0]) & (L > 0)
    if arc.any():
        c, th0, sw = plan.center[seg[arc]], plan.theta0[seg[arc]], plan.sweep[seg[arc]]
        radius = np.hypot(p0[arc, 0] - c[:, 0], p0[arc, 1] - c[:, 1])
        th = th0 + sw * frac[arc]
        pos[arc, 0], pos[arc, 1] = c[:, 0] + radius * np.cos(th), c[:, 1] + radius * np.sin(th)
        tangent = np.stack([-np.sin(th), np.cos(th), (p1[arc, 2] - p0[arc, 2]) / np.maximum(radius * np.abs(sw), 1e-9)], 1)
        tangent[:, :2] *= np.sign(sw)[:, None]
        tangent /= np.linalg.norm(tangent, axis=1, keepdims=True)
        direction[arc] = tangent
        inward = -np.stack([np.cos(th), np.sin(th), np.zeros_like(th)], 1)
        acc[arc] = acc_t[arc, None] * tangent + (speed[arc] ** 2 / np.maximum(radius, 1e-3))[:, None] * inward
    return seg, pos, speed[:, None] * direction, acc, np.abs(direction)


def _report_times(rng: np.random.Generator, plan) -> np.ndarray:
    """Report instants: ~0.2565 s with jitter and rare hiccups; every other report dropped while idle."""
    total = plan.duration.sum()
    n = int(total / REPORT_S * 1.05) + 16
    dt = REPORT_S + rng.normal(0, 0.0015, n) + (rng.random(n) < 0.01) * rng.uniform(0.1, 0.45, n)
    t = rng.uniform(0, REPORT_S) + np.concatenate([[0.0], np.cumsum(dt[:-1])])
    t = t[t < total]
    seg = np.minimum(np.searchsorted(np.cumsum(plan.duration), t, side="right"), len(plan.duration) - 1)
    idle = plan.length[seg] == 0
    return t[~idle | (np.cumsum(idle) % 2 == 0)]


def _num(v: float) -> str:
    """A JSON number as the controller prints it: integers without a fraction."""
    return str(int(v)) if float(v).is_integer() else repr(float(v))


def _raw_json(cols: dict, mark: int) -> list[str]:
    keys = ("mpox", "mpoy", "mpoz", "posx", "posy", "posz", "unit", "stat", "coor", "momo", "line", "feed")
    rows = zip(*(cols[k].tolist() for k in keys))
    return [
        f'{{"sr":{{"mpox":{_num(mx)},"mpoy":{_num(my)},"mpoz":{_num(mz)},"mpoa":0,"posx":{_num(px)},'
        f'"posy":{_num(py)},"posz":{_num(pz)},"posa":0,"unit":{u},"stat":{st},"coor":{co},"momo":{mo},'
        f'"dist":0,"home":1,"mots":0,"plan":0,"line":{ln},"path":2,"frmo":2,"prbe":1,"safe":0,"estp":0,'
        f'"spc":0,"hold":0,"macs":{st},"cycs":{int(st == 5)},"sps":0,"feed":{_num(fd)},"mark":{mark}}}}}'
        for mx, my, mz, px, py, pz, u, st, co, mo, ln, fd in rows
    ]


def _clock(start_s: float, times: np.ndarray) -> list[str]:
    ms = np.round((start_s + times) * 1000).astype(np.int64) % 86_400_000
    return [f"{m // 3_600_000:02d}:{m // 60_000 % 60:02d}:{m // 1000 % 60:02d}.{m % 1000:03d}" for m in ms.tolist()]


def generate_run(operation: str, run_index: int, seed: int = 0, machine_id: int = 0) -> pd.DataFrame:
    """One synthetic run with the columns, dtypes and strings of a real aligned CSV."""
    check_operation(operation)
    rng, mach = _run_rng(seed, operation, run_index, machine_id), _machine(machine_id)
    damaged = operation.startswith("damage")
    lines = program_for(operation)
    offset = np.array([rng.uniform(44, 48), rng.uniform(15, 19), rng.uniform(-46, -20)])
    start_machine = np.array([rng.uniform(100, 160), rng.uniform(0, 20), 0.0])
    plan = plan_motion(lines, offset, start_machine, feed_override=rng.uniform(0.93, 1.07))
    t = _report_times(rng, plan)
    seg, pos, vel, acc, axis_share = _sample_motion(plan, t)
    n_tail = int(rng.integers(7, 11))             # reports after M30: idle, machine defaults (mm, G53)
    t = np.concatenate([t, t[-1] + np.cumsum(rng.normal(0.515, 0.01, n_tail))])
    n = len(t)
    seg = np.concatenate([seg, np.full(n_tail, len(lines) - 1)])
    pad = lambda a: np.concatenate([a, np.zeros((n_tail,) + a.shape[1:])])  # noqa: E731
    pos_in, vel, acc, axis_share = np.concatenate([pos, np.repeat(plan.end[-1:], n_tail, 0)]), pad(vel), pad(acc), pad(axis_share)
    mpo = np.round(pos_in * MM_PER_INCH + offset, 5)
    running = np.arange(n) < n - n_tail
    stat_end = 3 if rng.random() < 0.8 else 4
    cols = {
        "stat": np.where(running, 5, stat_end), "line": seg + 1,
        "unit": np.where(running, 0, 1), "coor": np.where(running, 2, 1), "momo": np.where(running, plan.mode[seg], 4),
        "mpox": mpo[:, 0], "mpoy": mpo[:, 1], "mpoz": mpo[:, 2],
        "feed": np.where(running, np.round(plan.feed_ipm[seg] * MM_PER_INCH, 2), 0.0),
    }
    work = np.where(running[:, None], np.round(pos_in, 4), mpo)   # after M30 positions are reported in mm
    cols.update(posx=work[:, 0], posy=work[:, 1], posz=work[:, 2])

    # Cutting load: engagement below the stock top, scaled by feed speed; a damaged tool cuts harder.
    speed = np.linalg.norm(vel, axis=1)
    cutting = running & np.isin(cols["momo"], (1, 2, 3)) & (pos_in[:, 2] < STOCK_TOP_IN)
    engagement = np.clip(STOCK_TOP_IN - pos_in[:, 2], 0, 0.2) / 0.1 + 0.3
    load = cutting * engagement * np.clip(speed / 0.6, 0, 1.2)
    wear = rng.uniform(1.6, 2.2) if damaged else rng.uniform(0.95, 1.05)
    load = load * wear
    spindle_on = plan.spindle_on[seg] & running
    noise = lambda scale, shape=(n,): rng.normal(0, scale, shape)  # noqa: E731

    g, base = mach["current_gain"], mach["current_base"]
    currents = {"spindle": np.where(spindle_on, base[0] + mach["load_gain"][0] * load, 0.35) * g[0] + noise(0.08)}
    motion = np.abs(vel) / 1.0 + np.abs(acc) / ACCEL_IPS2
    for i, name in enumerate(CURRENTS[1:]):
        currents[name] = (base[i + 1] + mach["motion_gain"][i + 1] * motion[:, i]
                          + 0.015 * mach["load_gain"][i + 1] * load * axis_share[:, i]) * g[i + 1] + noise(0.006)

    # Sensor boards: a random subset of nodes in random order, as in the real files.
    chosen = rng.permutation(len(NODES))[: int(rng.integers(6, 13))]
    vib = spindle_on * (0.4 + 0.4 * load * (1.8 if damaged else 1.0)) + 0.3 * speed
    rpm_hz = 10000 / 60.0
    boards = {}
    acc_g = acc * 0.0254 / 9.81 * 40           # inches/s^2 -> g, amplified: the boards sit on light parts
    temp_drift = rng.uniform(-0.3, 0.6) * t / t[-1]
    day = {"pressure": rng.uniform(99.4, 100.2), "temp": rng.normal(0, 1.5), "light": rng.uniform(0, 1, 4)}
    for k in chosen:
        node = NODES[k]
        phase = rng.uniform(0, 2 * np.pi, 3)
        wave = np.sin(2 * np.pi * rpm_hz * mach["resonance"][k][None, :] * t[:, None] + phase)
        shake = vib[:, None] * mach["vib_gain"][k] * (wave + 0.5 * rng.standard_normal((n, 3)))
        ax = mach["gravity"][k] + rng.normal(0, 0.003, 3) + acc_g @ mach["acc_couple"][k].T + shake + noise(0.004, (n, 3))
        gy = mach["gyro_bias"][k] + vel @ mach["gyro_couple"][k].T + 8 * shake + noise(0.12, (n, 3))
        rel = (mpo - mach["node_loc"][k]) / 100.0
        mag = mach["mag_offset"][k] + rel @ mach["mag_couple"][k].T + 3 * np.tanh(rel) + noise(0.6, (n, 3))
        rms = mach["rms_base"][k] + mach["rms_gain"][k] * vib * (1 + 0.15 * rng.standard_normal(n))
        heat = 0.002 * np.cumsum(load) * node.startswith("spindle")
        has_light = rng.random() < 0.6
        colour = (day["light"] * rng.uniform(20, 300) * has_light)[None, :] + noise(0.5, (n, 4)) * has_light
        values = {
            "Ax": ax[:, 0], "Ay": ax[:, 1], "Az": ax[:, 2], "Gx": gy[:, 0], "Gy": gy[:, 1], "Gz": gy[:, 2],
            "Mx": mag[:, 0], "My": mag[:, 1], "Mz": mag[:, 2],
            "Pressure": np.full(n, round(day["pressure"] + rng.choice([0.0, 0.1]), 1)),
            "Temperature": mach["temp_base"][k] + day["temp"] + temp_drift + heat + noise(0.01),
            "Proximity": np.full(n, rng.uniform(0, 200) if rng.random() < 0.5 else 0.0),
            "ColorR": colour[:, 0], "ColorG": colour[:, 1], "ColorB": colour[:, 2], "ColorA": colour[:, 3],
            "RMS": rms,
        }
        decimals = {"A": 5, "G": 4, "M": 3, "R": 2}
        for ch in CHANNELS:
            boards[f"{node}.{ch}"] = np.round(np.maximum(values[ch], 0) if ch.startswith("Color") else values[ch],
                                              decimals.get(ch[0], 3))

    start_s = rng.uniform(8 * 3600, 18 * 3600)
    frame = {"t_console": _clock(start_s, t)}
    frame.update({c: cols[c] for c in ("stat", "line", "posx", "posy", "posz", "mpox", "mpoy", "mpoz")})
    frame.update(vel=np.full(n, np.nan), feed=cols["feed"], unit=cols["unit"], dist=np.zeros(n, np.int64),
                 plane=np.full(n, np.nan), coor=cols["coor"], momo=cols["momo"])
    frame["raw_json"] = _raw_json(cols, int(rng.integers(10**8, 2 * 10**9)))
    cur = {c: np.round(currents[c], 6) for c in CURRENTS}
    frame.update(cur)
    if rng.random() < 0.9:                     # the *_A copies are missing in some real runs
        frame.update({f"{c}_A": cur[c] for c in CURRENTS})
    frame.update(boards)
    frame["gcode_line"] = cols["line"]
    frame["gcode_string"] = np.array(lines, dtype=object)[seg]
    df = pd.DataFrame(frame)
    int_cols = ["stat", "line", "unit", "dist", "coor", "momo", "gcode_line"]
    return df.astype({c: np.int64 for c in int_cols})


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_synthetic_logs(out_dir, runs_per_operation: int = 4, seed: int = 0, operations=OPERATIONS,
                         machine_id: int = 0, compress: bool = True) -> list[Path]:
    """Write `<op>_<NNN>_aligned.csv[.gz]` (NNN from 001) for each operation; byte-identical per seed."""
    if runs_per_operation < 1:
        raise ValueError(f"runs_per_operation: must be >= 1, got {runs_per_operation}")
    ops = [check_operation(op) for op in ([operations] if isinstance(operations, str) else operations)]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for op in ops:
        for i in range(runs_per_operation):
            text = generate_run(op, i, seed=seed, machine_id=machine_id).to_csv(index=False, lineterminator="\n")
            data = text.encode()
            if compress:               # mtime=0 and no file name: the same bytes every time
                buf = io.BytesIO()
                with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0) as gz:
                    gz.write(data)
                data = buf.getvalue()
            path = out / f"{op}_{i + 1:03d}_aligned.csv{'.gz' if compress else ''}"
            _atomic_write(path, data)
            paths.append(path)
    return paths
