"""The sensor-log schema: operation classes, column groups and the two feature sets.

One place says which raw columns a model may see. The rules, from the data study:
- `line` / `gcode_line` index the label, and `gcode_string` *is* the label: never features.
- Controller state (positions, feed, modal state) is allowed only in the `full` set; `side_channel`
  is the honest task (motor currents and the sensor boards).
- Pressure, Temperature, Proximity and Color* identify the recording day rather than the operation
  (dropping them lifted a tree baseline from 82% to 93% operation accuracy on unseen runs), so they
  are excluded by default; a config can bring them back.
"""
from __future__ import annotations

from dataclasses import dataclass

OPERATIONS: tuple[str, ...] = (
    "adaptive", "adaptive150025", "face", "face150025", "pocket", "pocket150025",
    "damageadaptive", "damageface", "damagepocket",
)
# Each operation runs one fixed G-code program; damage* runs reuse the *150025 programs (the same
# lines, the same line numbers), so only the sensors tell a damaged run from a normal one.
PROGRAM_OF: dict[str, str] = {op: op.replace("damage", "") + "150025" if op.startswith("damage") else op
                              for op in OPERATIONS}
PROGRAMS: tuple[str, ...] = tuple(dict.fromkeys(PROGRAM_OF.values()))

NODES: tuple[str, ...] = (
    "frame_b1", "frame_b2", "frame_l1", "frame_l2", "frame_l3", "frame_r1", "frame_r2",
    "spindle1", "spindle2", "xa_motor", "y_bed__1", "y_bed__2", "y_bed__3", "y_bed__4",
    "z_gant_1", "z_gant_2",
)
CHANNELS: tuple[str, ...] = (
    "Ax", "Ay", "Az", "Gx", "Gy", "Gz", "Mx", "My", "Mz",
    "Pressure", "Temperature", "Proximity", "ColorR", "ColorG", "ColorB", "ColorA", "RMS",
)
SESSION_CHANNELS: tuple[str, ...] = (
    "Pressure", "Temperature", "Proximity", "ColorR", "ColorG", "ColorB", "ColorA",
)
# The *_A columns are exact copies of these (and absent in one run): we read only the originals.
CURRENTS: tuple[str, ...] = ("spindle", "x_motor", "y_motor", "z_motor")
POSITIONS: tuple[str, ...] = ("posx", "posy", "posz")            # work coordinates, in `unit`
MACHINE_POSITIONS: tuple[str, ...] = ("mpox", "mpoy", "mpoz")    # machine coordinates, always mm
CONTROLLER_NUMERIC: tuple[str, ...] = POSITIONS + MACHINE_POSITIONS + ("feed",)
CATEGORICAL_CONTROLLER: tuple[str, ...] = ("stat", "unit", "dist", "coor", "momo")
LABEL_COLUMNS: tuple[str, ...] = ("line", "gcode_line", "gcode_string")
TARGET_COLUMN = "gcode_string"
UNIT_COLUMN = "unit"
LINE_NUMBER_COLUMN = "gcode_line"  # the program line number: label-side (orders the program path), never a feature
INCHES = 0  # `unit` code for inches; 1 is millimetres
MM_PER_INCH = 25.4

FEATURE_SETS = ("full", "side_channel")
# Columns every log must have, whatever the feature set: the label and the motor currents.
REQUIRED_COLUMNS: tuple[str, ...] = (TARGET_COLUMN,) + CURRENTS


def board_columns(exclude_channels: tuple[str, ...] = SESSION_CHANNELS) -> list[str]:
    """`<node>.<channel>` for every node, in fixed (node, channel) order."""
    return [f"{n}.{c}" for n in NODES for c in CHANNELS if c not in exclude_channels]


@dataclass(frozen=True)
class FeatureColumns:
    """The raw columns one feature set reads, in model input order."""

    continuous: tuple[str, ...]
    categorical: tuple[str, ...]

    @property
    def required(self) -> tuple[str, ...]:
        """Columns a log must have for this set (boards may be missing: they are filled)."""
        cols = REQUIRED_COLUMNS + tuple(c for c in self.continuous if "." not in c and c not in CURRENTS)
        cols += self.categorical
        if any(c in POSITIONS for c in self.continuous):
            cols += (UNIT_COLUMN,)
        return tuple(dict.fromkeys(cols))


def feature_columns(feature_set: str, exclude_channels: tuple[str, ...] = SESSION_CHANNELS,
                    exclude_columns: tuple[str, ...] = ()) -> FeatureColumns:
    """exclude_channels: board channel kinds dropped on every node ("Pressure", "RMS", ...);
    exclude_columns: single columns dropped ("mpox", "spindle", "frame_r2.Mx", ...)."""
    if feature_set not in FEATURE_SETS:
        raise ValueError(f"feature_set: unknown value {feature_set!r}; choose one of {', '.join(FEATURE_SETS)}")
    unknown = [c for c in exclude_channels if c not in CHANNELS]
    if unknown:
        raise ValueError(f"exclude_channels: unknown channel(s) {unknown}; known: {', '.join(CHANNELS)}")
    boards = tuple(board_columns(tuple(exclude_channels)))
    if feature_set == "full":
        cols = FeatureColumns(CONTROLLER_NUMERIC + CURRENTS + boards, CATEGORICAL_CONTROLLER)
    else:
        cols = FeatureColumns(CURRENTS + boards, ())
    unknown = [c for c in exclude_columns if c not in cols.continuous + cols.categorical]
    if unknown:
        raise ValueError(f"exclude_columns: {unknown} are not columns of the {feature_set!r} feature set")
    return FeatureColumns(tuple(c for c in cols.continuous if c not in exclude_columns),
                          tuple(c for c in cols.categorical if c not in exclude_columns))


def operation_of(run_name: str) -> str:
    """`adaptive150025_003_aligned.csv.gz` -> `adaptive150025` (the file-name prefix)."""
    return run_name.split("_", 1)[0]
