"""The package without torch: numpy state dicts, safe_open, leases, the admin
calls, and every error a user can meet, each with the CLI's message."""

from __future__ import annotations

import gc
import os
import socket as socketlib
import struct
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

import mora
from conftest import MODEL, mora_cache, start_daemon, stop_daemon


def test_numpy_state_dict_is_the_checkpoint_viewed_in_place(daemon, model_file):
    ref = load_file(str(model_file))
    with mora.connect(daemon.socket) as client:
        sd = client.state_dict(MODEL, framework="numpy")
        assert isinstance(sd, dict) and set(sd) == set(ref)
        for name, want in ref.items():
            got = sd[name]
            assert isinstance(got, np.ndarray)
            assert got.dtype == want.dtype and got.shape == want.shape, name
            assert np.array_equal(got, want), name
            assert not got.flags.writeable and not got.flags.owndata, name
        assert sd.name == MODEL and sd.dtype == "f32" and sd.device == "cpu"
        assert Path(sd.dir) == model_file.parent
        assert sd.nbytes >= sum(a.nbytes for a in ref.values())
        # Every array views one mapping of the daemon's segment, in place.
        spans = [(a.__array_interface__["data"][0], a.nbytes) for a in sd.values()]
        start = min(p for p, _ in spans)
        assert max(p + n for p, n in spans) - start <= sd.nbytes
        assert all((p - start) % 64 == 0 for p, _ in spans)


def test_a_lora_file_is_a_cache_entry_of_its_own(daemon):
    """A LoRA adapter's one `.safetensors` file is a model of that file: its
    tensors come from the daemon as any model's (the entry `mora-exec` steps'
    `loras` use), held once, in `ps`, evictable."""
    lora = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "lora" / "sd15-kohya" / "lora.safetensors"
    ref = load_file(str(lora))
    with mora.connect(daemon.socket) as client:
        sd = client.state_dict(str(lora), dtype="f16", framework="numpy")
        assert set(sd) == set(ref)
        for name, want in ref.items():
            assert sd[name].shape == want.shape and np.array_equal(sd[name], want.astype(np.float16)), name
        assert str(lora) in {m["name"] for m in client.ps()}
        del sd
        gc.collect()
        assert client.evict(str(lora), dtype="f16").models


def test_f16_is_the_checkpoint_rounded_as_numpy_rounds_it(daemon, model_file):
    ref = load_file(str(model_file))
    with mora.connect(daemon.socket) as client:
        for dtype in ("f16", "float16", np.float16, np.dtype("float16")):
            sd = client.state_dict(MODEL, dtype=dtype, framework="np")
            assert sd.dtype == "f16"
            for name, want in ref.items():
                expect = want.astype(np.float16) if want.dtype == np.float32 else want
                assert sd[name].dtype == expect.dtype and np.array_equal(sd[name], expect), name


def test_a_write_raises_and_a_forced_one_stays_in_this_process(daemon, model_file):
    name = "embeddings.word_embeddings.weight"
    want = load_file(str(model_file))[name]
    with mora.connect(daemon.socket) as client:
        a = client.state_dict(MODEL, framework="numpy")[name]
        with pytest.raises(ValueError, match="read-only"):
            a[0, 0] = 1.0
        # The mapping is copy-on-write: forcing the flag back writes this
        # process's private page, never the daemon's segment.
        a.flags.writeable = True
        a[0, :] = 7.0
        fresh = client.state_dict(MODEL, framework="numpy")[name]
        assert np.array_equal(fresh, want)
    other = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(f"""
            import mora, numpy as np
            with mora.connect({str(daemon.socket)!r}, autostart=False) as c:
                print(float(c.state_dict({MODEL!r}, framework="numpy")[{name!r}][0, 0]))
        """)],
        capture_output=True, text=True, check=True,
    )
    assert float(other.stdout) == float(want[0, 0])


def leases(client, dtype="f32"):
    return sum(m["leases"] for m in client.ps() if m["dtype"] == dtype)


def test_the_lease_lasts_while_any_array_lives_and_not_longer(daemon, model_file):
    client = mora.connect(daemon.socket)
    sd = client.state_dict(MODEL, framework="numpy")
    [entry] = [m for m in client.ps() if m["dtype"] == "f32"]
    assert entry["leases"] == 1 and entry["lease_pids"] == [os.getpid()]
    assert entry["name"] == MODEL and entry["state"] == "resident" and entry["bytes"] == sd.nbytes
    # Evicting a leased model is refused, with the CLI's message.
    with pytest.raises(mora.DaemonError) as refused:
        client.evict(MODEL)
    assert refused.value.kind == "refused"
    cli = daemon.cli("evict", MODEL)
    assert cli.returncode != 0 and str(refused.value) in cli.stderr
    client.close()
    assert client.closed
    with pytest.raises(mora.ClientClosed, match="closed"):
        client.ps()
    # Closing the client does not end a lease whose arrays live: one array
    # (a slice of one, even) keeps the model leased and counted in the budget.
    name = "embeddings.word_embeddings.weight"
    kept = sd[name][1:]
    del sd
    gc.collect()
    with mora.connect(daemon.socket) as c2:
        assert leases(c2) == 1 and c2.status()["used"] >= entry["bytes"]
        with pytest.raises(mora.DaemonError, match=f"leased by pid {os.getpid()}"):
            c2.evict(MODEL, dtype="f32")
        assert np.array_equal(kept, load_file(str(model_file))[name][1:])
        # The last array goes: the lease ends then (no gc needed without a cycle).
        del kept
        assert leases(c2) == 0
        evicted = c2.evict(MODEL, dtype="f32")
        assert evicted.models == [MODEL] and evicted.bytes == entry["bytes"]


def test_an_array_in_a_reference_cycle_holds_the_lease_until_gc_runs(daemon):
    class Holder:
        pass

    with mora.connect(daemon.socket) as client:
        h = Holder()
        h.array, h.me = client.state_dict(MODEL, framework="numpy")["pooler.dense.weight"], h
    gc.disable()
    try:
        del h
        with mora.connect(daemon.socket) as c2:
            assert leases(c2) == 1
            gc.collect()
            assert leases(c2) == 0
            assert c2.evict(MODEL, dtype="f32").models == [MODEL]
    finally:
        gc.enable()


def test_release_ends_the_lease_at_once(daemon):
    with mora.connect(daemon.socket) as client:
        sd = client.state_dict(MODEL, framework="numpy")
        assert leases(client) == 1
        assert mora.release(sd) is True
        assert len(sd) == 0 and leases(client) == 0
        assert client.evict(MODEL, dtype="f32").models == [MODEL]
        assert mora.release(sd) is True  # again: nothing left to end


def test_release_keeps_the_lease_of_an_array_kept_elsewhere_and_says_so(daemon, model_file):
    name = "pooler.dense.weight"
    with mora.connect(daemon.socket) as client:
        sd = client.state_dict(MODEL, framework="numpy")
        kept = sd[name]
        with pytest.warns(UserWarning, match=rf"^mora.release: arrays or tensors of {MODEL} \(f32, cpu\) are still alive"):
            assert mora.release(sd) is False
        # Still mapped, still leased, still counted: the array reads the model.
        assert len(sd) == 0 and leases(client) == 1
        assert np.array_equal(kept, load_file(str(model_file))[name])
        with pytest.raises(mora.DaemonError, match="leased by pid"):
            client.evict(MODEL, dtype="f32")
        del kept
        assert leases(client) == 0
    with pytest.raises(mora.InvalidArgument, match=r"^mora.release takes what mora lent .* not a numpy.ndarray"):
        mora.release(np.zeros(3))


def test_the_with_form_closes_the_connection_once_the_arrays_are_gone(daemon):
    with mora.connect(daemon.socket) as client:
        sd = client.state_dict(MODEL, framework="numpy")
    conn = client._session.conn
    assert client.closed and not conn.closed  # the connection holds the lease of sd
    with mora.connect(daemon.socket) as c2:
        assert leases(c2) == 1
        del sd
        assert conn.closed and leases(c2) == 0
        with mora.connect(daemon.socket) as c3:
            c3.state_dict(MODEL, framework="numpy")  # dropped at once: nothing keeps its lease
            assert leases(c2) == 0
        assert c3._session.conn.closed


def test_a_process_that_exits_holding_arrays_gives_its_leases_back_quietly(daemon):
    code = f"""
import mora
client = mora.connect({str(daemon.socket)!r}, autostart=False)
sd = client.state_dict({MODEL!r}, framework="numpy")
model = {{"weight": sd["pooler.dense.weight"], "me": None}}
model["me"] = model  # a cycle, as models have: the process ends before any collection
print(sum(m["leases"] for m in client.ps()))
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert run.stdout.split() == ["1"] and run.stderr == ""
    with mora.connect(daemon.socket) as client:
        # The daemon ends the leases of a connection it sees close.
        deadline = time.monotonic() + 10
        while leases(client) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert leases(client) == 0


def test_two_processes_share_one_copy(daemon):
    with mora.connect(daemon.socket) as client:
        sd = client.state_dict(MODEL, framework="numpy")  # noqa: F841 (its lease lasts while it lives)
        before = [m for m in client.ps() if m["dtype"] == "f32"][0]
        code = f"""
import mora
with mora.connect({str(daemon.socket)!r}, autostart=False) as c:
    sd = c.state_dict({MODEL!r}, framework="numpy")
    print(sd.loaded_now, [m["leases"] for m in c.ps() if m["dtype"] == "f32"][0])
"""
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
        assert out == ["False", "2"]
        after = [m for m in client.ps() if m["dtype"] == "f32"][0]
        assert after["loads"] == before["loads"] and after["hits"] == before["hits"] + 1


def test_safe_open_drops_into_a_safetensors_loader(daemon, model_file):
    from safetensors import safe_open as st_open

    with st_open(str(model_file), framework="numpy") as want:
        with mora.safe_open(MODEL, framework="numpy", socket=daemon.socket, autostart=False) as got:
            assert got.keys() == sorted(want.keys())
            for name in want.keys():
                assert np.array_equal(got.get_tensor(name), want.get_tensor(name))
                s, w = got.get_slice(name), want.get_slice(name)
                assert s.get_shape() == w.get_shape() and s.get_dtype() == w.get_dtype()
                assert np.array_equal(s[:1], w[:1])
            assert got.metadata() is None
            with pytest.raises(KeyError, match="no tensor `nope`"):
                got.get_tensor("nope")
    # As safetensors' tensors, those taken outlive the handle (and hold the lease).
    with pytest.raises(mora.ClientClosed, match="safe_open is closed"):
        got.get_tensor("pooler.dense.weight")
    with mora.connect(daemon.socket) as client:
        assert leases(client) == 1
        del s
        assert leases(client) == 0
        with client.safe_open(MODEL, framework="numpy") as f:
            assert "pooler.dense.weight" in f


def test_a_model_directory_and_the_admin_calls(daemon, model_file):
    d = str(model_file.parent)
    with mora.connect(daemon.socket) as client:
        loaded = client.load(d, dtype="f16", pin=True, keep_alive="10m")
        assert loaded["pinned"] and loaded["dtype"] == "f16" and loaded["keep_alive"] == "10m"
        # A directory and the repo it is a snapshot of are the same bytes: one entry, two names.
        sd = client.state_dict(MODEL, dtype="f16", framework="numpy")
        [entry] = [m for m in client.ps() if m["dtype"] == "f16"]
        assert sorted(entry["names"]) == sorted([d, MODEL])
        assert entry["bytes"] == sd.nbytes
        assert client.unpin(d) and not [m for m in client.ps() if m["dtype"] == "f16"][0]["pinned"]
        assert client.pin(MODEL, dtype="f16") == [entry["name"]]
        status = client.status()
        assert status["pid"] == daemon.proc.pid == client.daemon_pid and status["used"] <= status["budget"]
        client.unpin(MODEL)
    del sd
    with mora.connect(daemon.socket) as client:
        assert client.evict(MODEL, dtype="f16").models


def test_a_pipeline_component_by_subfolder_and_variant(daemon, tmp_path):
    # A diffusers layout: the root holds model_index.json, each component its folder.
    from safetensors.numpy import save_file

    pipe = tmp_path / "pipe"
    (pipe / "unet").mkdir(parents=True)
    (pipe / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"]}')
    (pipe / "unet" / "config.json").write_text("{}")
    full = {"conv_in.weight": np.arange(12, dtype=np.float32).reshape(3, 4) / 7}
    save_file(full, str(pipe / "unet" / "diffusion_pytorch_model.safetensors"))
    save_file({k: v.astype(np.float16) for k, v in full.items()}, str(pipe / "unet" / "diffusion_pytorch_model.fp16.safetensors"))
    with mora.connect(daemon.socket) as client:
        sd = client.state_dict(pipe, framework="numpy", subfolder="unet")
        assert sd.name == str(pipe / "unet") and sd.dir == str(pipe / "unet")
        np.testing.assert_array_equal(sd["conv_in.weight"], full["conv_in.weight"])
        # The fp16 file, widened to the f32 asked for: its rounding shows.
        fp16 = client.state_dict(pipe, framework="numpy", subfolder="unet", variant="fp16")
        np.testing.assert_array_equal(fp16["conv_in.weight"], full["conv_in.weight"].astype(np.float16).astype(np.float32))
        assert not np.array_equal(fp16["conv_in.weight"], sd["conv_in.weight"])
        with pytest.raises(mora.DaemonError, match=r"no `bf16` variant .*diffusion_pytorch_model\.bf16\.safetensors"):
            client.state_dict(pipe, framework="numpy", subfolder="unet", variant="bf16")
        with pytest.raises(mora.DaemonError, match=r"is a diffusers pipeline, .* with a subfolder \(unet\)"):
            client.state_dict(pipe, framework="numpy")


def test_bad_arguments_raise_invalid_argument_before_asking(daemon):
    with mora.connect(daemon.socket) as client:
        cases = [
            (dict(dtype="f8"), "unknown dtype `f8`: expected f32, f16 or bf16"),
            (dict(dtype=np.int8), "unknown dtype `int8`"),
            (dict(device="tpu"), "unknown device `tpu`: expected cpu, cuda or cuda:N"),
            (dict(framework="tf"), "unknown framework `tf`"),
            (dict(dtype="bf16", framework="numpy"), "numpy has no bfloat16"),
            (dict(device="cuda:0", framework="numpy"), "numpy arrays live on the host"),
            (dict(keep_alive="soon", framework="numpy"), "keep_alive"),
        ]
        for kwargs, message in cases:
            with pytest.raises(mora.InvalidArgument) as e:
                client.state_dict(MODEL, **kwargs)
            assert message in str(e.value) and "\n" not in str(e.value), kwargs
            assert isinstance(e.value, ValueError)
        assert client.ps() is not None  # still connected, nothing leased
        assert all(m["leases"] == 0 for m in client.ps())


def test_cli_dtype_message_is_the_same():
    # The CLI refuses the same dtype with the same words.
    cli = subprocess.run([mora_cache(), "load", MODEL, "--dtype", "f8", "--socket", "/nonexistent/s.sock"], capture_output=True, text=True)
    assert cli.returncode != 0 and "unknown dtype `f8`: expected f32, f16 or bf16" in cli.stderr


def test_a_model_not_in_the_cache_is_model_not_found_with_the_cli_message(daemon):
    with mora.connect(daemon.socket) as client:
        with pytest.raises(mora.ModelNotFound) as e:
            client.state_dict("nobody/nothing", framework="numpy")
        assert isinstance(e.value, LookupError)
    cli = daemon.cli("load", "nobody/nothing")
    assert cli.returncode != 0
    assert str(e.value) in cli.stderr and "mora-cache pull" in str(e.value) and "\n" not in str(e.value)


def test_a_broken_checkpoint_is_a_daemon_error_and_the_daemon_serves_on(daemon, model_file, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in model_file.parent.iterdir():
        if f.name != "model.safetensors" and f.is_file():
            (bad / f.name).write_bytes(f.read_bytes())
    (bad / "model.safetensors").write_bytes(model_file.read_bytes()[: 1 << 20])
    with mora.connect(daemon.socket) as client:
        with pytest.raises(mora.DaemonError) as e:
            client.state_dict(str(bad), framework="numpy")
        assert e.value.kind == "invalid_model" and "\n" not in str(e.value)
        assert client.state_dict(MODEL, framework="numpy")


def test_no_daemon_and_no_autostart_is_daemon_not_running(tmp_path):
    sock = tmp_path / "none" / "cache.sock"
    with pytest.raises(mora.DaemonNotRunning) as e:
        mora.connect(sock, autostart=False)
    assert str(e.value) == (
        f"no cache daemon is listening at {sock}: start one with `mora-cache serve`, or connect with autostart=True"
    )
    assert isinstance(e.value, ConnectionError) and isinstance(e.value, mora.ConnectFailed)


def test_autostart_starts_a_daemon_that_outlives_the_client(tmp_path, model_file):
    sock = tmp_path / "auto" / "cache.sock"
    code = f"""
import mora
with mora.connect({str(sock)!r}) as c:
    c.state_dict({MODEL!r}, framework="numpy")
    print(c.daemon_pid)
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    pid = int(run.stdout)
    assert f"no cache daemon at {sock}; started one (pid {pid}" in run.stderr
    try:
        with mora.connect(sock, autostart=False) as c:
            assert c.daemon_pid == pid
            [m] = c.ps()
            assert m["name"] == MODEL and m["leases"] == 0
    finally:
        subprocess.run([mora_cache(), "stop", "--socket", str(sock)], check=True, capture_output=True)


def test_autostart_without_mora_cache_on_path_says_so(tmp_path):
    sock = tmp_path / "x" / "cache.sock"
    env = dict(os.environ, PATH=str(tmp_path))
    code = f"import mora\nmora.connect({str(sock)!r})"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert run.returncode != 0
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("mora.errors.ConnectFailed: no cache daemon is listening at")
    assert "`mora-cache` is not on PATH" in last


def _postcard_varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def test_a_daemon_of_another_protocol_version_is_version_mismatch(tmp_path):
    # A stand-in daemon that answers every hello as a daemon of protocol 99
    # does (HelloReply::version_mismatch; the hello frames are frozen).
    path = tmp_path / "old.sock"
    server = socketlib.socket(socketlib.AF_UNIX, socketlib.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)
    ours = mora.PROTOCOL_VERSION
    message = (
        f"daemon speaks protocol 99, client speaks {ours}: restart the daemon "
        "(mora-cache stop) so that the one matching this client starts"
    ).encode()

    def answer() -> None:
        conn, _ = server.accept()
        with conn:
            (n,) = struct.unpack("<I", conn.recv(4))
            while n > 0:
                n -= len(conn.recv(n))
            body = _postcard_varint(99) + b"\x00" + _postcard_varint(len(message)) + message + _postcard_varint(4242)
            conn.sendall(struct.pack("<I", len(body)) + body)

    t = threading.Thread(target=answer)
    t.start()
    try:
        with pytest.raises(mora.VersionMismatch) as e:
            mora.connect(path, autostart=False)
    finally:
        t.join(5)
        server.close()
    assert str(e.value) == f"the cache daemon at {path} refused this client: {message.decode()}"


def test_a_daemon_that_dies_mid_session_is_connection_lost(tmp_path):
    d = start_daemon(tmp_path / "dying" / "cache.sock")
    client = mora.connect(d.socket, autostart=False)
    stop_daemon(d)
    with pytest.raises(mora.ConnectionLost) as e:
        client.ps()
    assert "lost the connection to the cache daemon" in str(e.value) and "\n" not in str(e.value)
    client.close()


def test_the_package_describes_itself():
    assert mora.__version__ and isinstance(mora.PROTOCOL_VERSION, int)
    for name in mora.__all__:
        assert getattr(mora, name).__doc__, name
    assert issubclass(mora.DaemonNotRunning, mora.MoraError)
    stubs = Path(mora.__file__).parent / "_mora.pyi"
    assert stubs.is_file() and (Path(mora.__file__).parent / "py.typed").is_file()


def test_mappings_hold_the_connection_until_the_last_is_gone():
    # The bookkeeping behind every lease (host and device="cuda:N"; the IPC
    # path itself needs a GPU: scripts/gpu-check.sh runs it): each collected
    # mapping ends its lease; the connection closes only once the client is
    # closed and none is left.
    class Conn:
        closed = False

        def __init__(self) -> None:
            self.released = []

        def release(self, lease: int) -> None:
            self.released.append(lease)

        def close(self) -> None:
            self.closed = True

    conn = Conn()
    session = mora._leases.Session(conn)
    session.mappings = 2
    session.mapping_closed(7)
    assert conn.released == [7] and not conn.closed
    session.close_client()
    assert not conn.closed
    session.mapping_closed(8)
    assert conn.closed and conn.released == [7, 8]
    alone = mora._leases.Session(Conn())
    alone.close_client()
    assert alone.conn.closed


def test_a_cuda_device_without_a_driver_is_invalid_argument():
    import ctypes

    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        pass
    else:
        pytest.skip("this machine has a CUDA driver: scripts/gpu-check.sh covers device=cuda")
    from mora import _cuda

    with pytest.raises(mora.InvalidArgument) as e:
        _cuda.uuid(0)
    assert str(e.value).startswith("device cuda: CUDA is not usable here: cannot load libcuda.so.1")
