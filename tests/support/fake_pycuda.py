"""A simulated pycuda.driver for CI (no GPU): device memory as host bytearrays, with the driver's
rules that the backend's code must keep - a context must be current for every call, addresses
stay inside their allocation, freed memory is gone - so tools/gpu_check.py's checks and the
backend's buffer code run end to end here. What only a GPU proves (the real Memcpy2D, timing,
mem_get_info) is what tools/gpu_check.py reports from a real one.

    sys.modules["pycuda.driver"] = fake_pycuda.driver()   # a fresh device each time
    drv = fake_pycuda.install(monkeypatch)                 # the same, undone after the test
"""

from __future__ import annotations

import bisect
import sys
import time
import types
from typing import Any

import numpy as np

ALIGN = 256
CAPACITY = 1 << 30  # what mem_get_info reports as total


class Error(Exception):
    pass


class OutOfMemory(Error):
    pass


class _Memory:
    def __init__(self) -> None:
        self.bases: list[int] = []
        self.blocks: dict[int, bytearray] = {}
        self.next = 1 << 20
        self.contexts: list[Any] = []
        self.live: dict[int, str] = {}  # id -> "stream"/"event": created and not yet destroyed

    def need_context(self) -> None:
        if not self.contexts:
            raise Error("no current CUDA context (push one first)")

    def alloc(self, n: int) -> int:
        self.need_context()
        if self.used() + n > CAPACITY:
            raise OutOfMemory(f"out of memory allocating {n} bytes")
        ptr = self.next
        self.next += (n + ALIGN - 1) // ALIGN * ALIGN + ALIGN
        bisect.insort(self.bases, ptr)
        self.blocks[ptr] = bytearray(n)
        return ptr

    def free(self, ptr: int) -> None:
        self.need_context()
        del self.blocks[ptr]
        self.bases.remove(ptr)

    def used(self) -> int:
        return sum(len(b) for b in self.blocks.values())

    def view(self, ptr: int, n: int) -> memoryview:
        """n bytes at device address ptr; outside any live allocation is an error."""
        self.need_context()
        i = bisect.bisect_right(self.bases, ptr) - 1
        if i < 0:
            raise Error(f"address {ptr:#x} is not device memory")
        base = self.bases[i]
        block = self.blocks[base]
        off = ptr - base
        if off + n > len(block):
            raise Error(f"{n} bytes at {ptr:#x} run past its allocation ({len(block)} bytes)")
        return memoryview(block)[off:off + n]


def install(monkeypatch: Any) -> types.ModuleType:
    """A fresh driver() as `pycuda` / `pycuda.driver` in sys.modules for one test (a pytest
    MonkeyPatch undoes it), wherever the code under test imports it; returns the driver."""
    drv = driver()
    pkg = types.ModuleType("pycuda")
    pkg.driver = drv  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "pycuda", pkg)
    monkeypatch.setitem(sys.modules, "pycuda.driver", drv)
    return drv


def driver() -> types.ModuleType:
    """A fresh simulated `pycuda.driver` module (its own device memory)."""
    mem = _Memory()
    m = types.ModuleType("pycuda.driver")
    m.Error, m.MemoryError = Error, OutOfMemory  # type: ignore[attr-defined]

    class DeviceAllocation:
        def __init__(self, n: int) -> None:
            self.ptr = mem.alloc(n)

        def __int__(self) -> int:
            return self.ptr

        def free(self) -> None:
            mem.free(self.ptr)

    class Context:
        valid = True  # pycuda's detach() ends the context: nothing can be cleaned up in it after

        def push(self) -> None:
            mem.contexts.append(self)

        def detach(self) -> None:
            self.valid = False

        @staticmethod
        def pop() -> None:
            if not mem.contexts:
                raise Error("context stack is empty")
            mem.contexts.pop()

    class Device:
        def __init__(self, index: int) -> None:
            if index != 0:
                raise Error(f"no device {index}")

        @staticmethod
        def count() -> int:
            return 1

        def name(self) -> str:
            return "simulated GPU (tests/support/fake_pycuda.py)"

        def compute_capability(self) -> tuple[int, int]:
            return (9, 0)

        def retain_primary_context(self) -> Context:
            return Context()

    class _Owned:
        """A stream or event: made in the current context and destroyed by its finalizer in that
        context, as pycuda does; once the context is detached the finalizer cannot activate it,
        and pycuda silently leaves the object undestroyed (cuda.hpp,
        CUDAPP_CATCH_CLEANUP_ON_DEAD_CONTEXT) - here it stays in memory.live."""

        kind = ""

        def __init__(self) -> None:
            mem.need_context()
            self._owner = mem.contexts[-1]
            mem.live[id(self)] = self.kind

        def __del__(self) -> None:
            if self._owner.valid:
                mem.live.pop(id(self), None)

    class Stream(_Owned):
        handle = 1
        kind = "stream"

        def synchronize(self) -> None:
            mem.need_context()

    class Event(_Owned):
        t = 0.0
        kind = "event"

        def record(self, stream: Stream | None = None) -> None:
            self.t = time.perf_counter()

        def synchronize(self) -> None:
            pass

        def time_till(self, end: Event) -> float:
            return (end.t - self.t) * 1e3

    class Memcpy2D:
        src_pitch = dst_pitch = width_in_bytes = height = dst_x_in_bytes = src_x_in_bytes = 0

        def set_src_device(self, ptr: int) -> None:
            self.src = int(ptr)

        def set_dst_device(self, ptr: int) -> None:
            self.dst = int(ptr)

        def __call__(self, stream: Stream | None = None) -> None:
            w = self.width_in_bytes
            for r in range(self.height):
                s = mem.view(self.src + r * self.src_pitch + self.src_x_in_bytes, w)
                mem.view(self.dst + r * self.dst_pitch + self.dst_x_in_bytes, w)[:] = s

    def host(arr: np.ndarray) -> memoryview:
        return memoryview(np.ascontiguousarray(arr).view(np.uint8).reshape(-1))

    def memcpy_htod(dst: Any, src: np.ndarray, stream: Stream | None = None) -> None:
        data = host(src)
        mem.view(int(dst), len(data))[:] = data

    def memcpy_dtoh(dst: np.ndarray, src: Any, stream: Stream | None = None) -> None:
        out = dst.view(np.uint8).reshape(-1)
        out[:] = np.frombuffer(mem.view(int(src), out.size), np.uint8)

    def memcpy_dtod_async(dst: Any, src: Any, n: int, stream: Stream | None = None) -> None:
        mem.view(int(dst), n)[:] = bytes(mem.view(int(src), n))

    def memset_d8(ptr: Any, value: int, n: int) -> None:
        mem.view(int(ptr), n)[:] = bytes([value]) * n

    def mem_get_info() -> tuple[int, int]:
        mem.need_context()
        return CAPACITY - mem.used(), CAPACITY

    m.__dict__.update(
        init=lambda flags=0: None, Device=Device, Context=Context, Stream=Stream, Event=Event,
        Memcpy2D=Memcpy2D, DeviceAllocation=DeviceAllocation, mem_alloc=DeviceAllocation,
        memcpy_htod=memcpy_htod, memcpy_htod_async=memcpy_htod, memcpy_dtoh=memcpy_dtoh,
        memcpy_dtoh_async=memcpy_dtoh, memcpy_dtod_async=memcpy_dtod_async, memset_d8=memset_d8,
        pagelocked_empty=lambda n, dtype: np.empty(n, dtype), mem_get_info=mem_get_info,
        get_driver_version=lambda: 13000, memory=mem)
    return m
