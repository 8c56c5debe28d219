"""ONNX: the fp32 export of the shipped member (with its parity check), its encoder-only export,
and one asset per quantized variant of the registry (gcodefp_core.variants) with its gate on the
served answer. Each model folder holds model.json + graphs, accuracy.json (served-answer accuracy
on the evaluation windows) and served_answers.json (right/wrong per window, for the paired gate)."""

from pathlib import Path
from typing import Optional

import dagster as dg

from gcodefp_core.release import CONFIDENCE
from gcodefp_core.variants import QUANTIZED, REFERENCE, VARIANTS

from ...automation import DOWNSTREAM
from ...resources import ArtifactStore, QualityGates
from ..training.assets import selected_checkpoint

GROUP = "onnx"


class ExportConfig(dg.Config):
    verify_windows: int = 256               # PyTorch vs onnxruntime windows checked during export
    eval_windows: int = 2000                # test windows whose served answer is scored (evenly spaced)
    opset: Optional[int] = None


class QuantizeConfig(dg.Config):
    calibration_windows: int = 256          # calibrated variants: MinMax calibration (train split)
    eval_windows: int = 2000


def score_served(artifacts: ArtifactStore, folder: Path, variant: str, windows: int) -> dict:
    """Score the served answer of the model in `folder` on the evaluation windows: write
    served_answers.json and accuracy.json there; -> accuracy (points) and window count."""
    from gcodefp_core.dataset import load_dataset
    from gcodefp_core.fileio import write_json
    from gcodefp_core.release import evaluation_windows, save_correctness, served_correctness
    from gcodefp_core.runtime import OnnxPredictor

    ds = load_dataset(artifacts.dataset())
    ids = evaluation_windows(ds, "test", windows)
    correct = served_correctness(OnnxPredictor.load(folder), ds, ids)
    save_correctness(folder / "served_answers.json", ids, correct)
    acc = {"windows": len(ids), **{f"{k}_acc": float(100 * v.mean()) for k, v in correct.items()}}
    write_json(folder / "accuracy.json", {"variant": variant, "accuracy_points": acc})
    return acc


def model_metadata(meta: dict, folder: Path, acc: dict) -> dict:
    return {"path": dg.MetadataValue.path(str(folder / "model.json")), "variant": meta["variant"],
            "size_bytes": meta["total_size_bytes"], "size_mb": round(meta["total_size_bytes"] / 2**20, 3),
            "graphs": dg.MetadataValue.json(meta["files"]), "parameters": meta.get("parameter_count"),
            **{f"test_{k}": v for k, v in acc.items()}}


@dg.asset(group_name=GROUP, kinds={"onnx", "pytorch"}, deps=["ensemble_config"], automation_condition=DOWNSTREAM,
          description="fp32 ONNX export of the shipped member (encoder, decoder step and line graphs + model.json), "
                      "verified against PyTorch during export; its served answer scored on the test windows.")
def onnx_model(context: dg.AssetExecutionContext, config: ExportConfig, artifacts: ArtifactStore) -> dg.MaterializeResult:
    from gcodefp_core.export import export_checkpoint

    ckpt, member = selected_checkpoint(artifacts)
    with artifacts.publish(artifacts.model_dir(REFERENCE)) as staging:
        meta = export_checkpoint(ckpt, staging / "model.onnx", verify_windows=config.verify_windows,
                                 opset=config.opset, dataset=artifacts.dataset())
        acc = score_served(artifacts, staging, REFERENCE, config.eval_windows)
    parity = meta["parity"]
    return dg.MaterializeResult(metadata={
        **model_metadata(meta, artifacts.model_dir(REFERENCE), acc), "member": member["name"],
        "source_checkpoint": dg.MetadataValue.path(str(ckpt)), "export_parity_passed": parity["passed"],
        "export_parity_max_abs_diff": dg.MetadataValue.json(parity["max_abs_diff"]),
        "opset": meta["opset"], "export_seconds": meta["export_seconds"]})


@dg.asset_check(asset=onnx_model, blocking=True,
                description="The fp32 graphs reproduce the PyTorch checkpoint on dataset windows (max |diff| of every "
                            "output <= 1e-3, greedy lines identical on >= 99.9% of windows). Blocking.")
def onnx_parity(artifacts: ArtifactStore, gates: QualityGates) -> dg.AssetCheckResult:
    from gcodefp_core.export import verify

    meta_path = artifacts.model_dir(REFERENCE) / "model.json"
    try:
        report = verify(meta_path, dataset=artifacts.dataset(), windows=gates.parity_windows)
    except Exception as exc:  # an unloadable or inconsistent graph is a failed check, with the reason
        return dg.AssetCheckResult(passed=False, metadata={"error": f"{type(exc).__name__}: {exc}",
                                                           "model": dg.MetadataValue.path(str(meta_path))})
    return dg.AssetCheckResult(passed=bool(report["passed"]), metadata={
        "windows": report["windows"], "data": report["data"],
        **{f"max_abs_diff_{k}": float(v) for k, v in report["max_abs_diff"].items()},
        **{f"greedy_identical_{k}": float(v) for k, v in report.get("greedy_identical", {}).items()},
        "bar_max_abs_diff": report["bars"]["max_abs_diff"], "bar_min_greedy_identical": report["bars"]["min_greedy_identical"],
        "failures": dg.MetadataValue.json(report["failures"])})


@dg.asset(group_name=GROUP, kinds={"onnx"}, deps=["ensemble_config"], automation_condition=DOWNSTREAM,
          description="Encoder-only export of the shipped member (operation logits + fingerprint): for clients that "
                      "need no G-code decoding.")
def encoder_onnx(context: dg.AssetExecutionContext, config: ExportConfig, artifacts: ArtifactStore) -> dg.MaterializeResult:
    from gcodefp_core.export import export_checkpoint

    ckpt, member = selected_checkpoint(artifacts)
    with artifacts.publish(artifacts.model_dir("encoder_only")) as staging:
        meta = export_checkpoint(ckpt, staging / "model.onnx", encoder_only=True, verify_windows=config.verify_windows,
                                 opset=config.opset, dataset=artifacts.dataset())
    return dg.MaterializeResult(metadata={
        "path": dg.MetadataValue.path(str(artifacts.model_dir("encoder_only") / "model.json")), "member": member["name"],
        "size_bytes": meta["total_size_bytes"], "export_parity_passed": meta["parity"]["passed"],
        "export_parity_max_abs_diff": dg.MetadataValue.json(meta["parity"]["max_abs_diff"])})


def gate_verdict(artifacts: ArtifactStore, gates: QualityGates, variant: str):
    """The variant's served answer against fp32's, paired on the same windows (gcodefp_core.release)."""
    from gcodefp_core.release import judge_variant, load_correctness

    ref_ids, ref = load_correctness(artifacts.served_answers(REFERENCE))
    ids, got = load_correctness(artifacts.served_answers(variant))
    if len(ids) != len(ref_ids) or (ids != ref_ids).any():
        raise ValueError(f"{variant} and {REFERENCE} were scored on different windows; rematerialize both "
                         "with the same eval_windows")
    return judge_variant(variant, ref, got, gates.bar(variant), gates.confidence)


def variant_asset(variant: str) -> dg.AssetsDefinition:
    spec = VARIANTS[variant]

    @dg.asset(name=f"model_{variant}", group_name=GROUP, kinds={"onnx"}, deps=[onnx_model],
              automation_condition=DOWNSTREAM,
              description=f"{variant}: {spec.description} (gcodefp_core.quantize, method {spec.method!r}), with its "
                          "served answer scored on the same test windows as fp32.")
    def build(context: dg.AssetExecutionContext, config: QuantizeConfig, artifacts: ArtifactStore,
              gates: QualityGates) -> dg.MaterializeResult:
        from gcodefp_core.quantize import quantize_model

        with artifacts.publish(artifacts.model_dir(variant)) as staging:
            meta = quantize_model(artifacts.model_dir(REFERENCE) / "model.json", staging / "model.onnx", spec.method,
                                  calibration_dataset=artifacts.dataset(), calibration_windows=config.calibration_windows)
            acc = score_served(artifacts, staging, variant, config.eval_windows)
        figures = gate_verdict(artifacts, gates, variant).figures()
        return dg.MaterializeResult(metadata={
            **model_metadata(meta, artifacts.model_dir(variant), acc),
            **{k: v for k, v in figures.items() if k.endswith(("_drop_points", "_reference_only", "_variant_only"))},
            "size_ratio_vs_fp32": round(meta["quantization"]["size_ratio_vs_fp32"], 4)})

    @dg.asset_check(asset=build, name="served_answer_vs_fp32",
                    description=f"{variant} keeps fp32's served answer (exact line and operation): blocked only when "
                                f"the lower {CONFIDENCE:.0%} one-sided bound of the paired drop exceeds its bar "
                                f"({spec.max_drop_points} points). Not blocking: a variant that fails is not shipped.")
    def gate(artifacts: ArtifactStore, gates: QualityGates) -> dg.AssetCheckResult:
        verdict = gate_verdict(artifacts, gates, variant)
        figures = verdict.figures()
        return dg.AssetCheckResult(passed=verdict.passed, metadata={
            k: dg.MetadataValue.float(float(v)) if isinstance(v, float) else v for k, v in figures.items()})

    return dg.Definitions(assets=[build], asset_checks=[gate])


defs = dg.Definitions.merge(
    dg.Definitions(assets=[onnx_model, encoder_onnx], asset_checks=[onnx_parity]),
    *(variant_asset(v) for v in QUANTIZED))
