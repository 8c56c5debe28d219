"""The `gcodefp` console command: --help for every subcommand, clear errors instead of tracebacks."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from gcodefp_core.cli import build_parser, main

GCODEFP = [str(Path(sys.executable).with_name("gcodefp"))]


def subcommands() -> list[str]:
    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return sorted(action.choices)


def run(*args: str, check: bool = False) -> subprocess.CompletedProcess:
    return subprocess.run(GCODEFP + list(args), capture_output=True, text=True, timeout=120, check=check)


def test_top_level_help_lists_subcommands():
    out = run("--help", check=True).stdout
    for name in ("synth", "build-dataset"):
        assert name in out


@pytest.mark.parametrize("name", subcommands())
def test_every_subcommand_has_help(name, capsys):
    # In process (the entry point itself is exercised above): a subprocess per subcommand cost ~2 s each.
    with pytest.raises(SystemExit) as exit_:
        main([name, "--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0
    assert "usage: gcodefp " + name in out and "--" in out


def test_synth_then_build_dataset(tmp_path):
    res = run("synth", "--output", str(tmp_path / "logs"), "--runs-per-op", "2", check=True)
    assert "wrote 18 logs" in res.stdout
    res = run("build-dataset", "--source", str(tmp_path / "logs"), "--window", "32", "--output", str(tmp_path / "ds"))
    assert res.returncode == 0, res.stderr
    assert "windows" in res.stdout and (tmp_path / "ds" / "manifest.json").is_file()


def test_bad_input_is_one_line_not_a_traceback(tmp_path):
    bad_cfg = tmp_path / "cfg.json"
    bad_cfg.write_text(json.dumps({"data": {"feature_set": "full", "windw": 64}}))
    res = run("build-dataset", "--config", str(bad_cfg), "--output", str(tmp_path / "ds"))
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "unknown field(s) ['windw']" in res.stderr

    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "face_001_aligned.csv").write_text("t_console,stat\n1,x\n")
    res = run("build-dataset", "--source", str(logs), "--output", str(tmp_path / "ds"))
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "face_001_aligned.csv, line 1, column" in res.stderr

    res = run("build-dataset", "--source", str(tmp_path / "nowhere"), "--output", str(tmp_path / "ds"))
    assert res.returncode == 2 and "log folder not found" in res.stderr


def test_a_command_imports_only_its_own_layer():
    # `gcodefp serve --workers 1` serves from the process that parsed its command line: the pipeline
    # layer's Dagster must not ride along in the server's memory.
    probe = ("import sys; from gcodefp_core.cli import build_parser; build_parser(sys.argv[1:]); "
             "print(sorted({m.split('.')[0] for m in sys.modules}))")

    def layers(*argv: str) -> str:
        return subprocess.run([sys.executable, "-c", probe, *argv], capture_output=True, text=True, timeout=120,
                              check=True).stdout

    serve, pipeline = layers("serve", "--workers", "1"), layers("--debug", "pipeline", "--config", "x.json")
    assert "'api'" in serve and "dagster" not in serve
    assert "dagster" in pipeline and "'api'" not in pipeline
    listing = run("--help", check=True).stdout   # no command named: every layer, so the help lists them all
    assert "pipeline" in listing and "serve" in listing
