"""Deployment packages and the registry: build, verify (checksums), promote, rollback, list, CLI."""
from __future__ import annotations

import json

import pytest

from fakes import fake_export

from gcodefp_core import package as pkg


@pytest.fixture
def export_dir(tmp_path):
    return fake_export(tmp_path / "export")


def test_build_package_contents_and_manifest(export_dir, tmp_path):
    reg = tmp_path / "reg"
    out = pkg.build_package(export_dir, reg, version="v1", benchmark={"p95_ms": 3.2}, metrics={"acc": 0.9})
    assert out == reg / "packages" / "v1"
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(["m.encoder.onnx", "m.decoder.onnx", "m.encoder_only.onnx", "model.json", "model_card.md",
                            "benchmark.json", "sample_request.json", "manifest.json"])  # unrelated.onnx not copied
    manifest = pkg.verify_package(out)
    assert manifest["version"] == "v1" and manifest["variant"] == "int8_dynamic"
    assert set(manifest["files"]) == set(names) - {"manifest.json"}
    meta = json.loads((out / "model.json").read_text())
    assert meta["metrics"] == {"acc": 0.9} and meta["package_version"] == "v1"
    assert "acc: 0.9" in (out / "model_card.md").read_text()
    sample = json.loads((out / "sample_request.json").read_text())["sensor_data"]
    assert len(sample["continuous"]) == 4 and sample["continuous"][0] == [1.5, 2.0]
    assert sample["categorical"][0] == [5, 0]  # the first known code of each categorical feature
    assert not [p for p in (reg / "packages").iterdir() if p.name.startswith(".")]  # no temp folder left


def test_default_version_and_immutability(export_dir, tmp_path):
    reg = tmp_path / "reg"
    out = pkg.build_package(export_dir, reg)
    assert out.name.startswith("v") and pkg.list_versions(reg) == [out.name]
    with pytest.raises(FileExistsError, match="already exists"):
        pkg.build_package(export_dir, reg, version=out.name)
    with pytest.raises(pkg.PackageError, match="version"):
        pkg.build_package(export_dir, reg, version="../escape")


def test_the_same_model_packaged_twice_in_one_second_gets_two_versions(export_dir, tmp_path, monkeypatch):
    # the default name is v<UTC second>-<hash of model.json>: a re-materialization right after the last
    # one (an automation, a second click) names the same; it gets the next free name, not an error
    monkeypatch.setattr(pkg, "_new_version", lambda meta_bytes: "v20261204-223349-acdc5679")
    reg = tmp_path / "reg"
    names = [pkg.build_package(export_dir, reg).name for _ in range(3)]
    assert names == ["v20261204-223349-acdc5679", "v20261204-223349-acdc5679-2", "v20261204-223349-acdc5679-3"]
    assert pkg.list_versions(reg) == names
    assert all(pkg.verify_package(reg / "packages" / n)["version"] == n for n in names)


def test_build_refuses_folder_without_model_json(tmp_path):
    with pytest.raises(pkg.PackageError, match="model.json: not found"):
        pkg.build_package(tmp_path, tmp_path / "reg")


def test_build_from_a_variant_json_and_missing_graph(export_dir, tmp_path):
    (export_dir / "model.json").rename(export_dir / "model_int8_dynamic.json")
    out = pkg.build_package(export_dir / "model_int8_dynamic.json", tmp_path / "reg", version="q1")
    assert (out / "model.json").is_file() and pkg.verify_package(out)["version"] == "q1"
    (export_dir / "m.decoder.onnx").unlink()
    with pytest.raises(pkg.PackageError, match="'m.decoder.onnx' is missing"):
        pkg.build_package(export_dir / "model_int8_dynamic.json", tmp_path / "reg", version="q2")


@pytest.mark.parametrize("damage", ["modify", "delete", "extra"])
def test_verify_names_the_bad_file(export_dir, tmp_path, damage):
    out = pkg.build_package(export_dir, tmp_path / "reg", version="v1")
    target = out / "m.decoder.onnx"
    if damage == "modify":
        data = bytearray(target.read_bytes())
        data[0] ^= 0xFF  # same size, different content: only the sha256 catches it
        target.write_bytes(bytes(data))
        match = "m.decoder.onnx: sha256"
    elif damage == "delete":
        target.unlink()
        match = "m.decoder.onnx: listed in the manifest but missing"
    else:
        (out / "intruder.onnx").write_bytes(b"x")
        match = "intruder.onnx: not listed"
    with pytest.raises(pkg.PackageError, match=match):
        pkg.verify_package(out)


def test_promote_rollback_and_pointers(export_dir, tmp_path):
    reg = tmp_path / "reg"
    for v in ("v1", "v2", "v3"):
        pkg.build_package(export_dir, reg, version=v)
    assert pkg.current_version(reg) is None
    with pytest.raises(pkg.PackageError, match="no version promoted"):
        pkg.current_package(reg)
    with pytest.raises(pkg.PackageError, match="nothing to roll back"):
        pkg.rollback(reg)
    assert pkg.promote(reg, "v1") is None
    assert pkg.promote(reg, "v2") == "v1"
    assert pkg.current_version(reg) == "v2" and pkg.previous_version(reg) == "v1"
    assert pkg.current_package(reg) == reg / "packages" / "v2"
    assert pkg.rollback(reg) == "v1"
    assert (pkg.current_version(reg), pkg.previous_version(reg)) == ("v1", "v2")
    with pytest.raises(pkg.PackageError, match="no such package"):
        pkg.promote(reg, "v9")
    # a corrupted package is never promoted; the pointers stay as they were
    (reg / "packages" / "v3" / "m.encoder.onnx").write_bytes(b"corrupt")
    with pytest.raises(pkg.PackageError, match="m.encoder.onnx"):
        pkg.promote(reg, "v3")
    assert (pkg.current_version(reg), pkg.previous_version(reg)) == ("v1", "v2")
    assert pkg.list_versions(reg) == ["v1", "v2", "v3"]
    assert not [p for p in reg.iterdir() if p.name.startswith(".")]  # pointer temp files renamed away


def test_cli_package_commands(export_dir, tmp_path, capsys):
    from gcodefp_core.cli import main

    reg = tmp_path / "reg"
    assert main(["package", "build", str(export_dir), "--registry", str(reg), "--version", "a1", "--promote"]) == 0
    assert main(["package", "build", str(export_dir), "--registry", str(reg), "--version", "a2"]) == 0
    assert main(["package", "promote", "a2", "--registry", str(reg)]) == 0
    assert main(["package", "verify", "a2", "--registry", str(reg)]) == 0
    capsys.readouterr()
    assert main(["package", "list", "--registry", str(reg)]) == 0
    listing = capsys.readouterr().out
    assert "a1" in listing and "* a2" in listing
    assert main(["package", "rollback", "--registry", str(reg)]) == 0
    assert pkg.current_version(reg) == "a1"
    (reg / "packages" / "a2" / "benchmark.json").write_text("{}")
    assert main(["package", "verify", "a2", "--registry", str(reg)]) == 2
    assert "benchmark.json" in capsys.readouterr().err


def test_serve_command_refuses_a_missing_source(monkeypatch, tmp_path, capsys):
    from gcodefp_core.cli import main

    monkeypatch.delenv("GCODEFP_REGISTRY", raising=False)
    monkeypatch.delenv("GCODEFP_PACKAGE", raising=False)
    assert main(["serve"]) == 2
    assert "give --registry or --package" in capsys.readouterr().err
    assert main(["serve", "--registry", str(tmp_path / "nope")]) == 2
    assert "--registry: no such folder" in capsys.readouterr().err


def test_sample_request_and_card_follow_the_models_answer(export_dir, tmp_path):
    """A decoder-only model's sample request asks for greedy decoding; a model with a line head
    asks for its line lookup, and the card says which feature set and answer it ships."""
    plain = pkg.build_package(export_dir, tmp_path / "reg", version="v1")
    assert json.loads((plain / "sample_request.json").read_text())["inference_config"] == {"method": "greedy"}
    meta = json.loads((export_dir / "model.json").read_text())
    meta["line_table"] = {"lines": ["G0 X1", "M30"], "programs": ["face"], "program_lines": [[0, 1]],
                          "operation_program": [0], "operation_variant": [0]}
    (export_dir / "model.json").write_text(json.dumps(meta))
    lined = pkg.build_package(export_dir, tmp_path / "reg", version="v2")
    assert json.loads((lined / "sample_request.json").read_text())["inference_config"] == {"method": "line"}
    card = (lined / "model_card.md").read_text()
    assert "line head (a lookup among the 2 program lines" in card
    assert f"feature set {meta['features']['feature_set']}" in card
    assert "training augmentation: none" in card
    assert "streaming mode (POST /stream/{machine}): operation evidence only (no program clock)" in card
    meta["train_config"] = {"epochs": 3, "board_dropout": 0.25, "sensor_offset_std": 0.0}
    meta["program_clock"] = {"programs": ["face"], "line": [[0, 1]], "share": [[1.0, 0.5]], "weight": 2.0}
    (export_dir / "model.json").write_text(json.dumps(meta))
    card = (pkg.build_package(export_dir, tmp_path / "reg", version="v3") / "model_card.md").read_text()
    assert "training augmentation: board_dropout 0.25\n" in card
    assert "program clock over 1 programs, clock weight 2 (chosen on validation)" in card
    # A program tracker is what /stream serves, once the predict graph gives the line_logits it reads.
    meta["program_tracker"] = {"operations": ["face"], "programs": ["face"], "operation_program": [0],
                               "timeline_line": [[[0], [1]]], "timeline_share": [[[1.0], [1.0]]],
                               "tempo": [[0.01, 0.98, 0.01]], "line_log_prior": [-0.7, -0.7], "params": {}}
    (export_dir / "model.json").write_text(json.dumps(meta))
    card = (pkg.build_package(export_dir, tmp_path / "reg", version="v4") / "model_card.md").read_text()
    assert "program clock over 1 programs" in card   # an export without line_logits streams with the clock
    meta["graphs"] = meta.get("graphs", {}) | {"predict": {"outputs": [{"name": "line_logits"}]}}
    (export_dir / "model.json").write_text(json.dumps(meta))
    card = (pkg.build_package(export_dir, tmp_path / "reg", version="v5") / "model_card.md").read_text()
    assert "program tracker (a forward filter over the row offsets of 1 programs; no row counter needed)" in card
