"""Followed machines survive a server restart (GCODEFP_STREAM_STATE_DIR).

A tracker session knows where in which program its machine is; losing that on a restart (a deploy,
a new image, a host reboot) sends every followed machine back to "anywhere in any program", which
costs about half of the exact-line accuracy until the filter locks on again. With a state folder
set, a worker that shuts down cleanly writes each tracker session there, one file per machine
(temp file, then rename). A worker that gets a request for a machine it does not know looks for
that machine's file, takes the state over and deletes the file, so the machine may come back to
any worker. What is restored:
- the filter (posterior over program and row offset), when the served tracker has the same states
  (operations, their programs and the programs' lengths);
- the last W-1 rows, when the served model is the same version (another model may read other
  features or normalise them differently), so the next window is whole at once;
- the row count and the number of windows answered;
- the last chunk sent with an Idempotency-Key and its answer, so that a monitor that retries that
  chunk on its new connection gets the answer again instead of the rows applied twice.
A file older than GCODEFP_STREAM_STATE_MAX_AGE_S describes where the machine was, not where it is:
it is ignored (and deleted). Clock sessions (older packages) are not saved: the clock is the row
count, which a restart loses anyway. A crash writes nothing.
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import numpy as np

from gcodefp_core.runtime.program_tracker import TrackerSession

log = logging.getLogger("api.streams")


def _signature(tracker) -> list:
    """What must match for a posterior to mean the same thing under another tracker."""
    return [list(tracker.operations), list(tracker.operation_program), [int(n) for n in tracker._sizes]]


SUFFIX = ".state"


def file_for(folder: str | Path, machine_id: str) -> Path:
    """Where `save` writes a machine's state in a folder."""
    return Path(folder) / f"{machine_id}{SUFFIX}"


def save(folder: Path, sessions) -> int:
    """Write every started tracker session; -> how many were written."""
    folder.mkdir(parents=True, exist_ok=True)
    return sum(write(file_for(folder, s.machine_id), s) for s in sessions)


def write(path: Path, s) -> bool:
    """One session's state to `path` (temp file, then rename); False (nothing written) unless it is a
    started tracker session."""
    if s.version is None or s.mode != "tracker" or not isinstance(s.tracker, TrackerSession):
        return False
    meta = {"machine_id": s.machine_id, "version": s.version, "saved_at": time.time(),
            "rows_since_start": s.rows_since_start, "windows": s.windows, "real_rows": s.real_rows,
            "started_at": s.started_at, "operation": s.operation, "signature": _signature(s.tracker.model),
            "tracker_rows": s.tracker.rows, "from_start": s.tracker.from_start}
    if s.replay_key is not None:
        meta["replay"] = [s.replay_key, s.replay_digest.hex(), s.replay_answer.decode()]
    arrays = {"moving": s.tracker.moving, "paused": s.tracker.paused}
    if s.cont is not None:
        arrays |= {"cont": s.cont, "cat": s.cat}
    arrays = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
    meta["arrays"] = [[k, v.dtype.str, list(v.shape)] for k, v in arrays.items()]
    # A length-prefixed JSON head, then the arrays' bytes: read back in ~0.07 ms where an .npz (a zip)
    # took ~0.5 (a machine handed over between workers is read while its monitor waits).
    head = json.dumps(meta).encode()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(len(head).to_bytes(4, "little") + head)
        for v in arrays.values():
            f.write(v.tobytes())
    tmp.replace(path)
    return True


def _read(path: Path) -> tuple[dict, dict]:
    """A state file -> (meta, arrays); ValueError when it is not one."""
    data = path.read_bytes()
    n = int.from_bytes(data[:4], "little")
    if len(data) < 4 + n:
        raise ValueError("truncated head")
    meta = json.loads(data[4:4 + n])
    arrays, offset = {}, 4 + n
    for name, dtype, shape in meta["arrays"]:
        count = int(np.prod(shape))
        arrays[name] = np.frombuffer(data, np.dtype(dtype), count, offset).reshape(shape).copy()
        offset += arrays[name].nbytes
    if offset != len(data):
        raise ValueError(f"{len(data) - offset} bytes more than its arrays")
    return meta, arrays


def restore(path: Path, session, model, max_age_s: float) -> bool:
    """Fill an unstarted session from a saved state (`path`, as `save` and `write` name it), if there is
    a usable one; the file is consumed either way. -> whether the session was restored."""
    try:
        meta, arrays = _read(path)
        saved = {k: int(meta[k]) for k in ("rows_since_start", "windows", "real_rows", "tracker_rows")}
        age, version = time.time() - float(meta["saved_at"]), str(meta["version"])
        moving, paused = arrays["moving"], arrays["paused"]
        replay = meta.get("replay")
        replay = (str(replay[0]), bytes.fromhex(replay[1]), str(replay[2]).encode()) if replay else None
    except FileNotFoundError:
        return False
    except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:   # damaged: the machine starts afresh
        log.warning("stream state of %s unreadable, ignored: %s", session.machine_id, exc,
                    extra={"event": "stream_state_unreadable", "machine_id": session.machine_id})
        path.unlink(missing_ok=True)
        return False
    path.unlink(missing_ok=True)
    tracker = model.predictor.program_tracker
    if (tracker is None or age > max_age_s or meta.get("signature") != _signature(tracker)
            or moving.shape != (tracker.n_states,) or paused.shape != moving.shape):
        return False
    session.mode, session.tracker = "tracker", TrackerSession(tracker, moving.astype(np.float32),
                                                              paused.astype(np.float32), saved["tracker_rows"],
                                                              bool(meta.get("from_start", False)))
    # The saved version: if another model is served now, the request's own swap logic takes over (the
    # posterior carries, the buffered rows of the other model do not: api/streams.post_rows).
    session.version, session.clock = version, model.predictor.program_clock is not None
    session.rows_since_start, session.windows, session.real_rows = (saved["rows_since_start"], saved["windows"],
                                                                    saved["real_rows"])
    session.started_at, session.operation = float(meta.get("started_at", 0.0)), meta.get("operation")
    if replay is not None:
        session.replay_key, session.replay_digest, session.replay_answer = replay
    if version == model.version and "cont" in arrays and "cat" in arrays:
        session.cont, session.cat = arrays["cont"], arrays["cat"]
    log.info("stream session of %s restored (saved %.1f s ago)", session.machine_id, age,
             extra={"event": "stream_restored", "machine_id": session.machine_id, "age_seconds": round(age, 1)})
    return True
