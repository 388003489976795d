"""The exceptions of the mora package.

Every one carries a one-line message, the same the command-line tools print
for the same failure (what, where, what to do), as ``str(exc)``.
"""

from __future__ import annotations

from typing import Iterable

__all__ = [
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


class MoraError(Exception):
    """Base class of every error the mora package raises."""


class InvalidArgument(MoraError, ValueError):
    """A dtype, device, framework or keep-alive that Mora does not take."""


class ConnectFailed(MoraError, ConnectionError):
    """The daemon could not be reached, or one could not be started."""


class DaemonNotRunning(ConnectFailed):
    """No daemon listens at the socket, and ``autostart`` was off."""


class VersionMismatch(ConnectFailed):
    """The daemon speaks another protocol version than this package."""


class ConnectionLost(MoraError, ConnectionError):
    """The daemon went away in the middle of a request."""


class ClientClosed(MoraError, ValueError):
    """A request on a client after ``close()``."""


class ModelNotFound(MoraError, LookupError):
    """The model does not resolve to files on disk (not in the hub cache, no such directory)."""


class DaemonError(MoraError):
    """The daemon refused or failed a request.

    ``kind`` says why: ``"invalid_model"`` (the files are not a loadable
    checkpoint), ``"no_room"`` (the model does not fit in the budget even
    after every possible eviction), ``"refused"`` (leased or pinned),
    ``"bad_request"`` or ``"internal"``.
    """

    def __init__(self, message: str, kind: str = "internal") -> None:
        super().__init__(message)
        self.kind = kind


class MetaTensorsLeft(MoraError, ValueError):
    """A module still has parameters or buffers on the ``meta`` device after
    :func:`mora.load_state_dict`: tensors with a shape and no data, which
    would compute on whatever memory they later land on instead of failing.

    The usual cause is a module built under ``torch.device("meta")``: its
    non-persistent buffers (a CLIP text model's ``position_ids``) are not in
    any state dict, so nothing replaces them. Build it under
    :func:`mora.init_empty_weights` instead. ``names`` lists every tensor
    left, parameters and buffers by their ``state_dict``-style names.
    """

    def __init__(self, message: str, names: Iterable[str] = ()) -> None:
        super().__init__(message)
        self.names = list(names)


class Released(MoraError, RuntimeError):
    """A module whose weights were given back with :func:`mora.release` was
    called: its lent parameters and buffers are on the ``meta`` device now.
    Load the model again to use it."""
