"""The client side of `python -m mora run`: finds (or starts) the fork server
for this interpreter, hands it the script, argv, environment, working
directory and its own stdin, stdout and stderr, forwards the signals it
receives, and ends as the run ended: the same exit status, or killed by the
same signal."""

from __future__ import annotations

import fcntl
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Any, Dict, List, NoReturn, Optional

from . import _run_protocol as proto

# Signals a terminal or a supervisor sends to the process it started: passed
# to the run's process group.
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)

START_TIMEOUT_S = 600.0


class RunError(Exception):
    """Why a run could not be handed to a server (printed on one line)."""


def _connect(path: str) -> Optional[socket.socket]:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
    except (FileNotFoundError, ConnectionRefusedError):
        s.close()
        return None
    return s


def _log_tail(log: str) -> str:
    try:
        with open(log, "rb") as f:
            lines = f.read().decode("utf-8", "replace").strip().splitlines()
    except OSError:
        return "(no log)"
    return " | ".join(lines[-3:])


def _start(path: str) -> socket.socket:
    """Starts a server at `path` (the caller holds the start lock) and waits
    until it answers."""
    log = path[: -len(".sock")] + ".log"
    entries, _ = proto.preload_entries()
    tops = sorted({e.split(":")[0] for e in entries})
    sys.stderr.write("mora: starting a run server for %s, preloading %s (log: %s)\n" % (sys.executable, ", ".join(tops) or "nothing", log))
    sys.stderr.flush()
    parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = "import sys; sys.path[0] = %r; from mora._run_server import main; main(sys.argv[1])" % parent
    with open(log, "ab") as err:
        proc = subprocess.Popen(
            [sys.executable, "-c", code, path],
            cwd="/",
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
            start_new_session=True,
        )
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        s = _connect(path)
        if s is not None:
            proc.returncode = 0  # it runs on alone; no wait, no warning
            return s
        if proc.poll() is not None:
            raise RunError("the run server exited with %s while starting: %s" % (proc.returncode, _log_tail(log)))
        if time.monotonic() > deadline:
            proc.kill()
            raise RunError("the run server did not answer within %.0f s: %s" % (START_TIMEOUT_S, _log_tail(log)))
        time.sleep(0.02)


class _StartLock:
    def __init__(self, path: str) -> None:
        self.path = path + ".lock"

    def __enter__(self) -> "_StartLock":
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc: Any) -> None:
        os.close(self.fd)


def _server(path: str, replace: bool) -> socket.socket:
    if not replace:
        s = _connect(path)
        if s is not None:
            return s
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    with _StartLock(path):
        s = _connect(path)  # another client may have started it meanwhile
        if s is not None:
            return s
        return _start(path)


def _stdio_fds() -> List[int]:
    """0, 1, 2, with /dev/null for any the caller closed (as Python does)."""
    fds = []
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
            fds.append(fd)
        except OSError:
            fds.append(os.open(os.devnull, os.O_RDWR))
    return fds


def _die_as(sig: int) -> NoReturn:
    """End killed by `sig`, as the run did; 128+N if it does not kill."""
    signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [sig])
    os.kill(os.getpid(), sig)
    os._exit(128 + sig)


def run(argv: List[str]) -> NoReturn:
    """Runs `argv` (SCRIPT ARGS...) in a process forked from the warm server."""
    script = argv[0]
    if not os.path.exists(script):
        sys.stderr.write("%s: can't open file %r: [Errno 2] No such file or directory\n" % (sys.executable, os.path.abspath(script)))
        sys.exit(2)
    path = proto.socket_path()
    request: Dict[str, Any] = {
        "argv": list(argv),
        "env": dict(os.environ),
        "cwd": os.getcwd(),
        "fingerprint": proto.fingerprint(),
    }
    fds = _stdio_fds()
    current: List[socket.socket] = []

    def forward(sig: int, _frame: Any) -> None:
        if not current:  # no run yet: end as the script would have, before it began
            _die_as(sig)
        try:
            proto.send(current[0], {"signal": sig})
        except OSError:
            pass

    for sig in FORWARDED:
        signal.signal(sig, forward)
    replace = False
    for _ in range(3):
        conn = _server(path, replace)
        reader = proto.Reader(conn)
        current[:] = [conn]
        proto.send(conn, request, fds)
        reply = reader.read()
        if reply is None:
            raise RunError("the run server at %s closed the connection (its log: %s)" % (path, path[: -len(".sock")] + ".log"))
        if reply.get("stale"):
            current.clear()
            conn.close()
            replace = True  # it stopped listening; start the new one
            continue
        if "error" in reply:
            raise RunError("the run server refused the run: %s" % reply["error"])
        break
    else:
        raise RunError("the run server at %s kept answering that it is stale" % path)
    end = reader.read()
    if end is None:
        raise RunError("the run server ended before the run did (its log: %s)" % (path[: -len(".sock")] + ".log"))
    if "signal" in end:
        _die_as(int(end["signal"]))
    os._exit(int(end.get("exit", 1)))


def stop() -> int:
    """Stops this interpreter's server (its runs finish first); 0 whether
    one was running or not."""
    path = proto.socket_path()
    s = _connect(path)
    if s is None:
        return 0
    proto.send(s, {"stop": True})
    proto.Reader(s).read()
    s.close()
    return 0
