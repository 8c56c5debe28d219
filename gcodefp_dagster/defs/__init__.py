"""The gcodefp asset graph, one folder per domain (data, training, onnx, release), loaded by
dg.load_from_defs_folder; each module holds its assets with their checks."""
