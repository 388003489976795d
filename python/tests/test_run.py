"""`python -m mora run SCRIPT`: a script run in a process forked from a warm
interpreter behaves as `python SCRIPT` would, and each run is its own
process. The server preloads a small fake package (MORA_PRELOAD) so these
run without torch; the torch test runs where torch is installed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

STARTING = "mora: starting a run server"


class Runner:
    def __init__(self, tmp: Path, preload: str) -> None:
        self.tmp = tmp
        self.pkg = tmp / "lib" / "fakepre"
        self.pkg.mkdir(parents=True)
        self.write_fake("1")
        self.env = dict(os.environ)
        self.env.update(
            {
                "MORA_SOCKET": str(tmp / "rt" / "cache.sock"),
                "MORA_PRELOAD": preload,
                "MORA_RUN_IDLE": "120",
                "PYTHONPATH": str(tmp / "lib"),
            }
        )

    def write_fake(self, version: str) -> None:
        init = self.pkg / "__init__.py"
        init.write_text("VERSION = %r\nstate = []\n" % version)
        st = init.stat()
        os.utime(init, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # a distinct mtime, however fast

    def script(self, name: str, body: str) -> Path:
        p = self.tmp / name
        p.write_text(textwrap.dedent(body))
        return p

    def cmd(self, *args: str) -> list:
        return [sys.executable, "-m", "mora", "run", *args]

    def run(self, *args: str, **kw) -> subprocess.CompletedProcess:
        kw.setdefault("env", self.env)
        kw.setdefault("capture_output", True)
        kw.setdefault("timeout", 120)
        return subprocess.run(self.cmd(*args), **kw)

    def stop(self) -> None:
        subprocess.run([sys.executable, "-m", "mora", "run", "--stop"], env=self.env, capture_output=True, timeout=60)


@pytest.fixture
def runner(tmp_path):
    r = Runner(tmp_path, "fakepre")
    yield r
    r.stop()


REPORT = """
    import json, os, sys, fakepre
    fakepre.state.append(1)
    print(json.dumps({"server": os.getppid(), "pid": os.getpid(), "version": fakepre.VERSION, "state": len(fakepre.state)}))
"""


def report(cp: subprocess.CompletedProcess) -> dict:
    assert cp.returncode == 0, cp.stderr
    return json.loads(cp.stdout.decode().strip().splitlines()[-1])


def test_script_gets_the_callers_argv_env_cwd_stdin_stdout_and_stderr(runner, tmp_path):
    s = runner.script(
        "echo.py",
        """
        import json, os, sys
        data = sys.stdin.read()
        print(json.dumps({"argv": sys.argv, "x": os.environ.get("MORA_TEST_X"), "cwd": os.getcwd(),
                          "stdin": data, "name": __name__, "path0": sys.path[0]}))
        print("to stderr", file=sys.stderr)
        """,
    )
    work = tmp_path / "work"
    work.mkdir()
    env = dict(runner.env, MORA_TEST_X="x value")
    cp = runner.run(str(s), "a", "b c", input=b"from stdin\n", cwd=str(work), env=env)
    assert cp.returncode == 0, cp.stderr
    out = json.loads(cp.stdout.decode().splitlines()[-1])
    assert out == {
        "argv": [str(s), "a", "b c"],
        "x": "x value",
        "cwd": str(work),
        "stdin": "from stdin\n",
        "name": "__main__",
        "path0": str(tmp_path),
    }
    assert cp.stderr.decode().endswith("to stderr\n")
    # A later run sees its own environment, not the first run's.
    cp = runner.run(str(s), input=b"", cwd=str(work))
    assert json.loads(cp.stdout.decode().splitlines()[-1])["x"] is None


def test_exit_status_comes_back(runner):
    assert runner.run(str(runner.script("seven.py", "import sys; sys.exit(7)"))).returncode == 7
    cp = runner.run(str(runner.script("msg.py", "import sys; sys.exit('bad input')")))
    assert (cp.returncode, cp.stderr.decode().splitlines()[-1]) == (1, "bad input")
    cp = runner.run(str(runner.script("raises.py", "def f():\n    raise ValueError('boom')\nf()\n")))
    err = cp.stderr.decode()
    assert cp.returncode == 1 and err.splitlines()[-1] == "ValueError: boom", err
    assert "_run_server" not in err and "runpy" not in err, err
    assert 'raises.py", line 3' in err, err


def test_unflushed_output_and_atexit_handlers_are_written(runner, tmp_path):
    out = tmp_path / "left-open.txt"
    s = runner.script(
        "tail.py",
        """
        import atexit, sys
        atexit.register(lambda: print("atexit ran"))
        f = open(sys.argv[1], "w")
        f.write("never closed")
        sys.stdout.write("no newline")
        """,
    )
    cp = runner.run(str(s), str(out))
    assert cp.returncode == 0, cp.stderr
    assert cp.stdout.decode() == "no newlineatexit ran\n"
    assert out.read_text() == "never closed"


def test_a_signal_death_comes_back_as_the_same_signal(runner):
    cp = runner.run(str(runner.script("term.py", "import os, signal; os.kill(os.getpid(), signal.SIGTERM)")))
    assert cp.returncode == -signal.SIGTERM


def test_signals_to_the_client_reach_the_script(runner):
    s = runner.script(
        "wait.py",
        """
        import sys, time
        print("ready", flush=True)
        time.sleep(60)
        """,
    )
    p = subprocess.Popen(runner.cmd(str(s)), env=runner.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert p.stdout.readline() == b"ready\n"
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=30)
    # Python's own ending of an uncaught Ctrl-C: the traceback, then death by SIGINT.
    assert p.returncode == -signal.SIGINT, err
    assert err.decode().splitlines()[-1] == "KeyboardInterrupt", err


def test_a_crash_in_one_run_does_not_reach_the_next(runner):
    first = report(runner.run(str(runner.script("report.py", REPORT))))
    dirty = runner.script(
        "dirty.py",
        """
        import ctypes, fakepre, sys
        fakepre.state.extend(range(100))     # left behind in this run's memory only
        if sys.argv[1] == "exit":
            import os; os._exit(3)
        ctypes.string_at(0)                  # a segmentation fault
        """,
    )
    assert runner.run(str(dirty), "exit").returncode == 3
    assert runner.run(str(dirty), "segv").returncode == -signal.SIGSEGV
    second = report(runner.run(str(runner.script("report.py", REPORT))))
    assert second["state"] == 1 and second["server"] == first["server"], (first, second)
    assert second["pid"] != first["pid"]


def test_the_server_starts_on_first_use_is_reused_and_is_replaced_when_a_preloaded_package_changes(runner):
    s = runner.script("report.py", REPORT)
    cp = runner.run(str(s))
    assert STARTING in cp.stderr.decode(), cp.stderr
    first = report(cp)
    cp = runner.run(str(s))
    assert STARTING not in cp.stderr.decode(), cp.stderr
    again = report(cp)
    assert again["server"] == first["server"] and again["version"] == "1"

    runner.write_fake("2")
    cp = runner.run(str(s))
    assert STARTING in cp.stderr.decode(), cp.stderr
    replaced = report(cp)
    assert replaced["server"] != first["server"] and replaced["version"] == "2"
    # The replaced server stops once it has said so.
    deadline = time.monotonic() + 30
    while os.path.exists("/proc/%d" % first["server"]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not os.path.exists("/proc/%d" % first["server"]) or "Z" in open("/proc/%d/stat" % first["server"]).read().split()[2]


def test_a_dead_servers_socket_is_replaced(runner):
    s = runner.script("report.py", REPORT)
    first = report(runner.run(str(s)))
    os.kill(first["server"], signal.SIGKILL)  # leaves its socket behind
    time.sleep(0.2)
    cp = runner.run(str(s))
    assert STARTING in cp.stderr.decode(), cp.stderr
    assert report(cp)["server"] != first["server"]


def test_a_missing_script_is_one_line_and_exit_2(runner, tmp_path):
    cp = runner.run(str(tmp_path / "nope.py"))
    err = cp.stderr.decode()
    assert cp.returncode == 2 and err.count("\n") == 1 and "can't open file" in err and "nope.py" in err, err
    cp = runner.run("--help")
    assert cp.returncode == 0 and b"MORA_PRELOAD" in cp.stdout
    assert runner.run().returncode == 2


def test_torch_threads_and_cuda_start_in_the_run_not_the_server(tmp_path):
    pytest.importorskip("torch")
    r = Runner(tmp_path, "torch")
    try:
        s = r.script(
            "threads.py",
            """
            import json, os, torch
            import numpy as np
            before = len(os.listdir("/proc/self/task"))
            cuda = torch.cuda.is_initialized()
            a = torch.randn(512, 512, generator=torch.Generator().manual_seed(0))
            ok = np.allclose((a @ a).numpy(), a.numpy().astype(np.float64) @ a.numpy().astype(np.float64), atol=1e-3)
            print(json.dumps({"threads_at_start": before, "cuda": cuda, "torch_threads": torch.get_num_threads(),
                              "cpus": len(os.sched_getaffinity(0)), "ok": bool(ok)}))
            """,
        )
        cp = r.run(str(s))
        assert cp.returncode == 0, cp.stderr
        out = json.loads(cp.stdout.decode().splitlines()[-1])
        # One thread at fork (no pool came along), CUDA untouched, every CPU used.
        assert out["threads_at_start"] == 1 and out["cuda"] is False, out
        assert out["torch_threads"] == out["cpus"] and out["ok"], out
    finally:
        r.stop()


FAULTS = """
    import json, resource

    def faults_of_blocks(n, size):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for i in range(n):
            b = bytearray(size)
            b[::4096] = b"x" * len(range(0, size, 4096))  # every page written
            del b
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    faults_of_blocks(1, 48 << 20)  # the heap grows once
    print(json.dumps({"faults": faults_of_blocks(4, 48 << 20), "pages": (48 << 20) // 4096}))
"""


def test_a_run_reuses_the_memory_it_frees_unless_the_user_configured_malloc(runner, tmp_path):
    # glibc maps a 48 MiB block afresh on each allocation by default: every
    # page faulted in again. The server has malloc keep freed memory, and the
    # runs inherit it.
    s = runner.script("faults.py", FAULTS)
    out = report(runner.run(str(s)))
    assert out["faults"] < out["pages"] // 4, out
    log = (tmp_path / "rt").glob("run-*.log")
    assert any("malloc keeps freed memory" in p.read_text() for p in log)
    # A malloc setting of the user's is theirs (and makes a server of its own).
    env = dict(runner.env, MALLOC_TRIM_THRESHOLD_="131072")
    out = report(runner.run(str(s), env=env))
    assert out["faults"] >= 3 * out["pages"], out
