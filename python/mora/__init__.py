"""Borrow model weights resident in the Mora cache daemon.

``mora-cache serve`` keeps model weights in sealed shared memory (or GPU
memory). This package asks it for a model and hands back numpy arrays or torch
tensors that view the daemon's pages in place: no read from disk, no copy, and
one copy of each model however many processes use it. The daemon is reached,
and started when none answers, as ``mora-exec`` reaches it.

    import mora

    with mora.connect() as client:
        sd = client.state_dict("sentence-transformers/all-MiniLM-L6-v2")
        with mora.init_empty_weights():        # parameters on meta, buffers real
            model = AutoModel.from_config(AutoConfig.from_pretrained(sd.dir))
        mora.load_state_dict(model, sd, strict=False)   # assign=True; nothing left on meta

The leases live as long as what borrows from them: a model's lease ends when
the last array, tensor or module viewing it is collected (or at exit), and
``mora.release(obj)`` ends it sooner, taking the weights out of ``obj``.

Build the module under ``mora.init_empty_weights()``, not
``torch.device("meta")``: the latter leaves buffers that no state dict
carries (``position_ids``) on meta, with no data, and the model then computes
on memory nobody wrote; ``mora.load_state_dict`` refuses such a module.

Host arrays view a private copy-on-write mapping of the daemon's sealed
segment: numpy arrays are read-only (``writeable=False``); an in-place write
to a torch tensor (torch has no read-only tensors) lands on a page private to
this process and never reaches the daemon or any other process.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import re
from typing import Any, Dict, Iterator, List, NamedTuple, Optional, Tuple, Union

from . import _mora
from .errors import (
    ClientClosed,
    ConnectFailed,
    ConnectionLost,
    DaemonError,
    DaemonNotRunning,
    InvalidArgument,
    MetaTensorsLeft,
    ModelNotFound,
    MoraError,
    Released,
    VersionMismatch,
)
from ._leases import Lent, Session, release
from ._modules import init_empty_weights, load_state_dict

__version__: str = _mora.__version__
PROTOCOL_VERSION: int = _mora.PROTOCOL_VERSION

__all__ = [
    "connect",
    "safe_open",
    "init_empty_weights",
    "load_state_dict",
    "release",
    "Client",
    "StateDict",
    "SafeOpen",
    "Evicted",
    "MoraError",
    "InvalidArgument",
    "ConnectFailed",
    "DaemonNotRunning",
    "VersionMismatch",
    "ConnectionLost",
    "ClientClosed",
    "ModelNotFound",
    "DaemonError",
    "MetaTensorsLeft",
    "Released",
]

PathLike = Union[str, "os.PathLike[str]"]

# What users write for a weight dtype -> the daemon's name for it.
_WEIGHT_DTYPES = {
    "f32": "f32",
    "float32": "f32",
    "fp32": "f32",
    "float": "f32",
    "f16": "f16",
    "float16": "f16",
    "fp16": "f16",
    "half": "f16",
    "bf16": "bf16",
    "bfloat16": "bf16",
}

# safetensors dtype names (the manifest's) -> numpy's.
_NUMPY_DTYPES = {
    "F64": "<f8",
    "F32": "<f4",
    "F16": "<f2",
    "I64": "<i8",
    "I32": "<i4",
    "I16": "<i2",
    "I8": "i1",
    "U64": "<u8",
    "U32": "<u4",
    "U16": "<u2",
    "U8": "u1",
    "BOOL": "?",
}

_TORCH_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U64": "uint64",
    "U32": "uint32",
    "U16": "uint16",
    "U8": "uint8",
    "BOOL": "bool",
}


def _weight_dtype(dtype: Any) -> Optional[str]:
    """None, a string, a torch dtype or a numpy dtype -> "f32", "f16", "bf16"
    (or the name as given, for the daemon's own message to refuse)."""
    if dtype is None:
        return None
    if isinstance(dtype, str):
        name = dtype
    elif isinstance(dtype, type) and hasattr(dtype, "__name__"):
        name = dtype.__name__  # numpy.float16
    else:
        name = str(dtype)  # torch.float16, numpy.dtype('float16')
    name = name[len("torch.") :] if name.startswith("torch.") else name
    if name in _WEIGHT_DTYPES:
        return _WEIGHT_DTYPES[name]
    raise InvalidArgument(f"unknown dtype `{name}`: expected f32, f16 or bf16")


def _device(device: Any) -> Optional[int]:
    """None for the host, else the GPU ordinal of ``cuda`` / ``cuda:N``."""
    name = str(device)
    if name == "cpu":
        return None
    if name == "cuda":
        return 0
    m = re.fullmatch(r"cuda:(\d+)", name)
    if m:
        return int(m.group(1))
    raise InvalidArgument(f"unknown device `{name}`: expected cpu, cuda or cuda:N")


def _framework(framework: str) -> str:
    if framework in ("pt", "torch"):
        return "pt"
    if framework in ("np", "numpy"):
        return "numpy"
    raise InvalidArgument(f"unknown framework `{framework}`: expected \"pt\" (torch) or \"numpy\"")


# torch's and numpy's names for a dtype -> safetensors' name.
_SAFETENSORS_DTYPES = {v: k for k, v in _TORCH_DTYPES.items()}


def _gpu_uuid(ordinal: Optional[int]) -> Optional[bytes]:
    """The UUID the daemon is told for this process's ``cuda:ordinal`` (None: the host)."""
    if ordinal is None:
        return None
    from . import _cuda

    return _cuda.uuid(ordinal)


def _torch_dtype(dtype: str) -> Any:
    import torch

    t = getattr(torch, _TORCH_DTYPES.get(dtype, ""), None)
    if t is None:
        raise MoraError(f"tensor dtype {dtype} has no torch equivalent in torch {torch.__version__}")
    return t


def _host_tensors(acquired: Any, framework: str) -> Tuple[Dict[str, Any], Optional[mmap.mmap]]:
    """Arrays over a private copy-on-write mapping of the sealed segment, and
    the mapping (None for a model of no bytes). The mapping lives as long as
    any array of it: numpy and torch hold the buffer they view."""
    fd = acquired.fd
    try:
        buf = (
            mmap.mmap(fd, acquired.len, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
            if acquired.len
            else None
        )
    finally:
        os.close(fd)
    out: Dict[str, Any] = {}
    if framework == "numpy":
        import numpy as np

        for name, dtype, shape, offset, length in acquired.tensors:
            if dtype == "BF16":
                raise InvalidArgument("numpy has no bfloat16: ask dtype=\"float32\" or \"float16\", or use framework=\"pt\"")
            np_dtype = np.dtype(_NUMPY_DTYPES[dtype])
            if length:
                a = np.frombuffer(buf, dtype=np_dtype, count=length // np_dtype.itemsize, offset=offset)
                a = a.reshape(shape)
            else:
                a = np.empty(shape, dtype=np_dtype)
            a.flags.writeable = False
            out[name] = a
    else:
        import torch

        for name, dtype, shape, offset, length in acquired.tensors:
            t_dtype = _torch_dtype(dtype)
            if length:
                itemsize = torch.empty((), dtype=t_dtype).element_size()
                t = torch.frombuffer(buf, dtype=t_dtype, count=length // itemsize, offset=offset).view(tuple(shape))
            else:
                t = torch.empty(tuple(shape), dtype=t_dtype)
            out[name] = t
    return out, buf


class StateDict(Dict[str, Any]):
    """A model's tensors by name (a ``dict``, so ``load_state_dict`` takes it),
    and where they came from.

    Attributes: ``name`` (what the daemon calls the model), ``dir`` (its
    directory: config, tokenizer), ``dtype`` ("f32", "f16", "bf16"),
    ``device`` ("cpu" or "cuda:N"), ``lease`` (the daemon's lease id),
    ``loaded_now`` (this request made the daemon read the files),
    ``load_ms`` and ``nbytes`` (bytes of the daemon's copy).

    The lease lasts while any of its tensors lives, here or anywhere else;
    :func:`mora.release` empties it and ends the lease if nothing else views
    the memory.
    """

    name: str
    dir: str
    dtype: str
    device: str
    lease: int
    loaded_now: bool
    load_ms: int
    nbytes: int

    def __repr__(self) -> str:
        return f"<mora.StateDict {self.name} {self.dtype} on {self.device}: {len(self)} tensors, {self.nbytes} bytes>"


class Evicted(NamedTuple):
    """What ``Client.evict`` evicted: the models' names, and the bytes freed."""

    models: List[str]
    bytes: int


class Client:
    """A connection to the Mora cache daemon; see :func:`connect`.

    Every model lent through it stays leased (the daemon keeps it resident,
    counts it in its budget and will not evict it) while any array or tensor
    of it lives, whether or not the client is still open: the lease ends when
    the last one is collected, or at :func:`mora.release`. Closing the client
    stops requests through it; its connection, which holds the leases,
    closes once the last array of them is gone.
    """

    def __init__(self, socket: Optional[PathLike] = None, autostart: bool = True) -> None:
        conn = _mora.Connection(None if socket is None else os.fspath(socket), autostart)
        self._session = Session(conn)
        self._closed = False

    # -- lifetime -----------------------------------------------------------
    def close(self) -> None:
        """No more requests through this client. Leases whose arrays are all
        gone have ended already; each other one ends with its last array."""
        if not self._closed:
            self._closed = True
            self._session.close_client()

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def _conn(self) -> Any:
        if self._closed:
            raise ClientClosed("this mora client is closed")
        return self._session.conn

    @property
    def socket(self) -> str:
        """The daemon's socket path."""
        return os.fspath(self._session.conn.socket)

    @property
    def daemon_pid(self) -> int:
        return self._session.conn.daemon_pid

    # -- weights ------------------------------------------------------------
    def state_dict(
        self,
        model: PathLike,
        dtype: Any = None,
        device: Any = "cpu",
        framework: str = "pt",
        keep_alive: Optional[Union[str, int]] = None,
        *,
        subfolder: Optional[str] = None,
        variant: Optional[str] = None,
    ) -> StateDict:
        """The tensors of ``model``, viewing the daemon's copy in place.

        ``model``: a Hugging Face repo id ``OWNER/NAME[@REVISION]`` in this
        process's hub cache (``HF_HUB_CACHE``, ``HF_HOME``), or a model
        directory, as ``mora-cache load`` takes it. ``dtype``: the floats'
        dtype, ``"float32"`` (the default, as for workflows, so the entry is
        shared with ``mora-exec`` runs), ``"float16"`` or ``"bfloat16"``
        (strings, torch or numpy dtypes). ``device``: ``"cpu"`` or
        ``"cuda:N"`` (torch only). ``framework``: ``"pt"`` for torch tensors,
        ``"numpy"`` for read-only numpy arrays. ``keep_alive``: how long the
        daemon keeps the model once idle (``"30m"``, ``-1`` forever, ``0``).
        ``subfolder``: one component of a diffusers pipeline (``"unet"``,
        ``"vae"``, ``"text_encoder"``), as ``from_pretrained(..., subfolder=)``;
        ``variant``: the weight files' variant (``"fp16"`` reads
        ``diffusion_pytorch_model.fp16.safetensors``), as diffusers' ``variant=``.
        A load shows its progress on stderr.
        """
        fw = _framework(framework)
        ordinal = _device(device)
        wd = _weight_dtype(dtype)
        if fw == "numpy" and ordinal is not None:
            raise InvalidArgument("numpy arrays live on the host: use framework=\"pt\" for a cuda device")
        if fw == "numpy" and wd == "bf16":
            raise InvalidArgument("numpy has no bfloat16: ask dtype=\"float32\" or \"float16\", or use framework=\"pt\"")
        if fw == "pt":
            try:
                import torch  # noqa: F401
            except ImportError:
                raise InvalidArgument("framework=\"pt\" needs torch, which is not importable here: pip install torch, or use framework=\"numpy\"") from None
        gpu = _gpu_uuid(ordinal)
        conn = self._conn()
        ka = None if keep_alive is None else str(keep_alive)
        acquired = conn.acquire(os.fspath(model), wd, gpu, ka, subfolder, variant)
        sd_device = "cpu" if ordinal is None else f"cuda:{ordinal}"
        lent = Lent(self._session, acquired.lease, acquired.name, acquired.dtype, sd_device)
        try:
            if acquired.fd is not None:
                tensors, buf = _host_tensors(acquired, fw)
                sd = StateDict(tensors)
                # The lease ends when the mapping is collected: after the last array.
                if buf is not None:
                    lent.watch(buf, ctypes.addressof(ctypes.c_char.from_buffer(buf)), acquired.len)
                else:
                    lent.watch(sd, 0, 0)
            else:
                from . import _cuda

                # The lease ends when the IPC mapping is collected (after the last tensor).
                sd = StateDict(_cuda.tensors(acquired, ordinal, lent))
        except BaseException:
            try:
                conn.release(acquired.lease)
            except MoraError:
                pass
            raise
        sd._lent = lent
        sd.name = acquired.name
        sd.dir = os.fspath(acquired.dir)
        sd.dtype = acquired.dtype
        sd.device = sd_device
        sd.lease = acquired.lease
        sd.loaded_now = acquired.loaded_now
        sd.load_ms = acquired.load_ms
        sd.nbytes = acquired.len
        return sd

    def safe_open(
        self,
        model: PathLike,
        framework: str = "pt",
        device: Any = "cpu",
        dtype: Any = None,
        *,
        subfolder: Optional[str] = None,
        variant: Optional[str] = None,
    ) -> "SafeOpen":
        """A ``safetensors.safe_open``-like view of ``model`` through this client."""
        return SafeOpen(
            self.state_dict(model, dtype=dtype, device=device, framework=framework, subfolder=subfolder, variant=variant)
        )

    # -- what the daemon holds (as mora-cache ps/load/evict/pin/unpin) -------
    def status(self) -> Dict[str, Any]:
        """The daemon's state: ``pid``, ``budget``, ``used`` (bytes),
        ``default_keep_alive``, ``gpus`` and ``models`` (see :meth:`ps`)."""
        import json

        return json.loads(self._conn().ps())

    def ps(self) -> List[Dict[str, Any]]:
        """The models the daemon holds or is loading, one dict each, with the
        keys of ``mora-cache ps --json`` (``name``, ``names``, ``state``,
        ``dtype``, ``device``, ``bytes``, ``leases``, ``lease_pids``,
        ``pinned``, ``keep_alive``, ``loads``, ``hits``, ...)."""
        return self.status()["models"]

    def load(
        self,
        model: PathLike,
        dtype: Any = None,
        device: Any = "cpu",
        pin: bool = False,
        keep_alive: Optional[Union[str, int]] = None,
        *,
        subfolder: Optional[str] = None,
        variant: Optional[str] = None,
    ) -> Optional[Dict[str, Any]]:
        """Makes ``model`` resident without lending it (``mora-cache load``).
        Returns its ``ps`` entry, or None when it was resident already and
        only its pin or keep-alive changed. ``subfolder`` and ``variant`` as
        for :meth:`state_dict`."""
        import json

        gpu = _gpu_uuid(_device(device))
        ka = None if keep_alive is None else str(keep_alive)
        out = self._conn().load(os.fspath(model), _weight_dtype(dtype), gpu, pin, ka, subfolder, variant)
        return None if out is None else json.loads(out)

    def evict(self, model: PathLike, dtype: Any = None) -> Evicted:
        """Evicts ``model`` (every dtype and device, or ``dtype`` only).
        Refused (``DaemonError``, kind ``"refused"``) while leased or pinned."""
        models, freed = self._conn().evict(os.fspath(model), _weight_dtype(dtype))
        return Evicted(models, freed)

    def pin(self, model: PathLike, dtype: Any = None) -> List[str]:
        """Protects ``model`` from eviction; returns the entries pinned."""
        return self._conn().pin(os.fspath(model), _weight_dtype(dtype))

    def unpin(self, model: PathLike, dtype: Any = None) -> List[str]:
        """Stops protecting ``model``; returns the entries unpinned."""
        return self._conn().unpin(os.fspath(model), _weight_dtype(dtype))

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"daemon pid {self.daemon_pid}"
        return f"<mora.Client {self.socket} ({state})>"


class _Slice:
    """What ``SafeOpen.get_slice`` returns, as safetensors' slices: indexing
    reads part of a tensor; ``get_shape()`` and ``get_dtype()`` describe it."""

    def __init__(self, tensor: Any, dtype: str) -> None:
        self._t = tensor
        self._dtype = dtype

    def get_shape(self) -> List[int]:
        return list(self._t.shape)

    def get_dtype(self) -> str:
        return self._dtype

    def __getitem__(self, index: Any) -> Any:
        return self._t[index]


class SafeOpen:
    """A ``safetensors.safe_open``-like object over a lent model, for loaders
    written for safetensors: ``keys()``, ``get_tensor(name)``,
    ``get_slice(name)``, ``metadata()``; a context manager. Its tensors are
    the daemon's pages, not copies.

    As with safetensors, the tensors taken from it outlive it: ``close()``
    (the end of the ``with`` block) lets go of the model, whose lease then
    ends when the last tensor taken is collected."""

    def __init__(self, state: StateDict, client: Optional[Client] = None) -> None:
        self._sd: Optional[StateDict] = state
        self._own = client
        self._dtypes = {}
        for name, t in state.items():
            self._dtypes[name] = _safetensors_dtype(t)

    def _state(self) -> StateDict:
        if self._sd is None:
            raise ClientClosed("this mora.safe_open is closed: open the model again")
        return self._sd

    @property
    def state_dict(self) -> StateDict:
        return self._state()

    def keys(self) -> List[str]:
        """Tensor names, sorted (as safetensors lists them)."""
        return sorted(self._state())

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __contains__(self, name: object) -> bool:
        return name in self._state()

    def get_tensor(self, name: str) -> Any:
        sd = self._state()
        try:
            return sd[name]
        except KeyError:
            raise KeyError(f"{sd.name} has no tensor `{name}`") from None

    def get_slice(self, name: str) -> _Slice:
        return _Slice(self.get_tensor(name), self._dtypes[name])

    def metadata(self) -> Optional[Dict[str, str]]:
        """safetensors' free-form ``__metadata__``: Mora does not carry it (None)."""
        return None

    def close(self) -> None:
        """Lets go of the model (and closes the connection ``mora.safe_open``
        made); tensors taken from it stay valid, and hold the lease."""
        self._sd = None
        if self._own is not None:
            self._own.close()

    def __enter__(self) -> "SafeOpen":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _safetensors_dtype(t: Any) -> str:
    """safetensors' name for a torch or numpy tensor's dtype ("F32", "BF16")."""
    name = str(t.dtype).replace("torch.", "")
    return _SAFETENSORS_DTYPES.get(name, name.upper())


def connect(socket: Optional[PathLike] = None, autostart: bool = True) -> Client:
    """Connects to the Mora cache daemon.

    ``socket``: its path; by default ``$MORA_SOCKET``, else
    ``$XDG_RUNTIME_DIR/mora/cache.sock``, else ``/tmp/mora-$UID/cache.sock``
    (as ``mora-exec``). With ``autostart`` (the default), a daemon is started
    (``mora-cache serve``, found on ``PATH``) when none answers, its log
    beside the socket. Raises ``DaemonNotRunning`` when none answers and
    ``autostart`` is off, ``VersionMismatch`` when it speaks another
    protocol version. Use it as a context manager, call ``close()``, or let
    it be collected: either way, each lease lasts while any array of it
    lives.
    """
    return Client(socket, autostart)


def safe_open(
    model: PathLike,
    framework: str = "pt",
    device: Any = "cpu",
    *,
    dtype: Any = None,
    subfolder: Optional[str] = None,
    variant: Optional[str] = None,
    socket: Optional[PathLike] = None,
    autostart: bool = True,
) -> SafeOpen:
    """``safetensors.safe_open(filename, framework, device)``, for a model the
    daemon holds: connects and borrows the model. The end of the ``with``
    block lets go of it; the lease, and the connection, end when no tensor
    taken from it is left.

        with mora.safe_open("sentence-transformers/all-MiniLM-L6-v2", framework="pt") as f:
            for name in f.keys():
                tensor = f.get_tensor(name)
    """
    client = Client(socket, autostart)
    try:
        return SafeOpen(
            client.state_dict(model, dtype=dtype, device=device, framework=framework, subfolder=subfolder, variant=variant),
            client,
        )
    except BaseException:
        client.close()
        raise
