"""Run an image's commands without a container engine: its filesystem mounted by buildah, the
command under chroot as the image's user with the image's environment (deploy/images/smoke.py).
Also a throwaway loopback PostgreSQL for the Dagster image's instance. Root and the standard library only."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
from pathlib import Path

def sh(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout.strip()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MountedImage:
    """A working container of the image, mounted, with /proc and /dev inside; removed on exit."""

    def __init__(self, image: str):
        self.image, self.mounts = image, []

    def __enter__(self) -> "MountedImage":
        self.ctr = sh("buildah", "from", "--pull=false", "--quiet", self.image)
        self.root = Path(sh("buildah", "mount", self.ctr))
        self.config = json.loads(sh("buildah", "inspect", "--type", "container", self.ctr))["Docker"]["config"]
        for target, argv in (("proc", ["-t", "proc", "proc"]), ("dev", ["--rbind", "/dev"])):
            sh("mount", *argv, str(self.root / target))
            self.mounts.append(self.root / target)
        return self

    def __exit__(self, *exc) -> None:
        for path in reversed(self.mounts):
            subprocess.run(["umount", "-R", "-l", str(path)], check=False)
        subprocess.run(["buildah", "umount", self.ctr], check=False, capture_output=True)
        subprocess.run(["buildah", "rm", self.ctr], check=False, capture_output=True)

    @property
    def env(self) -> dict[str, str]:
        return dict(e.split("=", 1) for e in self.config.get("Env") or [])

    def user(self) -> tuple[int, int]:
        """The image's USER as numbers (a name is looked up in the image's /etc/passwd)."""
        user, _, group = (self.config.get("User") or "0").partition(":")
        passwd = {l.split(":")[0]: l.split(":") for l in (self.root / "etc/passwd").read_text().splitlines()}
        uid = int(user) if user.isdigit() else int(passwd[user][2])
        gid = int(group) if group.isdigit() else int(next((p[3] for p in passwd.values() if int(p[2]) == uid), uid))
        return uid, gid

    def popen(self, argv: list[str], env: dict[str, str], log) -> subprocess.Popen:
        """Start argv inside the image as its user, in its WORKDIR, with exactly `env`."""
        root, workdir, (uid, gid) = str(self.root), self.config.get("WorkingDir") or "/", self.user()

        def enter():  # runs in the child before exec: chroot first, then drop root
            os.chroot(root)
            os.chdir(workdir)
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)

        return subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                preexec_fn=enter, start_new_session=True)

    def run(self, argv: list[str], env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
        with tempfile.TemporaryFile() as log:
            proc = self.popen(argv, env, log)
            try:
                proc.wait(timeout)
            finally:
                stop(proc)
            log.seek(0)
            return subprocess.CompletedProcess(argv, proc.returncode, log.read().decode(errors="replace"))


def stop(proc: subprocess.Popen, grace: float = 20) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def process_tree(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


class LoopbackPostgres:
    """A throwaway PostgreSQL server on 127.0.0.1 (the host's binaries, run as `nobody`), for the
    image's Postgres-backed Dagster instance; None where the host has no PostgreSQL."""

    @staticmethod
    def bindir() -> Path | None:
        found = shutil.which("initdb") or next(iter(sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))), None)
        return Path(found).resolve().parent if found else None

    def __enter__(self) -> dict[str, str]:
        self.dir = Path(tempfile.mkdtemp(prefix="smoke-postgres-"))
        shutil.chown(self.dir, "nobody")
        self.port, self.ctl = free_port(), str(self.bindir() / "pg_ctl")
        as_nobody = ["runuser", "-u", "nobody", "--"]
        sh(*as_nobody, str(self.bindir() / "initdb"), "-D", f"{self.dir}/data", "-U", "dagster", "--auth=trust")
        sh(*as_nobody, self.ctl, "-D", f"{self.dir}/data", "-l", f"{self.dir}/log", "-w", "start",
           "-o", f"-h 127.0.0.1 -p {self.port} -k {self.dir}")
        return {"DAGSTER_PG_HOST": "127.0.0.1", "DAGSTER_PG_PORT": str(self.port), "DAGSTER_PG_DB": "postgres",
                "DAGSTER_PG_USERNAME": "dagster", "DAGSTER_PG_PASSWORD": "unused-with-trust-auth"}

    def __exit__(self, *exc) -> None:
        subprocess.run(["runuser", "-u", "nobody", "--", self.ctl, "-D", f"{self.dir}/data", "stop", "-m", "immediate"],
                       check=False, capture_output=True)
        shutil.rmtree(self.dir, ignore_errors=True)
