"""Fixtures of the Python package's tests: a daemon of its own per test
module (socket in a temporary directory), the test model, and the paths of
the binaries. tests/python.rs runs these with `target/debug` on PATH and
HF_HUB_CACHE set to the test model's hub cache (scripts/fetch-test-model.sh)."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

MODEL = "sentence-transformers/all-MiniLM-L6-v2"


def mora_cache() -> str:
    path = shutil.which("mora-cache")
    if path is None:
        raise RuntimeError("mora-cache is not on PATH: build it (cargo build --workspace --bins) and put target/debug on PATH")
    return path


@pytest.fixture(scope="session")
def model_file() -> Path:
    """The test model's weights: fails loudly when it was not fetched."""
    hub = os.environ.get("HF_HUB_CACHE")
    if not hub:
        raise RuntimeError("HF_HUB_CACHE is not set: run scripts/fetch-test-model.sh and use its output")
    snaps = Path(hub) / "models--sentence-transformers--all-MiniLM-L6-v2" / "snapshots"
    files = sorted(snaps.glob("*/model.safetensors"))
    if not files:
        raise RuntimeError(f"the test model is not in {hub}: run scripts/fetch-test-model.sh")
    return files[0]


class Daemon:
    def __init__(self, socket: Path, proc: subprocess.Popen) -> None:
        self.socket = socket
        self.proc = proc

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        """`mora-cache ARGS --socket SOCKET`, as a user runs it."""
        return subprocess.run([mora_cache(), *args, "--socket", str(self.socket)], capture_output=True, text=True)


def start_daemon(socket: Path, *extra: str) -> Daemon:
    socket.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [mora_cache(), "serve", "--socket", str(socket), *extra],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=open(str(socket) + ".log", "ab"),
    )
    deadline = time.monotonic() + 30
    while not socket.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"mora-cache serve did not start: {Path(str(socket) + '.log').read_text()}")
        time.sleep(0.02)
    return Daemon(socket, proc)


def stop_daemon(d: Daemon) -> None:
    d.proc.terminate()
    try:
        d.proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        d.proc.kill()
        d.proc.wait()


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, model_file):
    d = start_daemon(tmp_path_factory.mktemp("mora") / "cache.sock", "--max-memory", "1GiB")
    yield d
    stop_daemon(d)
