"""Smoke-test a built image where no container can be started: mount its filesystem (buildah), run
its CMD under chroot as the image's user with the image's environment, on loopback, and check it.

  python3 deploy/images/smoke.py inference --registry DIR [--image gcodefp-api:latest]
  python3 deploy/images/smoke.py dagster [--image gcodefp-dagster:latest]

Runs as root (mount, chroot) with the host's python3 and the standard library only. The command is
the image's CMD (inference: or --command, e.g. compose's) unchanged, except that it binds 127.0.0.1
and a free port: UVICORN_HOST/UVICORN_PORT in its environment, 0.0.0.0 and -p/--port in its argv.
Exits non-zero, with the reason and the server's log, on the first failed check.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from chroot_run import LoopbackPostgres, MountedImage, free_port, process_tree, sh, stop


class SmokeFailure(Exception):
    pass


def check(ok, message: str) -> None:
    if not ok:
        raise SmokeFailure(message)
    print(f"smoke: ok: {message}")


def http(url: str, body: bytes | None = None, timeout: float = 10) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"} if body else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def wait_for(what: str, probe, proc: subprocess.Popen, timeout: float):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SmokeFailure(f"{what}: the server exited with {proc.returncode}")
        try:
            result = probe()
            if result:
                return result
        except OSError:
            pass
        time.sleep(0.5)
    raise SmokeFailure(f"{what}: not within {timeout:.0f}s")


def ready_doc(url: str) -> dict | None:
    """/ready's answer once ready; None while starting; a failure once the package was refused."""
    status, body = http(url + "/ready")
    doc = json.loads(body)
    if status == 503 and doc.get("error"):
        raise SmokeFailure(f"/ready: the package was refused: {doc['error']}")
    return doc if status == 200 else None


def metrics_counting(url: str, predicts: int) -> str | None:
    """/metrics once it counts `predicts` /predict requests. A worker counts a request after sending
    the response, so a scrape (maybe answered by another worker) can land a moment before that."""
    status, body = http(url + "/metrics")
    text = body.decode()
    counted = re.search(r'^gcodefp_http_requests_total\{[^}]*endpoint="/predict"[^}]*\} (\d+)(\.0)?$', text, re.M)
    return text if status == 200 and counted and int(counted.group(1)) == predicts else None


def site_packages(root: Path) -> Path:
    found = sorted(root.glob("opt/venv/lib/python3*/site-packages"))
    if not found:
        raise SmokeFailure("no /opt/venv/lib/python3*/site-packages in the image")
    return found[0]


def space_report(root: Path, top: int = 12) -> int:
    """Where the image's bytes are: the largest site-packages entries, the venv and the base's python.
    Returns the whole filesystem's size (bytes allocated on disk, a little above buildah's figure)."""
    sp = site_packages(root)
    out = sh("du", "-s", "-B1", *map(str, sorted(sp.iterdir())))
    sizes = sorted(((int(n), Path(p).name) for n, p in (l.split("\t") for l in out.splitlines())), reverse=True)
    totals = {}
    for label, path in (("whole filesystem", root), ("/opt/venv", root / "opt/venv"), ("/usr/lib/python3.11", root / "usr/lib/python3.11")):
        totals[label] = int(sh("du", "-s", "-B1", "-x", str(path)).split()[0])
        print(f"smoke: space: {totals[label] / 1e6:8.1f} MB  {label}")
    for n, name in sizes[:top]:
        print(f"smoke: space: {n / 1e6:8.1f} MB  site-packages/{name}")
    return totals["whole filesystem"]


def on_loopback(cmd: list[str], port: int) -> list[str]:
    """cmd binding 127.0.0.1:port instead of 0.0.0.0 and its own port (-p/--port VALUE)."""
    out = [("127.0.0.1" if w == "0.0.0.0" else w) for w in cmd]
    for flag in ("-p", "--port"):
        if flag in out:
            out[out.index(flag) + 1] = str(port)
    return out


def smoke_inference(image: MountedImage, registry: Path, max_mb: float | None, command: list[str] | None) -> None:
    root, env = image.root, image.env
    sp = site_packages(root)
    check(not list(sp.glob("torch*")) and not list(sp.glob("nvidia*")), "no torch in the image's site-packages")
    check(not any((root / "usr/bin" / c).exists() for c in ("gcc", "cc", "g++", "c++", "make")), "no compilers")
    caches = [p for p in ("root/.cache", "home/gcodefp/.cache", "tmp/requirements-inference.txt", "src", "etc/pip.conf")
              if (root / p).exists()]
    check(not caches, f"no pip caches or build leftovers ({caches or 'none'})")
    total = space_report(root)
    if max_mb is not None:
        check(total <= max_mb * 1e6, f"the image's filesystem is {total / 1e6:.0f} MB <= {max_mb:.0f} MB")

    target = root / env["GCODEFP_REGISTRY"].lstrip("/")
    shutil.copytree(registry, target, dirs_exist_ok=True)
    uid, gid = image.user()
    for p in [target, *target.rglob("*")]:
        os.chown(p, uid, gid)
    version = (registry / "CURRENT").read_text().strip()
    sample = (registry / "packages" / version / "sample_request.json").read_bytes()

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    run_env = env | {"UVICORN_HOST": "127.0.0.1", "UVICORN_PORT": str(port)}
    with tempfile.NamedTemporaryFile(prefix="smoke-inference-", suffix=".log") as log:
        cmd = on_loopback(command or image.config["Cmd"], port)
        proc = image.popen(cmd, run_env, log)
        try:
            print(f"smoke: {'command' if command else 'CMD'} {cmd} as {image.config.get('User')} on {url}")
            ready = wait_for("/ready answers 200", lambda: ready_doc(url), proc, 120)
            check(ready.get("version") == version, f"/ready: version {ready.get('version')} == CURRENT {version}")
            predicts = 6  # one connection each: the kernel hands them to whichever worker accepts
            answers = [(lambda s, b: (s, json.loads(b)))(*http(url + "/predict", sample)) for _ in range(predicts)]
            check(all(s == 200 and isinstance(d.get("gcode_sequence"), str) and d.get("model_version") == version
                      for s, d in answers),
                  f"/predict answers the package's sample request {predicts}x (200, gcode_sequence, model_version {version})")
            text = wait_for("/metrics counts the /predict requests", lambda: metrics_counting(url, predicts), proc, 10)
            served_by = set(re.findall(r'"msg":"POST /predict 200","pid":(\d+)', Path(log.name).read_text()))
            check(True, f"/metrics counts all {predicts} /predict requests, served by {len(served_by)} worker(s)")
            check(f'version="{version}"' in text, "/metrics reports the served version")

            workers = int(cmd[cmd.index("--workers") + 1] if "--workers" in cmd else env.get("WEB_CONCURRENCY", "1"))
            pids = process_tree(proc.pid)
            maps = {p: Path(f"/proc/{p}/maps").read_text() for p in pids}
            uids = {p: Path(f"/proc/{p}/status").read_text().split("Uid:")[1].split()[0] for p in pids}
            serving = [p for p, m in maps.items() if "onnxruntime" in m]
            check(len(serving) >= workers, f"{len(serving)} worker processes have onnxruntime mapped ({workers} workers)")
            check(not any("torch" in m for m in maps.values()), f"no torch library mapped in any of {len(pids)} processes")
            check(set(uids.values()) == {str(uid)}, f"every process runs as uid {uid}")
        except SmokeFailure:
            stop(proc)
            print(Path(log.name).read_text()[-4000:], file=sys.stderr)
            raise
        stop(proc)
        check(proc.returncode == 0, f"the server stopped cleanly on SIGTERM (exit {proc.returncode})")
        text = Path(log.name).read_text()
        check("Traceback" not in text, "no traceback in the server's log")


def smoke_dagster(image: MountedImage) -> None:
    root = image.root
    sp = site_packages(root)
    check((sp / "torch").is_dir() and not list(sp.glob("nvidia*")), "torch is installed, without CUDA libraries")
    space_report(root, top=8)
    if LoopbackPostgres.bindir() is None:
        # Without PostgreSQL the image's instance (dagster.postgres.yaml) cannot load: a temporary
        # sqlite instance in the image's /tmp instead. Loading the code needs no instance storage.
        home = root / "tmp/smoke-dagster-home"
        home.mkdir()
        shutil.chown(home, *image.user())
        print("smoke: no PostgreSQL on this machine: the Dagster instance is a temporary sqlite one")
        code_server_checks(image, image.env | {"DAGSTER_HOME": "/tmp/smoke-dagster-home"})
        return
    with LoopbackPostgres() as pg_env:
        env = image.env | pg_env
        migrate = image.run(["dagster", "instance", "migrate"], env, timeout=180)
        if migrate.returncode != 0:
            print(migrate.stdout[-4000:], file=sys.stderr)
        check(migrate.returncode == 0, "the image's Postgres instance (dagster.postgres.yaml) creates its schema "
                                       f"on a loopback PostgreSQL (dagster instance migrate)")
        code_server_checks(image, env)


def code_server_checks(image: MountedImage, env: dict[str, str]) -> None:
    cmd = list(image.config["Cmd"])
    module = cmd[cmd.index("-m") + 1]
    attr = cmd[cmd.index("-a") + 1]
    validate = image.run(["dagster", "definitions", "validate", "-m", module, "-a", attr], env, timeout=300)
    if validate.returncode != 0:
        print(validate.stdout[-4000:], file=sys.stderr)
    check(validate.returncode == 0, f"dagster definitions validate -m {module} -a {attr}")

    port = free_port()
    run_cmd = on_loopback(cmd, port)
    health = ["dagster", "api", "grpc-health-check", "--host", "127.0.0.1", "--port", str(port)]
    # The location's repositories, asked of the running server (dagster's own gRPC client).
    lister = ["python", "-c", "from dagster._grpc.client import DagsterGrpcClient; from dagster._serdes import "
              f"deserialize_value; r = deserialize_value(DagsterGrpcClient(host='127.0.0.1', port={port})"
              ".list_repositories()); print(sorted(s.repository_name for s in r.repository_symbols))"]
    with tempfile.NamedTemporaryFile(prefix="smoke-dagster-", suffix=".log") as log:
        proc = image.popen(run_cmd, env, log)
        try:
            print(f"smoke: CMD {run_cmd} as {image.config.get('User')}")
            wait_for("the code server answers grpc-health-check", lambda: image.run(health, env, 60).returncode == 0,
                     proc, 240)
            check(True, f"the code server answers on 127.0.0.1:{port} (dagster api grpc-health-check)")
            listed = image.run(lister, env, 60)
            check(listed.returncode == 0 and "__repository__" in listed.stdout,
                  f"the code server serves the code location's repository: {listed.stdout.strip()[-200:]}")
        except SmokeFailure:
            stop(proc)
            print(Path(log.name).read_text()[-4000:], file=sys.stderr)
            raise
        stop(proc)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("which", choices=["inference", "dagster"])
    p.add_argument("--image", help="default: gcodefp-api:latest / gcodefp-dagster:latest")
    p.add_argument("--registry", type=Path, help="inference: a registry with a CURRENT package")
    p.add_argument("--max-mb", type=float, help="inference: fail if the image's filesystem is larger (MB)")
    p.add_argument("--command", type=json.loads, help="inference: run this JSON argv instead of the image's CMD "
                                                      "(e.g. docker-compose.yml's command for the api service)")
    args = p.parse_args()
    if os.geteuid() != 0:
        p.error("run as root (mount, chroot)")
    if args.which == "inference" and not (args.registry and (args.registry / "CURRENT").is_file()):
        p.error("inference needs --registry DIR holding a CURRENT package")
    image_name = args.image or {"inference": "gcodefp-api:latest", "dagster": "gcodefp-dagster:latest"}[args.which]
    t0 = time.monotonic()
    try:
        with MountedImage(image_name) as image:
            smoke_inference(image, args.registry, args.max_mb, args.command) if args.which == "inference" else smoke_dagster(image)
    except SmokeFailure as exc:
        print(f"smoke: FAILED ({image_name}): {exc}", file=sys.stderr)
        return 1
    print(f"smoke: {image_name} passed in {time.monotonic() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
