"""CLI subcommands; each module defines `register(subparsers)` (discovered by gcodefp_core.cli)."""
