"""GPU weights: the CUDA driver API through ctypes (no build-time CUDA).

The daemon lends a model on a GPU as one allocation, exported with
``cuIpcGetMemHandle``. This module finds a GPU's UUID (the daemon names GPUs
by UUID, since each process numbers them after its own
``CUDA_VISIBLE_DEVICES``), opens the handle in this process's primary
context (the one torch uses), and wraps each tensor through
``__cuda_array_interface__`` so that torch views the memory without owning
it: torch never frees it. The handle is closed, and the lease that keeps the
daemon from freeing the allocation ends, only once no tensor of it is left.
"""

from __future__ import annotations

import ctypes
import threading
from typing import Any, Dict, Optional

from . import _NUMPY_DTYPES, _torch_dtype
from .errors import InvalidArgument, MoraError

_CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS = 1
_lock = threading.Lock()
_lib: Optional[ctypes.CDLL] = None


class _IpcHandle(ctypes.Structure):
    _fields_ = [("reserved", ctypes.c_char * 64)]


def _driver() -> ctypes.CDLL:
    global _lib
    with _lock:
        if _lib is None:
            try:
                lib = ctypes.CDLL("libcuda.so.1")
            except OSError as e:
                raise InvalidArgument(f"device cuda: CUDA is not usable here: cannot load libcuda.so.1 ({e})") from None
            _check(lib, lib.cuInit(0), "cuInit")
            _lib = lib
        return _lib


def _check(lib: ctypes.CDLL, result: int, what: str) -> None:
    if result != 0:
        name = ctypes.c_char_p()
        lib.cuGetErrorName(result, ctypes.byref(name))
        raise MoraError(f"{what} failed: {(name.value or b'CUDA error %d' % result).decode()}")


def _device(ordinal: int) -> ctypes.c_int:
    lib = _driver()
    count = ctypes.c_int()
    _check(lib, lib.cuDeviceGetCount(ctypes.byref(count)), "cuDeviceGetCount")
    if not 0 <= ordinal < count.value:
        seen = f", cuda:0 to cuda:{count.value - 1}" if count.value else ""
        raise InvalidArgument(
            f"device cuda:{ordinal}: this process sees {count.value} GPU(s){seen} (check CUDA_VISIBLE_DEVICES)"
        )
    dev = ctypes.c_int()
    _check(lib, lib.cuDeviceGet(ctypes.byref(dev), ordinal), "cuDeviceGet")
    return dev


def uuid(ordinal: int) -> bytes:
    """The 16-byte UUID of the GPU this process calls ``cuda:ordinal``."""
    lib = _driver()
    dev = _device(ordinal)
    out = (ctypes.c_ubyte * 16)()
    get = getattr(lib, "cuDeviceGetUuid_v2", None) or lib.cuDeviceGetUuid
    _check(lib, get(out, dev), "cuDeviceGetUuid")
    return bytes(out)


class IpcMapping:
    """One opened IPC handle: the daemon's allocation in this process.

    ``keep`` is held until the mapping closes (the connection whose lease
    keeps the allocation alive); ``on_close`` is called after the handle is
    closed, only if it was opened.
    """

    def __init__(self, handle: bytes, ordinal: int, keep: Any, on_close: Any) -> None:
        self.ptr = 0
        self._on_close = None
        lib = _driver()
        self._lib = lib
        self._dev = _device(ordinal)
        self._keep = keep
        ctx = ctypes.c_void_p()
        _check(lib, lib.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), self._dev), "cuDevicePrimaryCtxRetain")
        self._ctx = ctx
        _check(lib, lib.cuCtxPushCurrent_v2(ctx), "cuCtxPushCurrent")
        try:
            ptr = ctypes.c_uint64()
            h = _IpcHandle.from_buffer_copy(handle)
            _check(
                lib,
                lib.cuIpcOpenMemHandle_v2(ctypes.byref(ptr), h, _CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS),
                "cuIpcOpenMemHandle",
            )
            self.ptr = ptr.value
            self._on_close = on_close
        except BaseException:
            lib.cuDevicePrimaryCtxRelease_v2(self._dev)
            raise
        finally:
            lib.cuCtxPopCurrent_v2(ctypes.byref(ctypes.c_void_p()))

    def __del__(self) -> None:
        if self.ptr:
            lib = self._lib
            lib.cuCtxPushCurrent_v2(self._ctx)
            lib.cuIpcCloseMemHandle(ctypes.c_uint64(self.ptr))
            lib.cuCtxPopCurrent_v2(ctypes.byref(ctypes.c_void_p()))
            lib.cuDevicePrimaryCtxRelease_v2(self._dev)
            self.ptr = 0
        on_close, self._on_close = self._on_close, None
        if on_close is not None:
            on_close()


class _CudaView:
    """What torch.as_tensor reads: one tensor of a mapping. Torch keeps this
    object (and so the mapping) alive as long as the tensor lives."""

    def __init__(self, mapping: IpcMapping, offset: int, shape: tuple, typestr: str) -> None:
        self._mapping = mapping
        self.__cuda_array_interface__ = {
            "shape": shape,
            "typestr": typestr,
            "data": (mapping.ptr + offset, True),
            "version": 3,
            "strides": None,
        }


def tensors(acquired: Any, ordinal: int, lent: Any) -> Dict[str, Any]:
    """torch CUDA tensors over the daemon's allocation, one per manifest row.
    ``lent`` (a ``mora._leases.Lent``) ends its lease once the mapping is
    collected; if the handle cannot be opened, the caller ends it."""
    import numpy as np
    import torch

    mapping = IpcMapping(acquired.ipc_handle, ordinal, lent.session, lent.end)
    lent.opened(mapping.ptr, acquired.len)
    out: Dict[str, Any] = {}
    device = torch.device("cuda", ordinal)
    for name, dtype, shape, offset, length in acquired.tensors:
        t_dtype = _torch_dtype(dtype)
        if length == 0:
            out[name] = torch.empty(tuple(shape), dtype=t_dtype, device=device)
            continue
        # CUDA arrays have no bfloat16 type string: carried as int16, viewed as bf16.
        typestr = "<i2" if dtype == "BF16" else np.dtype(_NUMPY_DTYPES[dtype]).str
        out[name] = torch.as_tensor(_CudaView(mapping, offset, tuple(shape), typestr), device=device).view(t_dtype)
    return out
