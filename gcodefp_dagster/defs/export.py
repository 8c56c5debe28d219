"""ONNX assets: the fp32 export of the shipped member, its encoder-only export, and the quantized
variants. Each model folder holds model.json + graphs (gcodefp_core.export layout) and an
accuracy.json (test-split accuracy, and for variants the points lost against fp32) that the
accuracy checks and the benchmark's variant choice read."""

import json
from pathlib import Path
from typing import Optional

import dagster as dg

from gcodefp_core.fileio import write_json
from gcodefp_core.variants import QUANTIZED, VARIANTS

from .data import dataset_folder
from .resources import ArtifactStore
from .training import selected_checkpoint

GROUP = "onnx"
VARIANT_METHODS = {name: VARIANTS[name].method for name in QUANTIZED}
ACCURACY_KEYS = ("op_acc", "token_acc_greedy", "token_acc_tf", "exact_match")


class ExportConfig(dg.Config):
    verify_windows: int = 256               # PyTorch vs onnxruntime windows checked during export
    eval_windows: int = 1000                # test windows scored for accuracy.json (evenly spaced)
    opset: Optional[int] = None


class QuantizeConfig(dg.Config):
    calibration_windows: int = 256          # int8_static MinMax calibration (train split)
    eval_windows: int = 1000


def model_dir(artifacts: ArtifactStore, variant: str) -> Path:
    return artifacts.path("onnx", variant)


def read_accuracy(artifacts: ArtifactStore, variant: str) -> dict:
    path = model_dir(artifacts, variant) / "accuracy.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; materialize the {variant} model asset first")
    return json.loads(path.read_text())


def score(folder: Path, dataset: Path, windows: int) -> dict:
    from gcodefp_core.dataset import load_dataset
    from gcodefp_core.quantize import accuracy
    from gcodefp_core.runtime import OnnxPredictor

    return accuracy(OnnxPredictor.load(folder), load_dataset(dataset), "test", max_windows=windows)


def model_metadata(meta: dict, folder: Path, acc: dict) -> dict:
    return {"path": dg.MetadataValue.path(str(folder / "model.json")), "variant": meta["variant"],
            "size_bytes": meta["total_size_bytes"], "size_mb": round(meta["total_size_bytes"] / 2**20, 3),
            "graphs": dg.MetadataValue.json(meta["files"]), "parameters": meta.get("parameter_count"),
            **{f"test_{k}": float(acc[k]) for k in ACCURACY_KEYS}, "test_windows": acc["windows"]}


@dg.asset(group_name=GROUP, kinds={"onnx", "pytorch"}, deps=["ensemble_config"],
          description="fp32 ONNX export of the shipped member (encoder, decoder step, fused greedy and encoder-only "
                      "graphs + model.json), verified against PyTorch during export.")
def onnx_model(context: dg.AssetExecutionContext, config: ExportConfig, artifacts: ArtifactStore) -> dg.MaterializeResult:
    from gcodefp_core.export import export_checkpoint

    ckpt, member = selected_checkpoint(artifacts)
    folder, data = model_dir(artifacts, "fp32"), dataset_folder(artifacts)
    meta = export_checkpoint(ckpt, folder / "model.onnx", verify_windows=config.verify_windows, opset=config.opset,
                             dataset=data)
    acc = score(folder, data, config.eval_windows)
    write_json(folder / "accuracy.json", {"variant": "fp32", "accuracy": acc, "member": member["name"]})
    parity = meta["parity"]
    return dg.MaterializeResult(metadata={
        **model_metadata(meta, folder, acc), "member": member["name"], "source_checkpoint": dg.MetadataValue.path(str(ckpt)),
        "export_parity_passed": parity["passed"], "export_parity_max_abs_diff": dg.MetadataValue.json(parity["max_abs_diff"]),
        "opset": meta["opset"], "export_seconds": meta["export_seconds"]})


@dg.asset(group_name=GROUP, kinds={"onnx"}, deps=["ensemble_config"],
          description="Encoder-only export of the shipped member (operation logits + fingerprint): for clients that "
                      "need no G-code decoding.")
def encoder_onnx(context: dg.AssetExecutionContext, config: ExportConfig, artifacts: ArtifactStore) -> dg.MaterializeResult:
    from gcodefp_core.export import export_checkpoint

    ckpt, member = selected_checkpoint(artifacts)
    folder = model_dir(artifacts, "encoder_only")
    meta = export_checkpoint(ckpt, folder / "model.onnx", encoder_only=True, verify_windows=config.verify_windows,
                             opset=config.opset, dataset=dataset_folder(artifacts))
    return dg.MaterializeResult(metadata={
        "path": dg.MetadataValue.path(str(folder / "model.json")), "member": member["name"],
        "size_bytes": meta["total_size_bytes"], "export_parity_passed": meta["parity"]["passed"],
        "export_parity_max_abs_diff": dg.MetadataValue.json(meta["parity"]["max_abs_diff"])})


def build_variant_asset(variant: str):
    method = VARIANT_METHODS[variant]

    @dg.asset(name=f"model_{variant}", group_name=GROUP, kinds={"onnx"}, deps=[onnx_model],
              description=f"{variant} variant of the fp32 export (gcodefp_core.quantize, method {method!r}) with its "
                          "test accuracy and the points lost against fp32.")
    def variant_asset(context: dg.AssetExecutionContext, config: QuantizeConfig,
                      artifacts: ArtifactStore) -> dg.MaterializeResult:
        from gcodefp_core.quantize import quantize_model

        fp32, folder, data = model_dir(artifacts, "fp32"), model_dir(artifacts, variant), dataset_folder(artifacts)
        meta = quantize_model(fp32 / "model.json", folder / "model.onnx", method, calibration_dataset=data,
                              calibration_windows=config.calibration_windows)
        acc = score(folder, data, config.eval_windows)
        base = read_accuracy(artifacts, "fp32")["accuracy"]
        if base["windows"] != acc["windows"]:  # compare on the same windows
            base = score(fp32, data, config.eval_windows)
        drops = {k: 100 * (base[k] - acc[k]) for k in ACCURACY_KEYS}
        write_json(folder / "accuracy.json", {"variant": variant, "accuracy": acc, "fp32_accuracy": base,
                                              "drop_points_vs_fp32": drops})
        return dg.MaterializeResult(metadata={
            **model_metadata(meta, folder, acc), **{f"drop_points_{k}": round(v, 4) for k, v in drops.items()},
            "size_ratio_vs_fp32": round(meta["quantization"]["size_ratio_vs_fp32"], 4),
            "agreement_vs_fp32": dg.MetadataValue.json(meta["parity"])})

    return variant_asset


model_fp16, model_int8_dynamic, model_int8_static = (build_variant_asset(v) for v in VARIANT_METHODS)
