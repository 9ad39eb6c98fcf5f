"""ONNX Runtime backend: CPU by default, CUDA when its provider is present and asked for.

Decode steps run through IO binding: the cache rows are bound in place (a contiguous run of
slots is a view, no copy) and the outputs land in buffers preallocated per batch size, so a
decode step allocates nothing on the Python side. Prefill (T > 1) allocates its outputs once
per request, which is dwarfed by the prefill's own work.

In-place graphs (GroupQueryAttention, CPU bundles) output present_key.{i} instead of new slices;
it is bound to the same cache rows as past_key.{i}, so the kernel writes the new keys straight
into the cache. When the slots are not a contiguous run, the rows are a gathered copy: the
kernel updates the copy and the rows are copied back.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bundle.contract import (
    QUERY_SEQLENS,
    RAGGED_MODEL_FILE,
    ROW_SPARES_KEY,
    SPARE_FORMS_KEY,
    SPARE_TOKEN,
    SPARE_WHOLE,
    KVCacheLayout,
    new_names,
    past_names,
    present_names,
)
from bundle.errors import ToolkitError
from device.runtime.backend import KVBlock
from device.runtime.kvcache import HostKVBlock, StaticKVCache
from device.runtime.threads import check_threads

log = logging.getLogger("toolkit.runtime")

BOUND_T = 16  # steps of up to this many tokens, logits at each, reuse a cached binding (drafts)


def session_options(threads: int | None, spin_between_runs: bool = True) -> Any:
    import onnxruntime as ort

    check_threads(threads)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = threads or (os.cpu_count() or 1)
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.add_session_config_entry("session.intra_op.allow_spinning", "1")
    if not spin_between_runs:
        # The workers spin between the kernels of one run (the latency win) but block when a
        # run ends: between decode steps the daemon's engine thread samples and its HTTP
        # threads write the streams, and a worker spinning through that gap takes one of a
        # small board's cores from them (costs one worker wake-up per run). A process that only
        # steps the model (in-process generate, the benches' runner) spins on: SmolLM2 fp32 on
        # 2 cores decoded 1.04x faster spinning (median of 6 same-round pairs, 0.99-1.06).
        so.add_session_config_entry("session.force_spinning_stop", "1")
    return so


def providers(device: str) -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    if device == "cuda":
        if "CUDAExecutionProvider" not in available:
            raise ToolkitError("the CUDA execution provider is not available in this onnxruntime",
                               hint="install onnxruntime-gpu, or run with --device cpu")
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def open_session(model: Path, threads: int | None = None, device: str = "cpu",
                 spin_between_runs: bool = True) -> Any:
    import onnxruntime as ort

    try:
        return ort.InferenceSession(str(model), session_options(threads, spin_between_runs),
                                    providers=providers(device))
    except (ort.capi.onnxruntime_pybind11_state.Fail,
            ort.capi.onnxruntime_pybind11_state.InvalidGraph,
            ort.capi.onnxruntime_pybind11_state.InvalidProtobuf) as e:
        raise ToolkitError(f"ONNX Runtime cannot load {model}: {e}",
                           hint="the model file is corrupt or uses an operator this "
                                "onnxruntime lacks") from e


class OrtDecoderBackend:
    kind = "onnxruntime"

    def __init__(self, model: Path, layout: KVCacheLayout, vocab_size: int, slots: int = 1,
                 threads: int | None = None, device: str = "cpu",
                 spin_between_runs: bool = True, ragged: bool = False) -> None:
        """ragged: load the bundle's ragged graph where it has one and this ONNX Runtime takes
        it (convert/ragged.py), so that step() takes rows of different lengths (`lengths`)."""
        self.session = self._open(model, threads, device, spin_between_runs, ragged)
        self.layout = layout
        self.slots, self.max_seq, self.vocab_size = slots, layout.max_seq, vocab_size
        self.threads = threads or os.cpu_count() or 1
        self.device = device
        self.cache = StaticKVCache(layout, slots)  # [slots, Hkv, S, D] per layer, once
        self.past = past_names(layout.num_layers)
        self.new = new_names(layout.num_layers)
        outputs = {o.name for o in self.session.get_outputs()}
        self.present = present_names(layout.num_layers)
        self.in_place = set(self.present) <= outputs
        self._last = np.zeros(1, dtype=np.int64)  # logits_index for decode: position 0 of 1
        # spare_token (convert/spare_token.py): while True, a step of batch 1 takes a spare
        # token, which makes a one-token step's logits equal, bit for bit, to those of the same
        # token inside a longer step (a verified draft, a prefill chunk). The daemon's one-slot
        # engine sets it for greedy rows (device/serve/scheduler.py); graphs written before it
        # have no such input and ignore it. Bound once: a step writes the value into _spare:
        # spare_form (bundle/contract.py: SPARE_WHOLE, SPARE_AT_ATTENTION) while spare_token.
        self.spare_token = False
        self.spare_form = SPARE_WHOLE
        inputs = {i.name for i in self.session.get_inputs()}
        self._spare = np.zeros((), np.int32) if SPARE_TOKEN in inputs else None
        meta = self.session.get_modelmeta().custom_metadata_map
        forms = meta.get(SPARE_FORMS_KEY, str(SPARE_WHOLE))
        self.spare_forms = tuple(int(f) for f in forms.split(",")) if self._spare is not None else ()
        self.ragged_steps = QUERY_SEQLENS in inputs  # step() takes `lengths`
        self.row_spares = self.ragged_steps and meta.get(ROW_SPARES_KEY) == "1"  # (backend.py)
        # Decode bindings, one per run of slots (first, count) of an in-place graph: bound once to
        # fixed id/position buffers, the cache views and the output buffers, then reused; a step
        # only writes the new ids and positions. (~180 tensors: rebinding cost ~1.5 ms a token.)
        # Verify steps of drafted tokens (T <= BOUND_T, logits for every position) are bound the
        # same way, one binding per (first, count, T).
        self._bound: dict[tuple[int, int, int], tuple[Any, np.ndarray, np.ndarray, np.ndarray,
                                                       list[np.ndarray]]] = {}
        self._decode_out: dict[int, list[np.ndarray]] = {}  # batch -> [logits, new_k0, ...]
        # The bound steps' logits [B, K, V] are views of ONE buffer, grown as needed (a step's
        # logits are read before the next step: backend.py). A buffer per binding would hold
        # sum(B x T) x V floats once joint steps ran many shapes (SmolLM2, 8 slots from slot 0,
        # every B <= 8 and T <= 16: 0.9 GB, computed) for at most 25 MB of logits a step.
        self._logits = np.empty(0, np.float32)

    def _outputs(self, B: int, T: int, K: int) -> list[np.ndarray]:
        """[logits [B,K,V], new_key.0 [B,Hkv,T,D], ...]; just logits for in-place graphs."""
        L = self.layout
        n_new = 0 if self.in_place else len(self.new)
        shapes = [(B, K, self.vocab_size)] + [(B, L.kv_heads, T, L.head_dim)] * n_new
        dtypes = [np.float32] + [np.dtype(L.dtype)] * n_new
        return [np.empty(s, d) for s, d in zip(shapes, dtypes)]

    @staticmethod
    def _open(model: Path, threads: int | None, device: str, spin: bool, ragged: bool) -> Any:
        twin = Path(model).parent / RAGGED_MODEL_FILE
        if ragged and twin.is_file():
            try:
                return open_session(twin, threads, device, spin)
            # an ONNX Runtime older than 1.32 (an input its GroupQueryAttention does not know),
            # or whatever else: the plain graph serves, and drafts verify one row a step
            except Exception as e:  # noqa: BLE001 - ORT raises several untyped errors here
                reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                if len(reason) > 160:  # ORT's line carries the node's whole signature; its tail says why
                    reason = "..." + reason[-157:]
                log.info("the ragged graph does not load here (%s); using %s", reason, Path(model).name)
        return open_session(model, threads, device, spin)

    def step(self, input_ids: np.ndarray, position_ids: np.ndarray, slot_ids: Sequence[int],
             logits_index: np.ndarray | None = None, lengths: np.ndarray | None = None) -> np.ndarray:
        """logits_index: which step positions get logits (default: all) -> [B, K, V].
        lengths [B]: real tokens of each row (the rest right padding; ragged graphs only,
        convert/ragged.py); default T for every row."""
        B, T = input_ids.shape
        if lengths is not None and not self.ragged_steps:
            raise ValueError("this graph takes no per-row lengths (it is not the ragged graph)")
        if self._spare is not None:
            self._spare[()] = self.spare_form if self.spare_token else 0
        if (self.in_place and self.cache.is_run(slot_ids)
                and (T == 1 or (T <= BOUND_T and logits_index is None))):
            return self._decode_bound(input_ids, position_ids, slot_ids, lengths)
        if T == 1:  # decode: reuse the buffers of this batch size
            index = self._last
            outs = self._decode_out.get(B) or self._decode_out.setdefault(B, self._outputs(B, 1, 1))
        else:
            index = np.arange(T, dtype=np.int64) if logits_index is None else logits_index
            outs = self._outputs(B, T, len(index))
        binding = self.session.io_binding()
        binding.bind_cpu_input("input_ids", np.ascontiguousarray(input_ids, np.int64))
        binding.bind_cpu_input("position_ids", np.ascontiguousarray(position_ids, np.int64))
        binding.bind_cpu_input("logits_index", np.ascontiguousarray(index, np.int64))
        if self._spare is not None:
            binding.bind_cpu_input(SPARE_TOKEN, self._spare)
        if self.ragged_steps:
            binding.bind_cpu_input(QUERY_SEQLENS, np.asarray(np.full(B, T) if lengths is None else lengths,
                                                             np.int32))
        rows, is_view = self.cache.rows(slot_ids)
        for name, r in zip(self.past, rows):
            binding.bind_cpu_input(name, r)
        for name, buf in zip(["logits", *self.new], outs):
            binding.bind_output(name, "cpu", 0, buf.dtype, list(buf.shape), buf.ctypes.data)
        if self.in_place:  # present_* aliases past_*: the kernel updates `rows` itself
            for name, r in zip(self.present, rows):
                binding.bind_output(name, "cpu", 0, r.dtype, list(r.shape), r.ctypes.data)
        self.session.run_with_iobinding(binding)
        if not self.in_place:
            self.cache.write(slot_ids, position_ids[:, 0].tolist(), outs[1:])
        elif not is_view:  # the kernel updated a gathered copy: put the rows back
            self.cache.put_rows(slot_ids, rows)
        return outs[0]

    def _decode_bound(self, input_ids: np.ndarray, position_ids: np.ndarray,
                      slot_ids: Sequence[int], lengths: np.ndarray | None) -> np.ndarray:
        B, T = input_ids.shape
        key = (int(slot_ids[0]), B, T)
        if key not in self._bound:
            ids, pos = np.zeros((B, T), np.int64), np.zeros((B, T), np.int64)
            real = np.full(B, T, np.int32)  # query_seqlens (ragged graphs)
            index = self._last if T == 1 else np.arange(T, dtype=np.int64)  # T > 1: every position
            outs = [self._shared_logits(B, len(index))]  # may drop the other bindings: first
            rows, _ = self.cache.rows(slot_ids)
            binding = self.session.io_binding()
            binding.bind_cpu_input("input_ids", ids)
            binding.bind_cpu_input("position_ids", pos)
            binding.bind_cpu_input("logits_index", index)
            if self._spare is not None:
                binding.bind_cpu_input(SPARE_TOKEN, self._spare)
            if self.ragged_steps:
                binding.bind_cpu_input(QUERY_SEQLENS, real)
            for past, present, r in zip(self.past, self.present, rows):
                binding.bind_cpu_input(past, r)
                binding.bind_output(present, "cpu", 0, r.dtype, list(r.shape), r.ctypes.data)
            binding.bind_output("logits", "cpu", 0, outs[0].dtype, list(outs[0].shape),
                                outs[0].ctypes.data)
            self._bound[key] = (binding, ids, pos, real, outs)
        binding, ids, pos, real, outs = self._bound[key]
        ids[:] = input_ids
        pos[:] = position_ids
        real[:] = T if lengths is None else lengths
        self.session.run_with_iobinding(binding)
        return outs[0]

    def _shared_logits(self, B: int, K: int) -> np.ndarray:
        """[B, K, V] at the start of the shared logits buffer. Growing it (to twice, or what is
        asked) drops every binding, which pointed into the old one; they are bound again."""
        n = B * K * self.vocab_size
        if self._logits.size < n:
            self._logits = np.empty(max(n, 2 * self._logits.size), np.float32)
            self._bound.clear()
        return self._logits[:n].reshape(B, K, self.vocab_size)

    def read_kv(self, slot: int, lo: int, hi: int) -> HostKVBlock:
        """Positions lo..hi-1 of a slot, every layer (the prefix cache's block)."""
        return self.cache.read_block(slot, lo, hi)

    def write_kv(self, slot: int, lo: int, block: KVBlock) -> None:
        if not isinstance(block, HostKVBlock):
            raise TypeError(f"a {type(block).__name__} is not this backend's block")
        self.cache.write_block(slot, lo, block)

    def kv_cache_bytes(self) -> int:
        return self.cache.nbytes

    def describe(self) -> dict[str, object]:
        return {"backend": self.kind, "providers": self.session.get_providers(),
                "threads": self.threads, "slots": self.slots, "max_seq": self.max_seq,
                "kv_cache_bytes": self.kv_cache_bytes()}

    def close(self) -> None:
        self.session = None


class OrtEncoderBackend:
    kind = "onnxruntime"

    def __init__(self, model: Path, threads: int | None = None, device: str = "cpu") -> None:
        self.session = open_session(model, threads, device)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.threads = threads or os.cpu_count() or 1

    def encode(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        feeds = {k: v.astype(np.int64) for k, v in feeds.items() if k in self.input_names}
        return self.session.run(["last_hidden_state"], feeds)[0]

    def describe(self) -> dict[str, object]:
        return {"backend": self.kind, "providers": self.session.get_providers(),
                "threads": self.threads}

    def close(self) -> None:
        self.session = None
