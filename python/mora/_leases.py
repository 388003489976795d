"""Leases and the memory they cover: a lease ends when nothing views its memory.

The daemon counts a leased model in its budget and refuses to evict it; this
process reads the model through a mapping. The two are tied here, so that
the daemon's accounting matches what is mapped: each lease has an anchor,
the host mapping (a Python ``mmap``, which every numpy array and torch
tensor over it keeps alive through the buffer protocol, views and slices
included) or the GPU IPC mapping (kept alive by every tensor's
``__cuda_array_interface__`` holder), and the lease ends when the anchor is
collected. Never before: the daemon would stop counting, and could evict,
memory this process still reads. Not much after: reference counting
collects the anchor as the last array goes; an array caught in a reference
cycle waits for the garbage collector. Closing a client only stops new
requests through it; its connection, which the leases belong to, stays open
until the last of its mappings is gone.

:func:`release` ends leases early, the one safe way there is: it takes the
lent tensors out of the object it is given (a module's parameters and
buffers go to the ``meta`` device, a state dict is emptied), so the object
refuses further use with :class:`~mora.errors.Released`; the lease ends when
that leaves its memory unviewed. Unmapping memory an array still views would
turn its next read into a segfault, so an array kept elsewhere keeps its
lease, and ``release`` says so.
"""

from __future__ import annotations

import gc
import threading
import warnings
import weakref
from typing import Any, Iterable, List, Optional, Set

from .errors import InvalidArgument, MoraError, Released


class Session:
    """The connection, shared by a client and the mappings made through it:
    it closes once the client is closed and no mapping is left, so that no
    lease ends while its memory is still viewed."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.client_open = True
        self.mappings = 0
        # Reentrant: a mapping's finalizer may run in any thread at any
        # allocation, this one included.
        self.lock = threading.RLock()

    def mapping_opened(self) -> None:
        with self.lock:
            self.mappings += 1

    def mapping_closed(self, lease: int) -> None:
        """A mapping's arrays are all gone: end its lease now, and close the
        connection if the client is closed and it was the last one."""
        with self.lock:
            self.mappings -= 1
            done = not self.client_open and self.mappings == 0
        # Released before the connection closes: when this returns, the
        # daemon has ended the lease (it notices a closed connection later).
        if not self.conn.closed:
            try:
                self.conn.release(lease)
            except MoraError:
                pass  # the daemon went away: the lease went with the connection
        if done:
            self.conn.close()

    def close_client(self) -> None:
        with self.lock:
            self.client_open = False
            done = self.mappings == 0
        if done:
            self.conn.close()


# Every lease whose memory is still mapped here.
_live: Set["Lent"] = set()
_live_lock = threading.RLock()


class Lent:
    """One lease, and the memory it covers once :meth:`watch` has been
    given its anchor: ``nbytes`` from address ``start`` on ``device``
    (``"cpu"``, ``"cuda:N"``)."""

    def __init__(self, session: Session, lease: int, name: str, dtype: str, device: str) -> None:
        self.session = session
        self.lease = lease
        self.name = name
        self.dtype = dtype
        self.device = device
        self.start = 0
        self.nbytes = 0

    def opened(self, start: int, nbytes: int) -> None:
        """The mapping exists: from now on :meth:`end` ends the lease."""
        self.start, self.nbytes = start, nbytes
        with _live_lock:
            _live.add(self)
        self.session.mapping_opened()

    def watch(self, anchor: Any, start: int, nbytes: int) -> None:
        """Ends the lease when ``anchor`` (the host ``mmap``) is collected."""
        self.opened(start, nbytes)
        fin = weakref.finalize(anchor, self.end)
        fin.atexit = False  # at exit the kernel closes the connection, and the lease with it

    def end(self) -> None:
        """The mapping is gone (runs once; a no-op before :meth:`opened`)."""
        with _live_lock:
            if self not in _live:
                return
            _live.discard(self)
        self.session.mapping_closed(self.lease)

    @property
    def alive(self) -> bool:
        with _live_lock:
            return self in _live

    def views(self, ptr: int, device: str) -> bool:
        return device == self.device and self.start <= ptr < self.start + self.nbytes

    def __repr__(self) -> str:
        return f"{self.name} ({self.dtype}, {self.device})"


def _lent_at(ptr: int, device: str) -> Optional[Lent]:
    with _live_lock:
        live = tuple(_live)  # a copy: a finalizer may end a lease in this thread, mid-loop
    return next((lent for lent in live if lent.views(ptr, device)), None)


def _modules_of(obj: Any) -> List[Any]:
    """The torch modules of ``obj``: itself, or a pipeline's components."""
    import sys

    torch = sys.modules.get("torch")
    if torch is None:
        return []
    if isinstance(obj, torch.nn.Module):
        return [obj]
    components = getattr(obj, "components", None)
    if isinstance(components, dict):
        return [c for c in components.values() if isinstance(c, torch.nn.Module)]
    return []


def _refuse(module: Any, args: Any) -> None:
    raise Released(
        f"this {type(module).__name__}'s weights were given back with mora.release(): load the model again to use it"
    )


def _strip(module: Any, touched: Set[Lent]) -> None:
    """Puts every parameter and buffer of ``module`` that views lent memory
    on ``meta``, and makes each module that had one refuse to run."""
    import torch

    for m in module.modules():
        stripped = False
        for table in (m._parameters, m._buffers):
            for name, t in list(table.items()):
                if t is None or t.is_meta or t.numel() == 0:
                    continue
                lent = _lent_at(t.data_ptr(), str(t.device))
                if lent is None:
                    continue
                touched.add(lent)
                meta = torch.empty(t.shape, dtype=t.dtype, device="meta")
                if isinstance(t, torch.nn.Parameter):
                    meta = torch.nn.Parameter(meta, requires_grad=t.requires_grad)
                table[name] = meta
                stripped = True
        if stripped or m is module:
            if not getattr(m, "_mora_released", False):
                m.register_forward_pre_hook(_refuse)
                m.__dict__["_mora_released"] = True


def _drop_borrowed(obj: Any, touched: Set[Lent]) -> None:
    """Empties the state dicts ``obj._mora`` keeps, and forgets them."""
    borrowed = vars(obj).get("_mora") if hasattr(obj, "__dict__") else None
    if borrowed is None:
        return
    for sd in getattr(borrowed, "state_dicts", ()):
        _clear(sd, touched)
    del obj.__dict__["_mora"]


def _clear(sd: Any, touched: Set[Lent]) -> None:
    lent = getattr(sd, "_lent", None)
    if lent is not None:
        touched.add(lent)
    dict.clear(sd)


def release(obj: Any) -> bool:
    """Ends the leases on the weights ``obj`` borrowed from the daemon, now
    rather than when ``obj`` is collected; returns whether they all ended.

    ``obj``: what mora lent or built: a ``StateDict``, a ``SafeOpen``, a
    module (``mora.transformers.from_pretrained``'s, a diffusers model, a
    ``SentenceTransformer``, or one given weights by ``mora.load_state_dict``)
    or a diffusers pipeline. Its lent tensors are taken out of it (a state
    dict is emptied; a module's parameters and buffers that view the daemon's
    memory go to the ``meta`` device), and calling the module, or any
    submodule that lost a tensor, then raises :class:`~mora.errors.Released`.
    A lease ends once nothing views its memory: an array or tensor of the
    same model kept elsewhere (a variable, another module, the state dict a
    module was fed from) keeps it, counted in the daemon's budget and safe
    to read, until it is collected; ``release`` then warns, naming the
    model, and returns False.
    """
    from . import SafeOpen, StateDict  # this module is imported by mora/__init__.py

    touched: Set[Lent] = set()
    if isinstance(obj, SafeOpen):
        sd = obj._sd
        obj.close()
        if sd is not None:
            _clear(sd, touched)
    elif isinstance(obj, StateDict):
        _clear(obj, touched)
    else:
        modules = _modules_of(obj)
        if not modules and not hasattr(obj, "_mora"):
            raise InvalidArgument(
                f"mora.release takes what mora lent (a StateDict, a safe_open, a module or a pipeline), "
                f"not a {type(obj).__module__}.{type(obj).__qualname__}: drop an array (del) and its lease ends when the last one is collected"
            )
        _drop_borrowed(obj, touched)
        for m in modules:
            for sub in m.modules():
                _drop_borrowed(sub, touched)
            _strip(m, touched)
    return _ended(touched)


def _ended(touched: Iterable[Lent]) -> bool:
    left = [lent for lent in touched if lent.alive]
    if left:
        gc.collect()  # what only a reference cycle kept
        left = [lent for lent in left if lent.alive]
    if not left:
        return True
    names = ", ".join(sorted(repr(lent) for lent in left))
    warnings.warn(
        f"mora.release: arrays or tensors of {names} are still alive outside the object given; "
        "each lease ends when the last of them is collected",
        stacklevel=3,
    )
    return False
