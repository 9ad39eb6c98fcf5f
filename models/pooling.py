"""Read a sentence-transformers folder's pooling setup (without sentence-transformers)."""

from __future__ import annotations

import json
from pathlib import Path

from bundle.manifest import Pooling


def read_pooling(model_dir: Path) -> Pooling:
    """{"mode", "normalize", "source"}: from modules.json + 1_Pooling/config.json when present,
    else plain mean pooling without normalisation (what feature-extraction pipelines do)."""
    model_dir = Path(model_dir)
    modules_file = model_dir / "modules.json"
    if not modules_file.is_file():
        return Pooling("mean", False, "default (no modules.json)")
    modules = json.loads(modules_file.read_text(encoding="utf-8"))
    normalize = any(m.get("type", "").endswith("Normalize") for m in modules)
    mode = "mean"
    for m in modules:
        if m.get("type", "").endswith("Pooling"):
            cfg = json.loads((model_dir / m.get("path", "1_Pooling") / "config.json").read_text())
            if cfg.get("pooling_mode_cls_token"):
                mode = "cls"
            elif cfg.get("pooling_mode_max_tokens"):
                mode = "max"
    return Pooling(mode, normalize, "sentence-transformers modules.json")  # type: ignore[arg-type]
