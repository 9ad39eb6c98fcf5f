"""Quantize an fp32 bundle for its target, gated on accuracy (see quantize/pipeline.py).

    from quantize import quantize_bundle, GateFailure, QuantizeResult

Names are imported on first use so that `toolkit --help` (which reads quantize.calibration's
defaults) does not pay for onnx and onnxruntime.
"""

from __future__ import annotations

from typing import Any

__all__ = ["GateFailure", "QuantizeResult", "default_output", "quantize_bundle"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from quantize import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'quantize' has no attribute {name!r}")
