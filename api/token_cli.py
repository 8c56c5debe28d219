"""`gcodefp token add|list|revoke`: the client tokens file a server reads (api/auth.py).

The file keeps each token's SHA-256, never the token: `add` prints the new token once, to give to the
monitor or notebook that will call the server (as GCODEFP_API_TOKEN, which api.client and
`gcodefp monitor` send). A running server picks up a change within a second, with no restart.
"""
from __future__ import annotations

import argparse
import os
import sys
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

DEFAULT_FILE = "artifacts/api_tokens"


def register(sub) -> None:
    p = sub.add_parser("token", help="add, list or revoke the client tokens a server accepts",
                       description="Manage the file named by GCODEFP_API_TOKENS_FILE (or `gcodefp serve --tokens`). "
                                   "It holds digests only; `add` prints the token once.")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--file", type=Path, default=Path(os.environ.get("GCODEFP_API_TOKENS_FILE") or DEFAULT_FILE),
                        help="the tokens file (default: $GCODEFP_API_TOKENS_FILE, else %(default)s)")
    what = p.add_subparsers(dest="action", required=True)
    a = what.add_parser("add", parents=[common], help="a new token for NAME; prints it once")
    a.add_argument("name", help="who holds it (1-64 of A-Z a-z 0-9 . _ -), e.g. line3-monitor")
    a.add_argument("--machines", nargs="+", metavar="GLOB",
                   help="the machine ids it may stream (globs, e.g. 'mill-3*'); default: every machine")
    when = a.add_mutually_exclusive_group()
    when.add_argument("--expires", metavar="YYYY-MM-DD", type=date.fromisoformat,
                      help="refused from this day on (UTC); default: never")
    when.add_argument("--days", type=int, help="refused from this many days after today (UTC) on")
    a.set_defaults(handler=_add)
    ls = what.add_parser("list", parents=[common], help="the tokens' names and machines (never the tokens)")
    ls.set_defaults(handler=_list)
    r = what.add_parser("revoke", parents=[common], help="remove NAME's token; servers refuse it within a second")
    r.add_argument("name")
    r.set_defaults(handler=_revoke)


def _add(args) -> int:
    from .auth import add
    if args.days is not None and args.days < 1:
        raise ValueError(f"--days: must be >= 1, got {args.days}")
    expires = args.expires or (datetime.now(timezone.utc).date() + timedelta(days=args.days) if args.days else None)
    token = add(args.file, args.name, args.machines, expires)
    print(token)
    print(f"added {args.name!r} to {args.file}; this token is not stored and is shown only now", file=sys.stderr)
    return 0


def _list(args) -> int:
    from .auth import listing
    for t in listing(args.file):
        print(f"{t.name}\t{','.join(t.machines) or '*'}\t{t.expires.isoformat() if t.expires else 'never'}")
    return 0


def _revoke(args) -> int:
    from .auth import revoke
    revoke(args.file, args.name)
    print(f"revoked {args.name!r} in {args.file}")
    return 0
