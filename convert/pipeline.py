"""convert_model: MODEL -> a verified bundle for one target. The orchestration, step by step:

  1. target + source        cheap checks first (unknown target, missing file, bad magic,
                            unsupported architecture, max_seq) so bad input fails in a second
  2. load                   transformers model + tokenizer (GGUF dequantised to fp32)
  3. export                 ONNX under the static-KV contract (decoders) / optimum (encoders)
  4. compile                CPU: ORT offline optimisation; Jetson: nothing here, the engine is
                            built on the device (a TensorRT engine only runs on the TensorRT
                            version and GPU that built it)
  5. parity                 against PyTorch; a failure fails the convert
  6. bundle                 tokenizer, report, manifest with hashes; atomic rename at the end
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bundle.contract import GENERIC_CONTRACT
from bundle.errors import ToolkitError
from bundle.manifest import Architecture, Contract, Manifest, Parity, Pooling, TokenizerRecord
from bundle.progress import QUIET, Steps
from bundle.staging import dir_size, finalize, staged_bundle
from convert.export import (
    ExportResult,
    copy_onnx,
    export_decoder,
    export_encoder,
    graph_inputs,
    graph_outputs,
)
from convert.parity import decoder_parity, encoder_parity
from device.runtime.threads import check_threads
from models import DECODER, ModelDims, ModelSource, dims_from_config, get_spec, resolve
from models.params import static_rope_limit
from targets import Target, load_target

PARITY_PROMPT = "What is the capital of France? Answer in one sentence."


@dataclass
class ConvertResult:
    bundle: Path
    manifest: Manifest
    parity: Parity | None
    bytes: int
    seconds: dict[str, float]


def default_output(source_name: str, target: str, precision: str = "fp32") -> Path:
    return Path("bundles") / f"{source_name}-{target}-{precision}"


def convert_model(model: str, target: str = "cpu", out: Path | None = None,
                  max_seq: int | None = None, batch: int = 1, force: bool = False,
                  threads: int | None = None, steps: Steps = QUIET,
                  attention: str | None = None, precision: str = "fp32") -> ConvertResult:
    """Convert to an fp32 bundle. `precision` is what the bundle will be quantized to next
    (toolkit convert --precision): the target must run it and the fit check plans for it.
    attention: None picks per target (see _attention); "static"/"gqa" force one (benchmarks)."""
    _quiet_transformers()
    tgt = load_target(target)
    tgt.check_precision(precision)
    if batch < 1:
        raise ToolkitError(f"--batch must be at least 1 (got {batch})")
    check_threads(threads)  # before the export, not after it at the parity run
    src = resolve(model)
    out = Path(out) if out else default_output(src.name, tgt.name)
    from bundle.staging import check_output

    check_output(out, force)
    if src.kind == "onnx":
        return _passthrough(src, tgt, out, force, steps)

    spec = get_spec(src.model_type())
    config = src.load_config()
    dims = dims_from_config(spec, config)
    decoder = spec.task == DECODER
    seq = tgt.max_seq_for(dims.max_positions, static_rope_limit(config), max_seq) if decoder else 0
    plan = None
    if decoder:
        plan = _check_fit(dims, tgt, precision, seq, batch, src.name, force)

    with steps.step(f"loading {src.kind} model {src.name}"):
        hf_model = src.load_torch(spec.task)
        tokenizer = src.load_tokenizer()
    with staged_bundle(out, force) as staging:
        with steps.step("exporting to ONNX" + (f" (static KV cache, max_seq {seq})" if seq else "")):
            exported = (export_decoder(spec, dims, hf_model, seq, staging, attention or _attention(tgt, dims))
                        if spec.task == DECODER else export_encoder(src, staging))
        if tgt.runtime == "onnxruntime":
            with steps.step("optimising the graph for ONNX Runtime (CPU)"):
                from convert.optimize import optimize_for_cpu

                optimize_for_cpu(staging)
        pooling = None
        with steps.step("checking parity against PyTorch"):
            if spec.task == DECODER:
                layout = dims.kv_layout(seq)  # fp32 at export
                prompt = _greedy_prompt(tokenizer, dims)
                parity = decoder_parity(exported.model_path, hf_model, layout, dims.vocab_size,
                                        prompt, threads)
            else:
                from models.pooling import read_pooling

                pooling = read_pooling(src.model_dir)
                parity = encoder_parity(exported.model_path, hf_model, tokenizer, pooling, threads)
        parity.raise_if_failed(src.name)
        with steps.step("writing the bundle"):
            tok_info = _save_tokenizer(tokenizer, hf_model, staging / "tokenizer")
            manifest = _manifest(src, spec.model_type, spec.family, dims, exported, tgt, seq, batch,
                                 parity, tok_info, pooling)
            manifest.plan = plan.record() if plan else None
            from convert.trt_check import record_or_refuse

            record_or_refuse(exported.model_path, manifest, force)  # Jetson: the TensorRT parser's rules
            (staging / "report.md").write_text(render_report(manifest), encoding="utf-8")
            finalize(staging, manifest)
    return ConvertResult(out, manifest, parity, dir_size(out), dict(steps.timings))


def _quiet_transformers() -> None:
    """transformers' progress bars and advisory warnings drown our own progress lines."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    # the GGUF loader's own tqdm bar ignores both; TQDM_DISABLE works only if set before tqdm is
    # first imported (tqdm reads its TQDM_* variables then), which torch or a caller may have done
    os.environ.setdefault("TQDM_DISABLE", "1")
    try:
        from transformers import modeling_gguf_pytorch_utils as gguf_loader
    except ImportError:  # a transformers without the GGUF loader: no bar to silence
        return
    bar = getattr(gguf_loader, "tqdm", None)
    if bar is not None and not isinstance(bar, functools.partial):
        gguf_loader.tqdm = functools.partial(bar, disable=True)


def _check_fit(dims: ModelDims, tgt: Target, precision: str, seq: int, batch: int, name: str,
               force: bool) -> Any:
    """The plan (targets/plan.py) for this board, before any weight is loaded: a conversion that
    cannot fit is refused unless --force, and the plan is recorded in the manifest either way."""
    from targets.plan import plan_fit

    plan = plan_fit(dims, tgt, precision, seq, batch, model_name=name)
    if not plan.fits and not force:
        raise ToolkitError(f"{name} will not fit on {tgt.name}: {plan.explain()}",
                           hint=f"`toolkit plan {name} --target {tgt.name}` shows the numbers; "
                                "--force converts anyway")
    return plan


def _attention(tgt: Target, dims: ModelDims) -> str:
    """CPU bundles use ONNX Runtime's fused GroupQueryAttention (reads only the valid prefix,
    updates the cache in place) where its kernel supports the head size; TensorRT bundles keep
    the portable static attention its parser reads."""
    from convert.decoder import gqa_supported

    return "gqa" if tgt.runtime == "onnxruntime" and gqa_supported(dims) else "static"


def _greedy_prompt(tokenizer: Any, dims: ModelDims) -> list[int]:
    """A real chat prompt when the tokenizer has a template; plain text otherwise."""
    try:
        if getattr(tokenizer, "chat_template", None):
            ids = tokenizer.apply_chat_template([{"role": "user", "content": PARITY_PROMPT}],
                                                add_generation_prompt=True, tokenize=True)
        else:
            ids = tokenizer(PARITY_PROMPT)["input_ids"]
    except (ValueError, KeyError, TypeError):
        ids = []
    ids = [i for i in ids if 0 <= i < dims.vocab_size]  # tiny test vocabularies
    return ids or list(range(1, 9))


def _stop_ids(tokenizer: Any, hf_model: Any) -> list[int]:
    ids: set[int] = set()
    for source in (getattr(hf_model, "generation_config", None), hf_model.config):
        eos = getattr(source, "eos_token_id", None)
        ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(tokenizer.eos_token_id)
    return sorted(ids)


def _save_tokenizer(tokenizer: Any, hf_model: Any, folder: Path) -> TokenizerRecord:
    folder.mkdir()
    tokenizer.save_pretrained(str(folder))
    template = getattr(tokenizer, "chat_template", None)
    if template and not (folder / "chat_template.jinja").exists():
        (folder / "chat_template.jinja").write_text(template, encoding="utf-8")
    stop = _stop_ids(tokenizer, hf_model)
    return TokenizerRecord(
        path="tokenizer", chat_template="tokenizer/chat_template.jinja" if template else None,
        stop_token_ids=stop, stop_tokens=[tokenizer.convert_ids_to_tokens(i) for i in stop],
        bos_token_id=getattr(tokenizer, "bos_token_id", None),
        add_bos=bool(getattr(tokenizer, "add_bos_token", False)))


def _manifest(src: ModelSource, model_type: str, family: str, dims: ModelDims, exported: ExportResult,
              tgt: Target, seq: int, batch: int, parity: Parity, tok: TokenizerRecord,
              pooling: Pooling | None) -> Manifest:
    return Manifest(
        kind="decoder" if seq > 0 else "encoder", source=src.identity(),
        architecture=Architecture(model_type, family, dims, exported.attention), contract=exported.contract,
        precision="fp32", target=tgt.record(), max_seq=seq, batch=batch, tokenizer=tok,
        pooling=pooling, parity=parity)


def _passthrough(src: ModelSource, tgt: Target, out: Path, force: bool, steps: Steps) -> ConvertResult:
    """An existing ONNX file: validated, smoke-run in ONNX Runtime, bundled as-is. There is no
    PyTorch model to compare against, so parity is recorded as not applicable."""
    from device.runtime.ort_backend import open_session

    with staged_bundle(out, force) as staging:
        with steps.step("validating the ONNX model"):
            path = copy_onnx(src.path, staging)
            session = open_session(path, threads=1)
            _smoke_run(session)
        import onnx

        m = onnx.load(str(path), load_external_data=False)
        contract = Contract(GENERIC_CONTRACT, max(o.version for o in m.opset_import),
                            inputs=graph_inputs(m), outputs=graph_outputs(m))
        parity = Parity(passed=True, note="not applicable: an ONNX source has no PyTorch "
                                                "reference; validated with onnx.checker and a "
                                                "smoke run in ONNX Runtime")
        manifest = Manifest(kind="generic", source=src.identity(), contract=contract,
                            precision="as-is", target=tgt.record(), max_seq=0, batch=1,
                            parity=parity)
        (staging / "report.md").write_text(render_report(manifest), encoding="utf-8")
        finalize(staging, manifest)
    return ConvertResult(out, manifest, parity, dir_size(out), dict(steps.timings))


def _smoke_run(session: Any) -> None:
    import numpy as np

    types = {"tensor(float)": np.float32, "tensor(int64)": np.int64, "tensor(int32)": np.int32,
             "tensor(float16)": np.float16, "tensor(bool)": np.bool_, "tensor(double)": np.float64}
    feeds = {}
    for i in session.get_inputs():
        shape = [d if isinstance(d, int) and d > 0 else 1 for d in i.shape]
        if i.type not in types:
            return  # an input type we cannot fabricate: the load itself was the check
        feeds[i.name] = np.zeros(shape, dtype=types[i.type])
    try:
        session.run(None, feeds)
    except Exception as e:  # noqa: BLE001 - ORT raises its own untyped failures
        raise ToolkitError(f"the ONNX model loads but fails to run on zero inputs: {e}") from e


def render_report(m: Manifest) -> str:
    """report.md: the bundle explained for a person."""
    src = m.source
    lines = [f"# {m.name} for {m.target.name}", "",
             f"- kind: {m.kind}; precision: {m.precision}; contract: {m.contract.name}",
             f"- source: {src.kind} {src.path}", f"  (SHA-256 {str(src.sha256)[:16]}…)"]
    if m.kind == "decoder":
        d, kv = m.dims, m.kv_layout()
        lines += [f"- architecture: {m.dims.model_type}, {d.num_layers} layers, hidden {d.hidden}, "
                  f"{d.heads} heads / {d.kv_heads} kv heads, head_dim {d.head_dim}, "
                  f"vocab {d.vocab_size}",
                  f"- static KV cache: max_seq {m.max_seq}, {m.batch} slot(s), "
                  f"{kv.bytes_for(m.batch) / 2**20:.1f} MiB"]
        if m.architecture.attention:
            lines.append(f"- attention: {m.architecture.attention}")
    lines += [f"- engine: {m.target.engine.status} — {m.target.engine.why}"]
    lines += [f"- {m.trt_check.summary()}"] if m.trt_check else []
    lines += ["", "## Parity", ""]
    parity = m.parity or Parity(passed=True)
    for c in parity.checks:
        lines.append(f"- [{'x' if c.ok else ' '}] {c.name}: {c.detail}")
    if parity.note:
        lines.append(f"- {parity.note}")
    lines += ["", "## IO contract", "", "```json", json.dumps(m.io_json(), indent=1)[:4000], "```", ""]
    return "\n".join(lines)
