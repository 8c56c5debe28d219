"""The `gcodefp` command: one subcommand per pipeline stage (see `gcodefp --help`).

Each layer brings its own subcommands: the core's modules in gcodefp_core.commands, and the
`gcodefp.commands` entry points of the installed distribution (`pipeline` from gcodefp_dagster,
`serve` from api). Each is a `register(subparsers)` function, so this module never imports a
higher layer by name and the arrows between layers point one way. A handler returns an exit code. Expected failures (bad config, malformed log, missing file) print one clear line and
exit 2 instead of a traceback; `--debug` shows the traceback.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys
from importlib.metadata import entry_points

from . import commands

COMMAND_GROUP = "gcodefp.commands"   # other layers' `register(subparsers)` functions


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """All subcommands; given the command line (argv), only the other layer that runs it is imported.

    A layer's import is not free: `pipeline` brings Dagster (~45 MB and a second of start-up), which
    `gcodefp serve --workers 1` would otherwise carry in the one process that serves. `gcodefp --help`
    and an unknown command still load every layer, so both list everything."""
    parser = argparse.ArgumentParser(
        prog="gcodefp", description="G-code fingerprinting: data, training, export, quantization, serving.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for mod in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        importlib.import_module(f"{commands.__name__}.{mod.name}").register(sub)
    entries = sorted(entry_points(group=COMMAND_GROUP), key=lambda e: e.name)
    command = _command(argv)
    if command in {e.name for e in entries}:
        entries = [e for e in entries if e.name == command]
    for entry in entries:
        try:
            register = entry.load()
        except ImportError as exc:  # that layer's dependencies are not installed (e.g. the inference image)
            logging.getLogger(__name__).debug("gcodefp %s unavailable: %s", entry.name, exc)
            continue
        register(sub)
    return parser


def _command(argv: list[str] | None) -> str | None:
    """The subcommand a command line names (its first word that is not an option), if any."""
    words = [a for a in argv or () if not a.startswith("-")]
    return words[0] if words else None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, FileExistsError, KeyError) as exc:
        if args.debug:
            raise
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"gcodefp {args.command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
