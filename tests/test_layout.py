"""The layout holds by structure: the import contracts, file sizes a reader holds in their head,
and the variant names defined in one module."""
from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gcodefp_core import variants

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("gcodefp_core", "api", "gcodefp_dagster")
MAX_LINES = 350


def source_files():
    return sorted(p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py"))


def test_import_contracts_are_kept():
    linter = Path(sys.executable).with_name("lint-imports")
    if not linter.exists():
        linter = shutil.which("lint-imports")
    if linter is None:
        pytest.skip("import-linter is not installed (pip install -e '.[dev]')")
    res = subprocess.run([str(linter)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert "0 broken" in res.stdout


@pytest.mark.parametrize("path", source_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_no_source_file_is_too_long_to_read_in_one_sitting(path):
    assert len(path.read_text().splitlines()) <= MAX_LINES


def test_variant_names_are_defined_in_the_registry_only():
    """A variant name written as a string anywhere but gcodefp_core/variants.py is a second place
    that must change when a method is added or renamed."""
    names = set(variants.VARIANTS) | set(variants.METHODS)
    found = []
    for path in source_files():
        if path.name == "variants.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and node.value in names:
                found.append(f"{path.relative_to(REPO)}:{node.lineno} {node.value!r}")
    assert not found, "variant names outside the registry:\n" + "\n".join(found)
