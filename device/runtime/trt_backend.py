"""TensorRT + pycuda decoder backend: the static-kv-v1 contract on a Jetson GPU.

    backend = TrtDecoderBackend(bundle / "engines/sm87-orin/engine.plan", layout, vocab, slots=4)
    logits = backend.step(input_ids [B,T], position_ids [B,T], slot_ids, logits_index [K])
                                                       # [B,K,V] float32; K = T by default

Memory, all allocated once in __init__ and never again (device/runtime/backend.py):

    cache    per layer, K and V: [slots, Hkv, S, D], zeroed (masked entries get softmax weight 0,
             and 0 * NaN from uninitialised memory would still be NaN)
    staging  per layer, K and V: [slots-1, Hkv, S, D] (none for one slot), see "binding the cache"
    I/O      input_ids, position_ids, logits_index [max_tokens], logits [max_tokens, V],
             new_* [max_tokens, Hkv, D] on the device; ids, positions, logits_index and logits
             also page-locked on the host (max_tokens = max(prefill chunk, slots))

One step (all on one non-default stream, tensorrt_jetson.md §3.3):
  1. profile 0 (prefill, T > 1) or 1 (decode, T == 1): set_optimization_profile_async on change
  2. ids/positions/logits_index host -> device; set_input_shape; set_tensor_address for every
     I/O tensor
  3. CUDA event, execute_async_v3, CUDA event (their difference is the step's GPU time)
  4. each new_key.{i}/new_value.{i} slice into the cache at position_ids[b, 0]: one strided
     Memcpy2D per batch row (option A of §3.4; TensorRT 10.3 defines no input/output aliasing)
  5. logits device -> host, synchronize

Binding the cache. The engine reads past_* as one contiguous [B, Hkv, S, D] tensor. Rows are
first sorted by slot (logits are returned in the caller's order). A contiguous run of slots is
the cache itself, bound at the first slot's row (no copy) - provided that address keeps
TensorRT's 256-byte alignment. Any other selection is gathered into the staging buffer (one
device-to-device copy per row, K and V, per layer) and bound there; new slices are still written
into the cache by slot. A sorted selection that is not a run from slot 0 has at most slots-1
rows, hence the staging size. The alternative, one engine launch per contiguous run, costs no
memory but re-reads every weight per launch, which on a bandwidth-bound Jetson costs more than
the gather does for the short caches an 8 GB board can hold.

Prefill longer than the prefill chunk (max_prefill_tokens, default 256) runs in chunks, each
writing its keys/values before the next reads them - the same result, with the device buffers
bounded at chunk tokens: a request for every position's logits (perplexity) then needs chunk x V
floats, not max_seq x V (400 MB for a 49k vocabulary at 2048). A prefill of several rows runs
row by row (the prefill profile has batch 1). A decode step (T = 1) always gets logits_index
[0], as in the ONNX Runtime backend.

Prefix-cache blocks (read_kv / write_kv, device/serve/prefix_cache.py) live in device memory, one
allocation per block holding each cache buffer's [Hkv, T, D] rows packed; reading is one strided
Memcpy2D per buffer (block_read_copy), writing the same copy as a step's new rows (slice_copies),
both on the step's stream, so they are ordered with the steps without a synchronize. Blocks are
not part of BufferPlan: the prefix cache's byte budget bounds them, and close() frees any left.

Contexts. pycuda retains the device's primary context - the one the CUDA runtime, and so
TensorRT, uses (§4) - and pushes it around every call, so the backend works from whichever
thread the daemon calls it on.

The pure arithmetic (buffer sizes, Memcpy2D parameters, which profile a step uses, whether a
selection binds in place) is in small functions at the top, tested without a GPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from bundle.contract import SPARE_WHOLE, KVCacheLayout, new_names, past_names, staging_slots
from bundle.errors import ToolkitError
from device.runtime.backend import KVBlock
from device.runtime.procmem import mem_available
from device.runtime.trt_build import DECODE, PREFILL, shape_of

if TYPE_CHECKING:
    import pycuda.driver as cuda
    import tensorrt as trt

ALIGN = 256  # TensorRT I/O addresses must be 256-byte aligned (§3.3)
DEFAULT_PREFILL_CHUNK = 256


# --- pure arithmetic -------------------------------------------------------------------------
def select_profile(batch: int, seq: int) -> int:
    """Prefill profile for a multi-token step, decode profile for one token per row."""
    return PREFILL if seq > 1 else DECODE


@dataclass(frozen=True)
class BufferPlan:
    """Every device buffer's size, from the layout, the slots and the largest step."""

    num_layers: int
    kv_heads: int
    max_seq: int
    head_dim: int
    slots: int
    vocab: int
    max_tokens: int  # largest B*T of one engine launch
    kv_itemsize: int = 4
    logits_itemsize: int = 4

    @property
    def row_bytes(self) -> int:
        """One slot of one K or V buffer: [Hkv, S, D]."""
        return self.kv_heads * self.max_seq * self.head_dim * self.kv_itemsize

    @property
    def cache_layer_bytes(self) -> int:
        return self.slots * self.row_bytes

    @property
    def kv_cache_bytes(self) -> int:
        return 2 * self.num_layers * self.cache_layer_bytes

    @property
    def staging_rows(self) -> int:
        return staging_slots(self.slots)

    @property
    def staging_bytes(self) -> int:
        return 2 * self.num_layers * self.staging_rows * self.row_bytes

    @property
    def ids_bytes(self) -> int:
        """input_ids, position_ids or logits_index: int64 [max_tokens]."""
        return self.max_tokens * 8

    @property
    def logits_bytes(self) -> int:
        return self.max_tokens * self.vocab * self.logits_itemsize

    @property
    def new_kv_bytes(self) -> int:
        """One new_key.{i} / new_value.{i} output at its largest: [max_tokens, Hkv, D]."""
        return self.max_tokens * self.kv_heads * self.head_dim * self.kv_itemsize

    @property
    def device_bytes(self) -> int:
        io = 3 * self.ids_bytes + self.logits_bytes + 2 * self.num_layers * self.new_kv_bytes
        return self.kv_cache_bytes + self.staging_bytes + io


@dataclass(frozen=True)
class Copy2D:
    """One pycuda Memcpy2D: `height` rows of `width_in_bytes`, offsets relative to the buffers."""

    src_offset: int
    dst_offset: int
    src_pitch: int
    dst_pitch: int
    dst_x_in_bytes: int
    width_in_bytes: int
    height: int


def slice_copies(slot_ids: Sequence[int], starts: Sequence[int], seq: int, kv_heads: int,
                 max_seq: int, head_dim: int, itemsize: int) -> list[Copy2D]:
    """Copies writing new_X [B, Hkv, T, D] into cache [slots, Hkv, S, D] at
    cache[slot_b, :, start_b : start_b + T, :] for each row b.

    Per row: height = Hkv (one copy row per head), width = T*D*elt, src pitch = T*D*elt (new
    rows are packed), dst pitch = S*D*elt, dst base = the slot's row, dst_x = start*D*elt.
    Rows with consecutive slots and the same start merge into one copy of height n*Hkv."""
    width = seq * head_dim * itemsize
    dst_pitch = max_seq * head_dim * itemsize
    copies: list[Copy2D] = []
    for b, (slot, start) in enumerate(zip(slot_ids, starts)):
        check_fits(start, seq, max_seq)  # a copy past the row would overwrite the next head
        src, dst, x = b * kv_heads * width, slot * kv_heads * dst_pitch, start * head_dim * itemsize
        last = copies[-1] if copies else None
        if (last is not None and last.dst_x_in_bytes == x
                and last.src_offset + last.height * width == src
                and last.dst_offset + last.height * dst_pitch == dst):
            copies[-1] = replace(last, height=last.height + kv_heads)
        else:
            copies.append(Copy2D(src, dst, width, dst_pitch, x, width, kv_heads))
    return copies


def block_read_copy(slot: int, lo: int, seq: int, kv_heads: int, max_seq: int, head_dim: int,
                    itemsize: int) -> Copy2D:
    """The copy reading cache[slot, :, lo:lo+seq, :] into a packed block [Hkv, seq, D] (the
    prefix cache's); the write back is slice_copies([slot], [lo], seq, ...), whose source is
    packed the same way. height = Hkv rows of seq*D*elt bytes; src pitch = S*D*elt."""
    check_fits(lo, seq, max_seq)
    width = seq * head_dim * itemsize
    pitch = max_seq * head_dim * itemsize
    return Copy2D(slot * kv_heads * pitch + lo * head_dim * itemsize, 0, pitch, width, 0, width,
                  kv_heads)


def check_fits(start: int, seq: int, max_seq: int) -> None:
    if start < 0 or start + seq > max_seq:
        raise ToolkitError(f"tokens {start}..{start + seq - 1} do not fit a cache of {max_seq} "
                           "positions", hint="the request outgrew max_seq")


def sort_order(slot_ids: Sequence[int]) -> list[int] | None:
    """Row order that sorts the slots, or None when they already are sorted."""
    order = sorted(range(len(slot_ids)), key=lambda i: slot_ids[i])
    return None if order == list(range(len(slot_ids))) else order


def bind_in_place(sorted_slots: Sequence[int], row_bytes: int) -> int | None:
    """First slot when the (sorted) slots are a run the engine can read in place: contiguous
    and 256-byte aligned at the first row. None: gather into the staging buffer."""
    first = sorted_slots[0]
    if list(sorted_slots) != list(range(first, first + len(sorted_slots))):
        return None
    return first if (first * row_bytes) % ALIGN == 0 else None


def check_step(ids: np.ndarray, pos: np.ndarray, slot_ids: Sequence[int], index: np.ndarray,
               slots: int, max_seq: int) -> None:
    """Reject a step that would read or write outside the cache or its buffers, or mix up
    slots, before anything reaches the GPU."""
    if ids.ndim != 2 or pos.shape != ids.shape or len(slot_ids) != ids.shape[0] or ids.size == 0:
        raise ToolkitError(f"step shapes disagree: input_ids {list(ids.shape)}, position_ids "
                           f"{list(pos.shape)}, {len(slot_ids)} slot ids")
    B, T = ids.shape
    if index.ndim != 1 or index.size == 0 or index.min() < 0 or index.max() >= T:
        raise ToolkitError(f"logits_index {index.tolist()} must list positions in 0..{T - 1}")
    starts = pos[:, 0].tolist()
    if len(set(slot_ids)) != B or min(slot_ids) < 0 or max(slot_ids) >= slots:
        raise ToolkitError(f"slot ids {list(slot_ids)} must be distinct and in 0..{slots - 1}")
    for start in starts:
        check_fits(start, T, max_seq)


# --- the backend -----------------------------------------------------------------------------
def _check(ok: bool, what: str) -> None:
    if not ok:
        raise ToolkitError(f"TensorRT {what} failed", hint="see TensorRT's messages above")


def _np_dtype(dtype: trt.DataType) -> np.dtype[Any]:
    """The numpy type of an engine I/O tensor; bf16 / fp8 have none (§8 pitfall 10)."""
    import tensorrt as trt

    table = {trt.float32: np.float32, trt.float16: np.float16, trt.int64: np.int64,
             trt.int32: np.int32}
    if dtype not in table:
        raise ToolkitError(f"engine I/O type {dtype} is not supported by this backend",
                           hint="the static-kv-v1 graph uses float32/float16 and int64")
    return np.dtype(table[dtype])


class DeviceKVBlock:
    """A prefix-cache block in device memory: one allocation holding, for each cache buffer in
    order (K0, V0, K1, ...), its [Hkv, tokens, D] rows, packed. A KVBlock (backend.py)."""

    def __init__(self, backend: TrtDecoderBackend, alloc: cuda.DeviceAllocation, tokens: int,
                 nbytes: int) -> None:
        self.backend, self.alloc, self.tokens, self.nbytes = backend, alloc, tokens, nbytes

    def release(self) -> None:
        self.backend._release_block(self)


class TrtDecoderBackend:
    kind = "tensorrt"
    spare_token = False  # static-attention graphs take none (convert/spare_token.py)
    spare_form = SPARE_WHOLE
    spare_forms: tuple[int, ...] = ()
    ragged_steps = False  # ... nor per-row lengths (convert/ragged.py): a verify step is one row
    row_spares = False

    def __init__(self, plan_path: Path, layout: KVCacheLayout, vocab_size: int, slots: int = 1,
                 max_prefill_tokens: int | None = None) -> None:
        import pycuda.driver as cuda

        self.plan_path = Path(plan_path)
        self.layout = layout
        self.slots, self.max_seq, self.vocab_size = slots, layout.max_seq, vocab_size
        self.past, self.new = past_names(layout.num_layers), new_names(layout.num_layers)
        self.last_step_ms: float | None = None
        self._allocs: list[cuda.DeviceAllocation] = []
        self._blocks: set[DeviceKVBlock] = set()  # prefix-cache blocks alive (freed by close too)
        self._host: list[np.ndarray[Any, Any]] = []
        self._closed = False
        cuda.init()
        self._cuda_ctx = cuda.Device(0).retain_primary_context()
        self._cuda_ctx.push()
        try:
            self._load_engine()
            self.plan = self._check_engine(max_prefill_tokens)
            self._allocate()
        except BaseException:
            self._free()
            cuda.Context.pop()
            self._cuda_ctx.detach()
            raise
        cuda.Context.pop()

    # construction ---------------------------------------------------------------------------
    def _load_engine(self) -> None:
        import tensorrt as trt

        try:
            blob = self.plan_path.read_bytes()
        except OSError as e:
            raise ToolkitError(f"cannot read TensorRT engine {self.plan_path}: {e}") from e
        self.trt_version = str(trt.__version__)
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        engine: trt.ICudaEngine | None = self._runtime.deserialize_cuda_engine(blob)
        if engine is None:
            raise ToolkitError(f"TensorRT {self.trt_version} cannot load {self.plan_path}",
                               hint="the engine was built by another TensorRT version or GPU, "
                                    "or the file is damaged: rebuild it with `toolkit compile "
                                    "BUNDLE --force` on this device")
        self._engine = engine
        context: trt.IExecutionContext | None = engine.create_execution_context()
        if context is None:
            raise ToolkitError("TensorRT could not create an execution context",
                               hint="out of GPU memory? stop other programs and retry")
        self._context = context
        self._profile = PREFILL  # profile 0 is active on a new context (§1.4)

    def _check_engine(self, max_prefill_tokens: int | None) -> BufferPlan:
        """The engine must be this bundle's static-kv-v1 graph; returns the buffer sizes."""
        e, L = self._engine, self.layout
        names = {e.get_tensor_name(i) for i in range(e.num_io_tensors)}
        expected = {"input_ids", "position_ids", "logits_index", "logits", *self.past, *self.new}
        if names != expected:
            raise ToolkitError(
                f"engine {self.plan_path} does not have the static-kv-v1 I/O of this bundle "
                f"(extra {sorted(names - expected)}, missing {sorted(expected - names)})",
                hint="a TensorRT bundle's graph returns new keys/values for the host to write "
                     "(no present_*): convert the model for the Jetson target, then compile it")
        cache = shape_of(e.get_tensor_shape(self.past[0]))[1:]
        vocab = shape_of(e.get_tensor_shape("logits"))[-1]
        if cache != (L.kv_heads, L.max_seq, L.head_dim) or vocab != self.vocab_size:
            raise ToolkitError(f"engine cache {list(cache)} / vocab {vocab} differ from the "
                               f"bundle's {[L.kv_heads, L.max_seq, L.head_dim]} / "
                               f"{self.vocab_size}", hint="rebuild it: toolkit compile")
        kv_dtype, logits_dtype = (_np_dtype(e.get_tensor_dtype(n)) for n in (self.past[0], "logits"))
        if kv_dtype != np.dtype(L.dtype):
            raise ToolkitError(f"engine KV cache is {kv_dtype}, the bundle says {L.dtype}")
        self._check_io(kv_dtype)
        self._logits_dtype = logits_dtype
        if e.num_optimization_profiles < 2:
            raise ToolkitError(f"engine {self.plan_path} has {e.num_optimization_profiles} "
                               "optimization profile(s); the toolkit builds two (prefill, decode)",
                               hint="rebuild it: toolkit compile BUNDLE --force")
        decode_max = e.get_tensor_profile_shape("input_ids", DECODE)[2][0]
        prefill_max = e.get_tensor_profile_shape("input_ids", PREFILL)[2][1]
        if self.slots > decode_max:
            raise ToolkitError(f"the engine serves at most {decode_max} slots; {self.slots} asked",
                               hint="convert with a larger --batch, or run with fewer slots")
        self.max_prefill = min(prefill_max, max_prefill_tokens or DEFAULT_PREFILL_CHUNK)
        return BufferPlan(L.num_layers, L.kv_heads, L.max_seq, L.head_dim, self.slots,
                          self.vocab_size, max(self.max_prefill, self.slots),
                          kv_dtype.itemsize, logits_dtype.itemsize)

    def _check_io(self, kv_dtype: np.dtype[Any]) -> None:
        """Every I/O tensor against the buffer this backend binds to it, not only the first
        cache tensor: the ids int64 (a builder that narrowed them to int32 would read the
        host's int64 bytes as two tokens each), every cache and new K/V tensor the cache's type
        and [., Hkv, ., D] (the copies write rows of that size); the cache's first tensor and
        the logits' vocabulary are checked by the caller."""
        e, L = self._engine, self.layout
        want = {n: np.dtype(np.int64) for n in ("input_ids", "position_ids", "logits_index")}
        want.update({n: kv_dtype for n in (*self.past, *self.new)})
        wrong = [f"{n} is {got}, not {w}" for n, w in want.items()
                 if (got := _np_dtype(e.get_tensor_dtype(n))) != w]
        for n in (*self.past, *self.new):
            dims = shape_of(e.get_tensor_shape(n))
            if len(dims) != 4 or (dims[1], dims[3]) != (L.kv_heads, L.head_dim) or (
                    n in self.past and dims[2] != L.max_seq):
                wrong.append(f"{n} is {list(dims)}, not [., {L.kv_heads}, "
                             f"{L.max_seq if n in self.past else '.'}, {L.head_dim}]")
        if wrong:
            raise ToolkitError(f"engine {self.plan_path} I/O differs from what this backend binds: "
                               f"{'; '.join(wrong[:4])}{' ...' if len(wrong) > 4 else ''}",
                               hint="rebuild it from this bundle: toolkit compile BUNDLE --force")

    def _alloc(self, nbytes: int, zero: bool = False) -> cuda.DeviceAllocation:
        import pycuda.driver as cuda

        try:
            buf = cuda.mem_alloc(max(nbytes, 1))
        except cuda.MemoryError as e:
            need = self.plan.device_bytes / (1 << 20)
            raise ToolkitError(f"out of GPU memory allocating {nbytes / (1 << 20):.0f} MiB (the "
                               f"backend needs {need:.0f} MiB besides the engine)",
                               hint="fewer slots or a smaller max_seq") from e
        self._allocs.append(buf)
        if zero:
            cuda.memset_d8(buf, 0, nbytes)
        return buf

    def _pinned(self, n: int, dtype: np.dtype[Any]) -> np.ndarray[Any, Any]:
        import pycuda.driver as cuda

        arr = cuda.pagelocked_empty(n, dtype)
        self._host.append(arr)
        return arr

    def _allocate(self) -> None:
        import pycuda.driver as cuda

        P, n_buf = self.plan, 2 * self.layout.num_layers
        self._cache = [self._alloc(P.cache_layer_bytes, zero=True) for _ in range(n_buf)]
        self._staging = [self._alloc(P.staging_rows * P.row_bytes) for _ in range(n_buf)
                         ] if P.staging_rows else []
        self._new = [self._alloc(P.new_kv_bytes) for _ in range(n_buf)]
        self._ids_d, self._pos_d = self._alloc(P.ids_bytes), self._alloc(P.ids_bytes)
        self._index_d = self._alloc(P.ids_bytes)
        self._logits_d = self._alloc(P.logits_bytes)
        self._ids_h = self._pinned(P.max_tokens, np.dtype(np.int64))
        self._pos_h = self._pinned(P.max_tokens, np.dtype(np.int64))
        self._index_h = self._pinned(P.max_tokens, np.dtype(np.int64))
        self._logits_h = self._pinned(P.max_tokens * self.vocab_size, self._logits_dtype)
        self._stream = cuda.Stream()
        self._start, self._end = cuda.Event(), cuda.Event()
        self._copier = cuda.Memcpy2D()  # parameters are read when each copy is enqueued

    # one step -------------------------------------------------------------------------------
    def step(self, input_ids: np.ndarray, position_ids: np.ndarray, slot_ids: Sequence[int],
             logits_index: np.ndarray | None = None, lengths: np.ndarray | None = None) -> np.ndarray:
        """One step -> logits [B, K, V] for the positions in logits_index (default: all)."""
        if self._closed:
            raise ToolkitError("the TensorRT backend is closed")
        if lengths is not None:
            raise ValueError("TensorRT graphs take no per-row lengths (ragged_steps is False)")
        ids = np.asarray(input_ids, dtype=np.int64)
        pos = np.asarray(position_ids, dtype=np.int64)
        T = ids.shape[-1] if ids.ndim else 0
        index = (np.zeros(1, np.int64) if T == 1 else np.arange(T, dtype=np.int64)
                 if logits_index is None else np.asarray(logits_index, dtype=np.int64))
        slots = [int(s) for s in slot_ids]
        check_step(ids, pos, slots, index, self.slots, self.max_seq)
        if T > 1 and ids.shape[0] > 1:
            return self._rows(ids, pos, slots, index)
        if T > self.max_prefill:
            return self._chunks(ids, pos, slots[0], index)
        order = sort_order(slots)
        if order is not None:
            ids, pos, slots = ids[order], pos[order], [slots[i] for i in order]
        logits = self._run(ids, pos, slots, index)
        return logits if order is None else logits[np.argsort(order)]

    def _rows(self, ids: np.ndarray, pos: np.ndarray, slots: list[int],
              index: np.ndarray) -> np.ndarray:
        out = np.empty((ids.shape[0], index.size, self.vocab_size), np.float32)
        for b, slot in enumerate(slots):
            out[b] = self.step(ids[b:b + 1], pos[b:b + 1], [slot], index)[0]
        return out

    def _chunks(self, ids: np.ndarray, pos: np.ndarray, slot: int,
                index: np.ndarray) -> np.ndarray:
        """Prefill in chunks of max_prefill tokens; each chunk's logits are the requested
        positions that fall inside it (a chunk with none asks for its first and drops it)."""
        T, n = ids.shape[1], self.max_prefill
        out = np.empty((1, index.size, self.vocab_size), np.float32)
        for s in range(0, T, n):
            e = min(s + n, T)
            rows = np.nonzero((index >= s) & (index < e))[0]
            local = index[rows] - s if rows.size else np.zeros(1, np.int64)
            logits = self._run(ids[:, s:e], pos[:, s:e], [slot], local)
            out[0, rows] = logits[0, :rows.size]
        return out

    def _run(self, ids: np.ndarray, pos: np.ndarray, slots: list[int],
             index: np.ndarray) -> np.ndarray:
        import pycuda.driver as cuda

        B, T = ids.shape
        n, K, V = B * T, index.size, self.vocab_size
        self._cuda_ctx.push()
        try:
            s = self._stream
            self._select_profile(select_profile(B, T))
            self._ids_h[:n], self._pos_h[:n], self._index_h[:K] = ids.ravel(), pos.ravel(), index
            cuda.memcpy_htod_async(self._ids_d, self._ids_h[:n], s)
            cuda.memcpy_htod_async(self._pos_d, self._pos_h[:n], s)
            cuda.memcpy_htod_async(self._index_d, self._index_h[:K], s)
            self._bind(B, T, K, self._cache_pointers(slots))
            self._start.record(s)
            _check(self._context.execute_async_v3(s.handle), "execute_async_v3")
            self._end.record(s)
            self._write_new(slots, pos[:, 0].tolist(), T)
            cuda.memcpy_dtoh_async(self._logits_h[:B * K * V], self._logits_d, s)
            s.synchronize()
            self.last_step_ms = self._start.time_till(self._end)
        finally:
            cuda.Context.pop()
        return self._logits_h[:B * K * V].reshape(B, K, V).astype(np.float32, copy=False)

    def _select_profile(self, profile: int) -> None:
        if profile != self._profile:
            # the binding raises RuntimeError instead of returning False (pyCore.cpp, 10.3-10.13)
            try:
                ok = self._context.set_optimization_profile_async(profile, self._stream.handle)
            except RuntimeError:
                ok = False
            _check(ok, f"set_optimization_profile_async({profile})")
            self._profile = profile

    def _cache_pointers(self, slots: list[int]) -> list[int]:
        """past_* addresses: the cache rows in place, or the rows gathered into staging."""
        import pycuda.driver as cuda

        row = self.plan.row_bytes
        first = bind_in_place(slots, row)
        if first is not None:
            return [int(buf) + first * row for buf in self._cache]
        for buf, stage in zip(self._cache, self._staging):
            for i, slot in enumerate(slots):
                cuda.memcpy_dtod_async(int(stage) + i * row, int(buf) + slot * row, row,
                                       self._stream)
        return [int(stage) for stage in self._staging]

    def _bind(self, B: int, T: int, K: int, past: list[int]) -> None:
        ctx, L = self._context, self.layout
        shapes = {"input_ids": (B, T), "position_ids": (B, T), "logits_index": (K,)}
        shapes.update((name, (B, L.kv_heads, L.max_seq, L.head_dim)) for name in self.past)
        for name, shape in shapes.items():
            _check(ctx.set_input_shape(name, shape), f"set_input_shape({name}, {shape})")
        addresses = {"input_ids": int(self._ids_d), "position_ids": int(self._pos_d),
                     "logits_index": int(self._index_d), "logits": int(self._logits_d)}
        addresses.update(zip(self.past, past))
        addresses.update((name, int(buf)) for name, buf in zip(self.new, self._new))
        for name, ptr in addresses.items():
            _check(ctx.set_tensor_address(name, ptr), f"set_tensor_address({name})")

    def _write_new(self, slots: list[int], starts: list[int], T: int) -> None:
        """new_X.{i} [B,Hkv,T,D] -> cache X.{i}[slot, :, start:start+T, :], on the step's stream."""
        L = self.layout
        copies = slice_copies(slots, starts, T, L.kv_heads, L.max_seq, L.head_dim,
                              self.plan.kv_itemsize)
        for dst, src in zip(self._cache, self._new):
            for c in copies:
                self._copy2d(int(src), int(dst), c)

    def _copy2d(self, src: int, dst: int, c: Copy2D) -> None:
        """Enqueue one Memcpy2D on the step's stream (offsets relative to src and dst)."""
        m = self._copier
        m.set_src_device(src + c.src_offset)
        m.src_pitch = c.src_pitch
        m.set_dst_device(dst + c.dst_offset)
        m.dst_pitch, m.dst_x_in_bytes = c.dst_pitch, c.dst_x_in_bytes
        m.width_in_bytes, m.height = c.width_in_bytes, c.height
        m(self._stream)

    # prefix-cache blocks (device-to-device, on the step's stream: ordered with the steps) ----
    def _block_part(self, tokens: int) -> int:
        """Bytes of one buffer's rows in a block: [Hkv, tokens, D]."""
        L = self.layout
        return L.kv_heads * tokens * L.head_dim * self.plan.kv_itemsize

    def read_kv(self, slot: int, lo: int, hi: int) -> DeviceKVBlock:
        """Positions lo..hi-1 of a slot, every buffer, into a new device allocation."""
        import pycuda.driver as cuda

        if self._closed:
            raise ToolkitError("the TensorRT backend is closed")
        L, T = self.layout, hi - lo
        part = self._block_part(T)
        c = block_read_copy(slot, lo, T, L.kv_heads, L.max_seq, L.head_dim, self.plan.kv_itemsize)
        self._cuda_ctx.push()
        try:
            alloc = cuda.mem_alloc(max(part * len(self._cache), 1))
            for i, buf in enumerate(self._cache):
                self._copy2d(int(buf), int(alloc) + i * part, c)
        finally:
            cuda.Context.pop()
        block = DeviceKVBlock(self, alloc, T, part * len(self._cache))
        self._blocks.add(block)
        return block

    def write_kv(self, slot: int, lo: int, block: KVBlock) -> None:
        """A block from read_kv into a slot at lo: the same strided copy as a step's new rows."""
        import pycuda.driver as cuda

        if not isinstance(block, DeviceKVBlock) or block not in self._blocks:
            raise TypeError("the block is not a live block of this backend")
        L, T = self.layout, block.tokens
        part = self._block_part(T)
        (c,) = slice_copies([slot], [lo], T, L.kv_heads, L.max_seq, L.head_dim, self.plan.kv_itemsize)
        self._cuda_ctx.push()
        try:
            for i, buf in enumerate(self._cache):
                self._copy2d(int(block.alloc) + i * part, int(buf), c)
        finally:
            cuda.Context.pop()

    def _release_block(self, block: DeviceKVBlock) -> None:
        import pycuda.driver as cuda

        if block not in self._blocks:
            return  # released before, or freed by close()
        self._blocks.discard(block)
        self._cuda_ctx.push()
        try:
            self._stream.synchronize()  # no copy from or into it may still be queued
            block.alloc.free()
        finally:
            cuda.Context.pop()

    # reporting and teardown -----------------------------------------------------------------
    def kv_cache_bytes(self) -> int:
        return self.plan.kv_cache_bytes

    def memory(self) -> dict[str, int | None]:
        """GPU view (cuda.mem_get_info) and the kernel's MemAvailable: on a Jetson both describe
        the same shared RAM, and MemAvailable is the one that counts reclaimable cache."""
        import pycuda.driver as cuda

        free = total = None
        if not self._closed:
            self._cuda_ctx.push()
            try:
                free, total = cuda.mem_get_info()
            finally:
                cuda.Context.pop()
        return {"gpu_free_bytes": free, "gpu_total_bytes": total,
                "mem_available_bytes": mem_available(), "kv_cache_bytes": self.kv_cache_bytes(),
                "backend_device_bytes": self.plan.device_bytes}

    def describe(self) -> dict[str, object]:
        return {"backend": self.kind, "engine": str(self.plan_path),
                "tensorrt": self.trt_version, "slots": self.slots, "max_seq": self.max_seq,
                "prefill_chunk": self.max_prefill, "kv_cache_bytes": self.kv_cache_bytes(),
                "staging_bytes": self.plan.staging_bytes,
                "backend_device_bytes": self.plan.device_bytes,
                "last_step_gpu_ms": self.last_step_ms}

    def close(self) -> None:
        import pycuda.driver as cuda

        if self._closed:
            return
        self._closed = True
        self._cuda_ctx.push()
        try:
            self._free()
        finally:
            cuda.Context.pop()
            self._cuda_ctx.detach()

    def _free(self) -> None:
        """Release everything allocated so far (the context must be current)."""
        stream = getattr(self, "_stream", None)
        if stream is not None:
            stream.synchronize()
        for buf in self._allocs:
            buf.free()
        self._allocs.clear()
        for block in getattr(self, "_blocks", ()):
            block.alloc.free()
        self._blocks = set()
        for arr in self._host:
            base = getattr(arr, "base", None)
            if base is not None and hasattr(base, "free"):
                base.free()  # the PagelockedHostAllocation behind the array
        self._host.clear()
        for name in ("_context", "_engine", "_runtime"):  # TensorRT objects, newest first
            if hasattr(self, name):
                delattr(self, name)
        # pycuda destroys a Stream/Event in its context only while that context is alive: after
        # detach() their finalizers skip the cleanup silently (pycuda cuda.hpp), leaking them
        for name in ("_start", "_end", "_stream"):
            if hasattr(self, name):
                delattr(self, name)
