"""The fork server of `python -m mora run`: an interpreter that has imported
the heavy modules once (MORA_PRELOAD) and forks a fresh process per run.

It imports and never computes: no torch op, no CUDA call, so neither torch's
intra-op thread pool nor a CUDA context exists when it forks, and each run
starts them itself as a fresh interpreter would. The server is one thread
(it relays every run's end from one loop over the runs' pidfds), and it
freezes its heap (`gc.freeze`) so the runs share its pages copy-on-write.
Before anything else it has glibc's malloc keep what it frees
(`_keep_freed_memory`), a setting every run inherits.

A run's process is a child of the server, in a process group of its own; it
takes the client's stdin, stdout and stderr (received over SCM_RIGHTS),
environment, working directory and argv, then runs the script as
`__main__`, and ends as `python SCRIPT` would (atexit handlers, threads
joined, streams flushed, a Ctrl-C ends it by SIGINT). The server sends its
exit status or signal to the client. Nothing one run does reaches the next:
each is forked from the server, which never runs a script.

Architecture invariant: the server's own process never runs user code and
never initialises torch's thread pool or CUDA.
"""

from __future__ import annotations

import atexit
import gc
import importlib
import io
import os
import runpy
import selectors
import signal
import socket
import sys
import time
import traceback
from typing import Any, Dict, List, Optional

from . import _run_protocol as proto


def _log(msg: str) -> None:
    sys.stderr.write("%s mora run server %d: %s\n" % (time.strftime("%Y-%m-%dT%H:%M:%S"), os.getpid(), msg))
    sys.stderr.flush()


def _preload() -> None:
    entries, default = proto.preload_entries()
    t = time.monotonic()
    done = []
    for entry in entries:
        name, _, attr = entry.partition(":")
        try:
            mod = importlib.import_module(name)
            if attr:
                getattr(mod, attr)
            done.append(entry)
        except Exception as e:  # an entry that does not import is skipped; the run imports it itself
            if not (default and isinstance(e, ImportError)):
                _log("preload %s failed, skipped: %s: %s" % (entry, type(e).__name__, e))
    _log("preloaded %s in %.1f s" % (", ".join(done) or "nothing", time.monotonic() - t))
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        _log("warning: CUDA was initialised by a preloaded module; forked runs cannot use it")
    threads = len(os.listdir("/proc/self/task")) if os.path.isdir("/proc/self/task") else 1
    if threads > 1:
        _log("note: %d threads after preloading (native libraries' own; they do not survive fork)" % threads)


# glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def _keep_freed_memory() -> Optional[str]:
    """Has glibc's malloc serve blocks up to 1 GiB from its heap and keep
    what is freed, for the server and every run forked from it; what it did,
    for the log. A run is a short-lived process: by default glibc maps each
    block above 32 MiB afresh and unmaps it on free, and hands the heap's
    free top back to the kernel, so every activation of a network is fresh
    pages, faulted in and zeroed (a diffusers image: about 2 s of a 5 s run
    in the kernel). Settings the user gave glibc are kept, as are other C
    libraries' allocators. The same rule as `mora-exec`'s `heap` module."""
    if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", "") or any(
        v in os.environ for v in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
    ):
        return "malloc left as the environment configures it"
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION"):
            return None
    except (ValueError, OSError, AttributeError):  # not glibc: no mallopt
        return None
    import ctypes

    libc = ctypes.CDLL(None)
    if libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30) != 1 or libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) != 1:
        return "mallopt refused the thresholds; malloc left as it was"
    return "malloc keeps freed memory for reuse (blocks up to 1 GiB from the heap, no trimming)"


class _Run:
    def __init__(self, pid: int, pidfd: int, conn: Optional[socket.socket], reader: Optional[proto.Reader]) -> None:
        self.pid = pid
        self.pidfd = pidfd
        self.conn = conn
        self.reader = reader


class _Child:
    """What a forked child runs: the script, with the client's process state."""

    def __init__(self, req: Dict[str, Any], fds: List[int]) -> None:
        self.req = req
        self.fds = fds

    def run(self) -> None:
        req = self.req
        os.setpgid(0, 0)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2):
            signal.signal(s, signal.SIG_DFL)
        for target, fd in enumerate(self.fds):
            if fd != target:
                os.dup2(fd, target)
        for fd in set(self.fds) - {0, 1, 2}:
            os.close(fd)
        os.environ.clear()
        os.environ.update(req["env"])
        _stdio(req["env"])
        argv: List[str] = req["argv"]
        script = argv[0]
        try:
            os.chdir(req["cwd"])
        except OSError as e:
            sys.stderr.write("mora run: cannot enter the caller's directory %s: %s\n" % (req["cwd"], e.strerror))
            sys.exit(1)
        sys.argv = list(argv)
        sys.path[0] = os.path.dirname(os.path.realpath(script))
        np = sys.modules.get("numpy")
        if np is not None:  # a fresh interpreter seeds numpy's global generator from the OS
            np.random.seed()
        _exit(_execute(script))


def _execute(script: str) -> int:
    """Runs the script as `__main__`; its exit status, as the interpreter
    would have made it (-SIGINT: an uncaught KeyboardInterrupt)."""
    try:
        globs = runpy.run_path(script, run_name="__main__")
    except SystemExit as e:
        return _exit_code(e)
    except KeyboardInterrupt as e:
        _print_from_script(e, script)
        return -signal.SIGINT
    except OSError as e:
        if e.filename == script and not os.path.exists(script):
            sys.stderr.write("%s: can't open file %r: [Errno %d] %s\n" % (sys.executable, os.path.abspath(script), e.errno, e.strerror))
            return 2
        _print_from_script(e, script)
        return 1
    except BaseException as e:
        _print_from_script(e, script)
        return 1
    # The script's objects go as at interpreter exit (files flushed, __del__ run).
    globs.clear()
    return 0


def _exit_code(e: SystemExit) -> int:
    if e.code is None:
        return 0
    if isinstance(e.code, int):
        return e.code
    try:
        sys.stderr.write("%s\n" % (e.code,))
    except Exception:
        pass
    return 1


def _exit(code: int) -> None:
    """Ends the run as the interpreter ends: non-daemon threads joined,
    atexit handlers run, cycles collected, streams flushed; then without the
    module teardown of a finalising interpreter (what the server imported is
    not the run's to tear down, and tearing it down costs seconds)."""
    import threading

    try:
        threading._shutdown()  # type: ignore[attr-defined]
    except Exception:
        pass
    try:
        atexit._run_exitfuncs()
    except SystemExit as e:
        code = _exit_code(e)
    gc.collect()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            if code == 0:
                code = 120  # as the interpreter does when it cannot flush stdout
    if code == -signal.SIGINT:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
        code = 128 + signal.SIGINT
    os._exit(code & 0xFF)


def _print_from_script(e: BaseException, script: str) -> None:
    """The traceback `python SCRIPT` prints: from the script's frame on,
    without the runner's (none at all for a script that did not compile)."""
    tb = e.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename != script:
        tb = tb.tb_next
    traceback.print_exception(type(e), e, tb)


def _stdio(env: Dict[str, str]) -> None:
    """New sys.stdin/stdout/stderr over fds 0-2, buffered as the interpreter
    buffers its own: stdout line-buffered on a terminal, stderr always;
    PYTHONUNBUFFERED writes through."""
    unbuffered = bool(env.get("PYTHONUNBUFFERED"))
    streams = []
    for fd, old in ((0, sys.__stdin__), (1, sys.__stdout__), (2, sys.__stderr__)):
        encoding = getattr(old, "encoding", None) or "utf-8"
        errors = getattr(old, "errors", None) or "strict"
        if fd == 0:
            stream = io.TextIOWrapper(io.open(0, "rb", closefd=False), encoding=encoding, errors=errors)
        else:
            raw = io.open(fd, "wb", buffering=0 if unbuffered else -1, closefd=False)
            line = fd == 2 or os.isatty(fd)
            stream = io.TextIOWrapper(raw, encoding=encoding, errors=errors, line_buffering=line, write_through=unbuffered)
        streams.append(stream)
    sys.stdin, sys.stdout, sys.stderr = streams
    sys.__stdin__, sys.__stdout__, sys.__stderr__ = streams


class _Server:
    def __init__(self, path: str) -> None:
        self.path = path
        self.pid = os.getpid()
        self.fingerprint = proto.fingerprint()
        self.sel = selectors.DefaultSelector()
        self.runs: Dict[int, _Run] = {}
        self.listener: Optional[socket.socket] = None
        self.inode = 0
        idle = os.environ.get(proto.IDLE_ENV, "3600")
        self.idle_s = float(idle) if idle else 3600.0

    def listen(self) -> None:
        os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
        tmp = "%s.%d.tmp" % (self.path, self.pid)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(tmp)
        s.listen(64)
        os.rename(tmp, self.path)  # replaces a stale socket at once; the client starting us holds the lock
        self.inode = os.stat(self.path).st_ino
        self.listener = s
        self.sel.register(s, selectors.EVENT_READ, ("listen", None))

    def stop_listening(self) -> None:
        if self.listener is None:
            return
        self.sel.unregister(self.listener)
        self.listener.close()
        self.listener = None
        try:
            if os.stat(self.path).st_ino == self.inode:
                os.unlink(self.path)
        except OSError:
            pass

    def serve(self) -> Optional[_Child]:
        """The server's loop; returns only in a forked child, with its run."""
        last = time.monotonic()
        while self.listener is not None or self.runs:
            timeout = None
            if not self.runs and self.idle_s > 0:
                timeout = max(0.0, last + self.idle_s - time.monotonic())
            events = self.sel.select(timeout)
            if not events and not self.runs and self.idle_s > 0 and time.monotonic() >= last + self.idle_s:
                _log("idle for %.0f s: exiting" % self.idle_s)
                self.stop_listening()
                break
            for key, _ in events:
                kind, run = key.data
                if kind == "listen":
                    child = self.accept()
                    if child is not None:
                        return child
                elif kind == "conn":
                    self.from_client(run)
                else:
                    self.reap(run)
            last = time.monotonic()
        return None

    def accept(self) -> Optional[_Child]:
        assert self.listener is not None
        conn, _ = self.listener.accept()
        reader = proto.Reader(conn)
        try:
            conn.settimeout(30)
            req = reader.read(want_fds=3)
        except (OSError, ValueError) as e:
            _log("a client's request was not read: %s" % e)
            req = None
        if req is None:
            for fd in reader.fds:
                os.close(fd)
            conn.close()
            return None
        if req.get("stop"):
            _log("stopping (asked)")
            self.stop_listening()
            self.reply(conn, {"stopped": True})
            conn.close()
            return None
        if req.get("fingerprint") != self.fingerprint:
            _log("a preloaded package changed on disk: stopping, a new server takes over")
            self.stop_listening()
            for fd in reader.fds:
                os.close(fd)
            self.reply(conn, {"stale": True})
            conn.close()
            return None
        if len(reader.fds) != 3:
            for fd in reader.fds:
                os.close(fd)
            self.reply(conn, {"error": "expected stdin, stdout and stderr, got %d descriptors" % len(reader.fds)})
            conn.close()
            return None
        pid = os.fork()
        if pid == 0:
            self.close_all(keep=reader.fds)
            conn.close()
            return _Child(req, reader.fds)
        for fd in reader.fds:
            os.close(fd)
        run = _Run(pid, os.pidfd_open(pid), conn, reader)
        self.runs[pid] = run
        self.sel.register(run.pidfd, selectors.EVENT_READ, ("child", run))
        conn.setblocking(False)
        self.reply(conn, {"started": pid})
        self.sel.register(conn, selectors.EVENT_READ, ("conn", run))
        self.handle_messages(run)
        return None

    def reply(self, conn: socket.socket, msg: Dict[str, Any]) -> None:
        try:
            conn.setblocking(True)
            conn.settimeout(10)
            proto.send(conn, msg)
        except OSError:
            pass
        finally:
            try:
                conn.setblocking(False)
            except OSError:
                pass

    def handle_messages(self, run: _Run) -> None:
        assert run.reader is not None
        while True:
            msg = run.reader.message()
            if msg is None:
                return
            sig = msg.get("signal")
            if isinstance(sig, int):
                self.signal(run, sig)

    def signal(self, run: _Run, sig: int) -> None:
        try:
            os.killpg(run.pid, sig)
        except ProcessLookupError:  # not yet in its own group, or gone
            try:
                os.kill(run.pid, sig)
            except ProcessLookupError:
                pass

    def from_client(self, run: _Run) -> None:
        assert run.conn is not None and run.reader is not None
        try:
            alive = run.reader.fill()
        except BlockingIOError:
            return
        except OSError:
            alive = False
        if not alive:
            # The client is gone (killed): its run ends, as on a terminal's hangup.
            self.signal(run, signal.SIGHUP)
            self.drop_conn(run)
            return
        self.handle_messages(run)

    def drop_conn(self, run: _Run) -> None:
        if run.conn is not None:
            self.sel.unregister(run.conn)
            run.conn.close()
            run.conn = None
            run.reader = None

    def reap(self, run: _Run) -> None:
        _, status = os.waitpid(run.pid, 0)
        self.sel.unregister(run.pidfd)
        os.close(run.pidfd)
        del self.runs[run.pid]
        if run.conn is not None:
            if os.WIFSIGNALED(status):
                msg = {"signal": os.WTERMSIG(status)}
            else:
                msg = {"exit": os.waitstatus_to_exitcode(status)}
            self.reply(run.conn, msg)
            self.drop_conn(run)

    def close_all(self, keep: List[int]) -> None:
        """In a forked child: every descriptor of the server's but `keep`."""
        for key in list(self.sel.get_map().values()):
            if key.fd not in keep:
                try:
                    os.close(key.fd)
                except OSError:
                    pass
        if self.listener is not None:
            self.listener.detach()
        for run in self.runs.values():
            if run.conn is not None:
                run.conn.detach()
        try:
            self.sel.close()
        except OSError:
            pass


def main(path: str) -> None:
    """`python -c` entry of the server (the client starts it)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    server = _Server(path)
    kept = _keep_freed_memory()
    if kept:
        _log(kept)
    _preload()
    gc.collect()
    gc.freeze()
    server.listen()
    _log("listening at %s (%s)" % (path, sys.executable))
    child = None
    try:
        child = server.serve()
    finally:
        if os.getpid() == server.pid:
            server.stop_listening()
    if child is not None:
        del server
        child.run()
