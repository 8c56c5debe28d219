"""`gcodefp serve`: the FastAPI server (api.app:app) under uvicorn.

Registered into the `gcodefp` command through the `gcodefp.commands` entry point, so the core's
CLI never imports the service layer.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


def default_workers() -> int:
    """$WEB_CONCURRENCY when set (uvicorn's variable; a container, whose CPU quota the affinity mask does
    not show, sets it), else one worker per usable core: a worker runs its model calls on its event loop
    (one core each), and onnxruntime uses one thread per call (GCODEFP_INTRA_OP_THREADS). Stream sessions
    live in a worker and move with their machine's connection (api/stream_handoff.py); each worker
    listens on its own socket, so those connections spread evenly over the workers (api/supervisor.py)."""
    if os.environ.get("WEB_CONCURRENCY", "").strip().isdigit():
        return max(int(os.environ["WEB_CONCURRENCY"]), 1)
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except AttributeError:  # not Linux
        return max(os.cpu_count() or 1, 1)


def register(sub) -> None:
    p = sub.add_parser("serve", help="serve the current package of a registry (or one package) over HTTP",
                       description="Run api.app:app under uvicorn. The admin token for POST /admin/reload is "
                                   "read from $GCODEFP_ADMIN_TOKEN (the endpoint is off without it).")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--registry", type=Path, help="registry folder: serve its CURRENT package, follow promotions")
    src.add_argument("--package", type=Path, help="serve one package folder")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--workers", type=int, default=default_workers(),
                   help=f"uvicorn worker processes (default: $WEB_CONCURRENCY, else the cores this process may "
                        f"use; {default_workers()} here)")
    p.add_argument("--poll-seconds", type=float, help="how often workers check for a new package (default 1)")
    p.add_argument("--tokens", type=Path, metavar="FILE",
                   help="client tokens (GCODEFP_API_TOKENS_FILE; `gcodefp token add`): the data endpoints then "
                        "need 'Authorization: Bearer <token>'")
    p.add_argument("--tls-cert", type=Path, metavar="PEM", help="serve HTTPS with this certificate (chain); needs --tls-key")
    p.add_argument("--tls-key", type=Path, metavar="PEM", help="the certificate's private key")
    p.set_defaults(handler=_serve)


def _tls(args) -> dict:
    """uvicorn's TLS settings, checked here (files, and that the key matches the certificate) so that a
    mistake is one line at start-up, not a traceback in every worker."""
    if (args.tls_cert is None) != (args.tls_key is None):
        raise ValueError("--tls-cert and --tls-key go together")
    if args.tls_cert is None:
        return {}
    import ssl

    for flag, path in (("--tls-cert", args.tls_cert), ("--tls-key", args.tls_key)):
        if not path.is_file():
            raise FileNotFoundError(f"{flag}: no such file: {path}")
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(args.tls_cert, args.tls_key)
    except ssl.SSLError as exc:
        raise ValueError(f"--tls-cert {args.tls_cert} / --tls-key {args.tls_key}: not a certificate and its key "
                         f"({exc.reason or exc})") from None
    return {"ssl_certfile": str(args.tls_cert.resolve()), "ssl_keyfile": str(args.tls_key.resolve())}


def _serve(args) -> int:
    if args.registry is None and args.package is None and not (
            os.environ.get("GCODEFP_REGISTRY") or os.environ.get("GCODEFP_PACKAGE")):
        raise ValueError("serve: give --registry or --package (or set GCODEFP_REGISTRY / GCODEFP_PACKAGE)")
    if args.workers < 1:
        raise ValueError(f"--workers must be >= 1, got {args.workers}")
    for flag, value in (("--registry", args.registry), ("--package", args.package)):
        if value is not None and not value.is_dir():
            raise FileNotFoundError(f"{flag}: no such folder: {value}")
    if args.registry is not None:
        os.environ["GCODEFP_REGISTRY"] = str(args.registry.resolve())
        os.environ.pop("GCODEFP_PACKAGE", None)
    if args.package is not None:
        os.environ["GCODEFP_PACKAGE"] = str(args.package.resolve())
        os.environ.pop("GCODEFP_REGISTRY", None)
    if args.poll_seconds is not None:
        os.environ["GCODEFP_POLL_SECONDS"] = str(args.poll_seconds)
    tls = _tls(args)
    if args.tokens is not None:
        os.environ["GCODEFP_API_TOKENS_FILE"] = str(args.tokens.resolve())
    if os.environ.get("GCODEFP_API_TOKENS_FILE"):
        from .auth import TokenTable
        TokenTable(os.environ["GCODEFP_API_TOKENS_FILE"])  # a bad file is refused here, once, naming its line
    # Metrics of several workers are summed from files in one folder; it must start empty.
    metrics_dir = tempfile.mkdtemp(prefix="gcodefp-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    # Several workers hand a machine over when its monitor reconnects to another one (api/stream_handoff.py),
    # and a worker that restarts (SIGHUP, a rolling restart) leaves its machines' state for the others
    # (api/stream_state.py) unless GCODEFP_STREAM_STATE_DIR names a folder that outlives the server.
    # The handoff folder is in memory where there is one (tmpfs: a state file written and renamed in
    # ~60 us there, ~470 us on this machine's ext4); the restarts' states, a worker's every machine at
    # once, go to the temp folder on disk.
    made = []
    if args.workers > 1 and not os.environ.get("GCODEFP_STREAM_HANDOFF_DIR"):
        shm = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
        made.append(tempfile.mkdtemp(prefix="gcodefp-streams-", dir=shm))
        os.environ["GCODEFP_STREAM_HANDOFF_DIR"] = made[-1]
        if not os.environ.get("GCODEFP_STREAM_STATE_DIR"):
            made.append(tempfile.mkdtemp(prefix="gcodefp-stream-restarts-"))
            os.environ["GCODEFP_STREAM_STATE_DIR"] = made[-1]
    # Imported only now: the settings are read once, at import, from the variables set above.
    import uvicorn

    from .logging_setup import uvicorn_log_config

    from . import supervisor
    from .settings import SETTINGS

    try:
        if args.workers > 1 and SETTINGS.socket_per_worker and supervisor.supported():
            # A listening socket per worker: long-lived /stream connections spread evenly (api/supervisor.py).
            config = uvicorn.Config("api.app:app", host=args.host, port=args.port, workers=args.workers,
                                    log_config=uvicorn_log_config(), access_log=False, **tls)
            supervisor.run(config)
        else:
            uvicorn.run("api.app:app", host=args.host, port=args.port, workers=args.workers,
                        log_config=uvicorn_log_config(), access_log=False, **tls)
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)
        for folder, variable in zip(made, ("GCODEFP_STREAM_HANDOFF_DIR", "GCODEFP_STREAM_STATE_DIR")):
            shutil.rmtree(folder, ignore_errors=True)
            os.environ.pop(variable, None)
    return 0
