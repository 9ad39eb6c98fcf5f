"""Compile step for ONNX Runtime targets: ORT's own offline graph optimisation, saved to disk.

ORT_ENABLE_EXTENDED applies the fusions that are exact (LayerNorm/SimplifiedLayerNorm, Gelu,
MatMul+Add, constant folding, ...) into com.microsoft operators for the CPU provider. The
result is CPU-specific, so only CPU bundles get it; Jetson bundles keep the portable graph
TensorRT's parser reads. Doing it once here saves that work at every daemon start.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import onnx

from convert.export import DATA_FILE, MODEL_FILE, save_model


def optimize_for_cpu(model_dir: Path) -> Path:
    import onnxruntime as ort

    src = Path(model_dir) / MODEL_FILE
    with tempfile.TemporaryDirectory(dir=model_dir) as tmp:
        opt = Path(tmp) / "opt.onnx"
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        so.optimized_model_filepath = str(opt)
        so.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                    "opt.onnx.data")
        so.add_session_config_entry(
            "session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        ort.InferenceSession(str(src), so, providers=["CPUExecutionProvider"])
        model = onnx.load(str(opt))
        (Path(model_dir) / DATA_FILE).unlink(missing_ok=True)
        return save_model(model, model_dir)
