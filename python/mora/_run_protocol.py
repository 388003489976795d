"""What `python -m mora run`'s client and its fork server share: where the
server listens, what it preloads, how a client tells whether the server's
imports are still those on disk, and the messages between them.

The conversation, over a Unix stream socket, each message a 4-byte
big-endian length and a JSON object:

    client: {"argv", "env", "cwd", "fingerprint"}      + stdin, stdout, stderr over SCM_RIGHTS
    server: {"started": PID} | {"stale": true} | {"error": "..."}
    client: {"signal": N}  (any number: a signal the client received, for the child)
    server: {"exit": CODE} | {"signal": N}              (how the child ended; the last message)

or, instead of a run, {"stop": true} (`python -m mora run --stop`): the
server stops listening, and exits once its runs have ended.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import socket
import struct
import sys
from typing import Any, Dict, List, Optional, Tuple

PRELOAD_ENV = "MORA_PRELOAD"
IDLE_ENV = "MORA_RUN_IDLE"

# What the server imports when MORA_PRELOAD is unset; entries not installed
# are skipped. diffusers and transformers import their classes lazily, on
# first attribute access: `module:attr` entries touch the common ones so the
# run does not pay for them.
DEFAULT_PRELOAD = (
    "torch",
    "transformers",
    "diffusers",
    "transformers:PreTrainedModel",
    "transformers:AutoModel",
    "transformers:AutoTokenizer",
    "transformers:CLIPTextModel",
    "transformers:CLIPTokenizer",
    "diffusers:DiffusionPipeline",
    "diffusers:StableDiffusionPipeline",
    "diffusers:UNet2DConditionModel",
    "diffusers:AutoencoderKL",
    "mora.diffusers",
    "mora.transformers",
)

# Variables read when a module is imported (huggingface_hub's constants,
# torch's and the BLAS libraries' settings at load, Python's own) or when
# the server starts (glibc's malloc settings): a server
# is made for one set of their values, since a forked run inherits what its
# imports read.
IMPORT_TIME_ENV_PREFIXES = (
    "PYTHON",
    "MORA_PRELOAD",
    "HF_",
    "HUGGINGFACE_",
    "TRANSFORMERS_",
    "DIFFUSERS_",
    "TORCH",
    "PYTORCH_",
    "CUDA_",
    "OMP_",
    "MKL_",
    "OPENBLAS_",
    "LD_",
    "GLIBC_TUNABLES",
    "MALLOC_",
    "TOKENIZERS_",
    "XDG_CACHE_HOME",
)


def preload_entries() -> Tuple[List[str], bool]:
    """The entries to import and whether they are the default list (whose
    missing modules are skipped without a word)."""
    raw = os.environ.get(PRELOAD_ENV)
    if raw is None:
        return list(DEFAULT_PRELOAD), True
    return [e.strip() for e in raw.split(",") if e.strip()], False


def runtime_dir() -> str:
    """The directory of the daemon's socket (`$MORA_SOCKET`, else
    `$XDG_RUNTIME_DIR/mora/cache.sock`, else `/tmp/mora-$UID/cache.sock`):
    the run servers' sockets live beside it."""
    explicit = os.environ.get("MORA_SOCKET")
    if explicit:
        return os.path.dirname(os.path.abspath(explicit))
    run = os.environ.get("XDG_RUNTIME_DIR")
    if run:
        return os.path.join(run, "mora")
    return "/tmp/mora-%d" % os.getuid()


def server_key() -> str:
    """One server per interpreter, preload list and import-time environment."""
    h = hashlib.sha256()
    h.update(os.fsencode(sys.executable) + b"\0")
    h.update(sys.version.encode() + b"\0")
    for k in sorted(os.environ):
        if k.startswith(IMPORT_TIME_ENV_PREFIXES):
            h.update(os.fsencode(k) + b"=" + os.fsencode(os.environ[k]) + b"\0")
    return h.hexdigest()[:16]


def socket_path() -> str:
    return os.path.join(runtime_dir(), "run-%s.sock" % server_key())


def _stat(path: str) -> str:
    try:
        st = os.stat(path)
    except OSError:
        return "%s:absent" % path
    return "%s:%d:%d:%d" % (path, st.st_ino, st.st_size, st.st_mtime_ns)


def fingerprint() -> str:
    """What the preloaded packages and this package are on disk, cheaply
    (no import): for each top-level package, its module file, its
    directory's and its site directory's entries (a pip install or
    uninstall renames there); for `mora`, every file. The server's and the
    client's must match, else the server is replaced."""
    entries, _ = preload_entries()
    tops = sorted({e.split(":")[0].split(".")[0] for e in entries} | {"mora"})
    parts = [_stat(sys.executable)]
    for top in tops:
        try:
            spec = importlib.util.find_spec(top)
        except (ImportError, ValueError):
            spec = None
        if spec is None or not spec.origin:
            parts.append("%s:none" % top)
            continue
        parts.append(_stat(spec.origin))
        for d in spec.submodule_search_locations or []:
            parts.append(_stat(d))
            parts.append(_stat(os.path.dirname(d)))
            if top == "mora":
                for name in sorted(os.listdir(d)):
                    parts.append(_stat(os.path.join(d, name)))
    return hashlib.sha256("\n".join(parts).encode("utf-8", "surrogateescape")).hexdigest()


def send(sock: socket.socket, msg: Dict[str, Any], fds: Optional[List[int]] = None) -> None:
    data = json.dumps(msg).encode()
    frame = struct.pack(">I", len(data)) + data
    if fds:
        sent = socket.send_fds(sock, [frame], fds)
        frame = frame[sent:]
    if frame:
        sock.sendall(frame)


class Reader:
    """Reads frames off a stream socket, and the descriptors that came with them."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""
        self.fds: List[int] = []

    def fill(self, want_fds: int = 0) -> bool:
        """One receive; False at end of stream."""
        if want_fds:
            data, fds, _, _ = socket.recv_fds(self.sock, 65536, want_fds)
            self.fds.extend(fds)
        else:
            data = self.sock.recv(65536)
        self.buf += data
        return bool(data)

    def message(self) -> Optional[Dict[str, Any]]:
        """A whole message if the buffer holds one."""
        if len(self.buf) < 4:
            return None
        (n,) = struct.unpack(">I", self.buf[:4])
        if len(self.buf) < 4 + n:
            return None
        msg = json.loads(self.buf[4 : 4 + n])
        self.buf = self.buf[4 + n :]
        return msg

    def read(self, want_fds: int = 0) -> Optional[Dict[str, Any]]:
        """Blocks for the next message; None at end of stream."""
        while True:
            msg = self.message()
            if msg is not None:
                return msg
            if not self.fill(want_fds):
                return None
