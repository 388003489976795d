"""Type stubs of the native module `mora._mora` (python/src/lib.rs)."""

from os import PathLike
from typing import List, Optional, Tuple, Union

__version__: str
PROTOCOL_VERSION: int

class Acquired:
    name: str
    dir: str
    dtype: str
    lease: int
    loaded_now: bool
    load_ms: int
    len: int
    fd: Optional[int]
    ipc_handle: Optional[bytes]
    tensors: List[Tuple[str, str, List[int], int, int]]

class Connection:
    def __init__(self, socket: Optional[Union[str, PathLike[str]]] = None, autostart: bool = True) -> None: ...
    @property
    def socket(self) -> str: ...
    @property
    def daemon_pid(self) -> int: ...
    @property
    def closed(self) -> bool: ...
    def close(self) -> None: ...
    def acquire(
        self,
        model: str,
        dtype: Optional[str] = None,
        gpu: Optional[bytes] = None,
        keep_alive: Optional[str] = None,
        subfolder: Optional[str] = None,
        variant: Optional[str] = None,
    ) -> Acquired: ...
    def release(self, lease: int) -> None: ...
    def ps(self) -> str: ...
    def load(
        self,
        model: str,
        dtype: Optional[str] = None,
        gpu: Optional[bytes] = None,
        pin: bool = False,
        keep_alive: Optional[str] = None,
        subfolder: Optional[str] = None,
        variant: Optional[str] = None,
    ) -> Optional[str]: ...
    def evict(self, model: str, dtype: Optional[str] = None) -> Tuple[List[str], int]: ...
    def pin(self, model: str, dtype: Optional[str] = None) -> List[str]: ...
    def unpin(self, model: str, dtype: Optional[str] = None) -> List[str]: ...
