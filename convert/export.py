"""Export to ONNX: decoders under the static-KV contract, encoders through optimum's exporter.

    export_decoder(spec, dims, hf_model, max_seq, out_dir) -> ExportResult   # model.onnx (+ .data)
    export_encoder(source, out_dir) -> ExportResult                          # model.onnx

Opset 17 with the TorchScript exporter: TensorRT 10.3's parser (JetPack 6) reads opsets 9–20
(tensorrt_jetson.md §2.2), and ONNX Runtime reads them all.
"""

from __future__ import annotations

import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx

from bundle.contract import DECODER_CONTRACT, ENCODER_CONTRACT, RAGGED_MODEL_FILE, DecoderContract
from bundle.errors import ToolkitError
from bundle.manifest import Contract, GraphTensor
from models.dims import ModelDims
from models.registry import ArchSpec
from models.sources import ModelSource

OPSET = 17
MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
# Keep weights inline below this size; above it, one external-data file (protobuf caps at 2 GB,
# and a separate file lets the runtime mmap the weights).
INLINE_LIMIT = 64 << 20


@dataclass
class ExportResult:
    model_path: Path
    contract: Contract
    opset: int
    seconds: float
    bytes: int
    attention: str | None = None  # decoders: convert.decoder.attention_summary


def export_decoder(spec: ArchSpec, dims: ModelDims, hf_model: Any, max_seq: int,
                   out_dir: Path, attention: str = "static") -> ExportResult:
    """attention: "static" (portable, TensorRT) or "gqa" (ONNX Runtime's fused in-place op)."""
    import time

    import torch

    from convert.decoder import StaticKVDecoder, attention_summary

    t0 = time.perf_counter()
    contract = DecoderContract(dims.num_layers, dims.kv_heads, dims.head_dim, max_seq,
                               dims.vocab_size, in_place=attention == "gqa")
    module = StaticKVDecoder.from_hf(spec, dims, hf_model, max_seq, attention)
    # Dummy shapes (batch 2, seq 3) differ from parity's shapes on purpose: parity must run
    # on shapes the export never saw.
    B, T = 2, 3
    ids = torch.zeros(B, T, dtype=torch.int64)
    pos = torch.arange(T, dtype=torch.int64)[None].repeat(B, 1)
    logits_index = torch.arange(T, dtype=torch.int64)
    past = [torch.zeros(B, dims.kv_heads, max_seq, dims.head_dim) for _ in range(2 * dims.num_layers)]
    names_in = [s.name for s in contract.inputs]
    names_out = [s.name for s in contract.outputs]
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        raw = Path(tmp) / MODEL_FILE
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, (ids, pos, logits_index, *past), str(raw), dynamo=False,
                              opset_version=OPSET, input_names=names_in, output_names=names_out,
                              dynamic_axes=contract.dynamic_axes, do_constant_folding=True)
        model = onnx.load(str(raw))
        stamp_shapes(model, contract)
        path = save_model(model, out_dir)
    record = Contract(DECODER_CONTRACT, OPSET, kv_dtype=contract.kv_dtype,  # type: ignore[arg-type]
                      cache_update="in-place" if contract.in_place else "host-writes-new")
    return ExportResult(path, record, OPSET, time.perf_counter() - t0, _onnx_bytes(out_dir),
                        attention_summary(module.p, dims, attention))


def export_encoder(source: ModelSource, out_dir: Path) -> ExportResult:
    """optimum's exporter does this job well (feature-extraction, dynamic batch and sequence,
    its own validation); we take its model.onnx and nothing else."""
    import time

    from optimum.exporters.onnx import main_export

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            main_export(str(source.model_dir), output=tmp, task="feature-extraction", opset=OPSET,
                        device="cpu", do_validation=False, library_name="transformers",
                        **source.hf_kwargs)
        except (ValueError, KeyError, OSError) as e:
            raise ToolkitError(f"optimum could not export {source.path}: {e}") from e
        path = save_model(onnx.load(str(Path(tmp) / MODEL_FILE)), out_dir)
    model = onnx.load(str(path), load_external_data=False)
    contract = Contract(ENCODER_CONTRACT, OPSET, inputs=graph_inputs(model),
                        outputs=graph_outputs(model))
    return ExportResult(path, contract, OPSET, time.perf_counter() - t0, _onnx_bytes(out_dir))


def stamp_shapes(model: onnx.ModelProto, contract: DecoderContract) -> None:
    """Write the contract's shapes onto the graph's IO. The exporter names axes it could not
    infer (head_dim after RoPE's Concat becomes 'Addnew_key.0_dim_3'); TensorRT and the
    contract test want every static axis static and every dynamic one named as documented."""
    specs = {s.name: s for s in contract.inputs + contract.outputs}
    for value in list(model.graph.input) + list(model.graph.output):
        spec = specs[value.name]
        dims = value.type.tensor_type.shape.dim
        for dim, axis in zip(dims, spec.shape):
            if isinstance(axis, str):
                dim.dim_param = axis
            else:
                dim.dim_value = axis


def save_model(model: onnx.ModelProto, out_dir: Path) -> Path:
    """Write model.onnx into out_dir, weights external when large; an in-place decoder also gets
    its ragged twin beside it (convert/ragged.py), which names the same weights."""
    from convert.ragged import write_ragged_graph

    path = Path(out_dir) / MODEL_FILE
    for stale in (path, Path(out_dir) / DATA_FILE, Path(out_dir) / RAGGED_MODEL_FILE):
        stale.unlink(missing_ok=True)
    external = model.ByteSize() > INLINE_LIMIT
    onnx.save_model(model, str(path), save_as_external_data=external, all_tensors_to_one_file=True,
                    location=DATA_FILE, size_threshold=1024)
    write_ragged_graph(path)
    return path


def copy_onnx(src: Path, out_dir: Path) -> Path:
    """Validate an existing ONNX file (full check incl. shapes) and copy it (with its weights)."""
    try:
        model = onnx.load(str(src))
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise ToolkitError(f"{src} is not a valid ONNX model: {e}") from e
    except Exception as e:  # protobuf DecodeError and friends: truncated or not ONNX at all
        raise ToolkitError(f"{src} cannot be read as ONNX ({type(e).__name__}: {e})",
                           hint="the file is corrupt or truncated") from e
    return save_model(model, out_dir)


def _onnx_bytes(out_dir: Path) -> int:
    return sum(p.stat().st_size for p in (Path(out_dir) / MODEL_FILE, Path(out_dir) / DATA_FILE)
               if p.exists())


def graph_inputs(model: onnx.ModelProto) -> list[GraphTensor]:
    return [_tensor(v) for v in model.graph.input]


def graph_outputs(model: onnx.ModelProto) -> list[GraphTensor]:
    return [_tensor(v) for v in model.graph.output]


def _tensor(v: onnx.ValueInfoProto) -> GraphTensor:
    t = v.type.tensor_type
    shape: list[str | int] = [d.dim_param or d.dim_value for d in t.shape.dim]
    return GraphTensor(v.name, onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name, shape)
