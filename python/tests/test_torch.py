"""The torch paths: tensors over the daemon's segment, what an in-place
write does, and the interop recipes of docs/python.md (transformers,
sentence-transformers). Skipped, with the reason, where torch (or the
library a recipe needs) is not importable; tests/python.rs runs them with
the benchmarks' Python peer when it is installed."""

from __future__ import annotations

import gc
import subprocess
import sys

import pytest

import mora
from conftest import MODEL

torch = pytest.importorskip("torch", reason="torch is not installed in this Python (scripts/bench-python.sh makes a peer that has it)")
from safetensors.torch import load_file  # noqa: E402

NAME = "embeddings.word_embeddings.weight"


def status(key: str) -> int:
    """A line of /proc/self/status, in bytes."""
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def test_torch_state_dict_is_the_checkpoint_viewed_in_place(daemon, model_file):
    ref = load_file(str(model_file))
    with mora.connect(daemon.socket) as client:
        sd = client.state_dict(MODEL)
        assert set(sd) == set(ref)
        for name, want in ref.items():
            assert sd[name].dtype == want.dtype and torch.equal(sd[name], want), name
        for dtype, tdtype in (("bfloat16", torch.bfloat16), (torch.float16, torch.float16)):
            low = client.state_dict(MODEL, dtype=dtype)
            for name, want in ref.items():
                expect = want.to(tdtype) if want.is_floating_point() else want
                assert torch.equal(low[name], expect), (dtype, name)


def test_an_in_place_write_stays_in_this_process(daemon, model_file):
    want = load_file(str(model_file))[NAME]
    with mora.connect(daemon.socket) as client:
        t = client.state_dict(MODEL)[NAME]
        t.add_(1.0)
        assert torch.equal(t, want + 1.0)
        assert torch.equal(client.state_dict(MODEL)[NAME], want)
    code = f"""
import mora
with mora.connect({str(daemon.socket)!r}, autostart=False) as c:
    print(float(c.state_dict({MODEL!r})[{NAME!r}][0, 0]))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert float(out) == float(want[0, 0])


def test_tensors_keep_their_mapping_alive(daemon, model_file):
    want = load_file(str(model_file))[NAME]
    with mora.connect(daemon.socket) as client:
        t = client.state_dict(MODEL)[NAME]
    gc.collect()
    with mora.connect(daemon.socket) as client:
        client.evict(MODEL, dtype="f32")
    assert torch.equal(t, want)


def test_transformers_bert_from_mora_matches_the_disk_load_without_a_copy(daemon):
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    ids = torch.tensor([[101, 1037, 2158, 2003, 5983, 2833, 1012, 102]])
    with mora.connect(daemon.socket) as client:
        sd = client.state_dict(MODEL)
        config = transformers.AutoConfig.from_pretrained(sd.dir)
        transformers.AutoModel.from_config(config)  # warm the imports and allocator before measuring
        gc.collect()
        anon = status("RssAnon")
        model = transformers.AutoModel.from_config(config)
        model.load_state_dict(sd, assign=True, strict=False)
        model.eval()
        with torch.no_grad():
            got = model(input_ids=ids).last_hidden_state
        gc.collect()
        grew = status("RssAnon") - anon
        # The parameters are the daemon's pages: no private copy of the weights.
        assert model.embeddings.word_embeddings.weight.data_ptr() == sd[NAME].data_ptr()
        assert grew < sd.nbytes // 4, f"private memory grew by {grew} bytes for a {sd.nbytes}-byte model"
        ref = transformers.AutoModel.from_pretrained(sd.dir)
        ref.eval()
        with torch.no_grad():
            want = ref(input_ids=ids).last_hidden_state
        assert torch.equal(got, want)


def test_sentence_transformers_fed_from_mora_gives_the_same_embeddings(daemon):
    st = pytest.importorskip("sentence_transformers", reason="sentence-transformers is not installed")
    texts = ["A man is eating food.", "Mora keeps the weights resident."]
    with mora.connect(daemon.socket) as client:
        sd = client.state_dict(MODEL)
        fed = st.SentenceTransformer(sd.dir, device="cpu")
        fed[0].auto_model.load_state_dict(sd, assign=True, strict=False)
        assert fed[0].auto_model.embeddings.word_embeddings.weight.data_ptr() == sd[NAME].data_ptr()
        ref = st.SentenceTransformer(sd.dir, device="cpu")
        assert (fed.encode(texts) == ref.encode(texts)).all()


def test_a_diffusers_unet_fed_from_a_pipeline_subfolder_matches_its_own_load(daemon):
    diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed")
    from pathlib import Path

    pipe = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "image" / "pipelines" / "sd15"
    gen = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 4, 8, 8, generator=gen)
    context = torch.randn(1, 77, 32, generator=gen)
    with mora.connect(daemon.socket) as client:
        sd = client.state_dict(pipe, subfolder="unet")
        assert sd.name == str(pipe / "unet")
        config = diffusers.UNet2DConditionModel.load_config(str(pipe), subfolder="unet")
        fed = diffusers.UNet2DConditionModel.from_config(config)
        fed.load_state_dict(sd, assign=True)
        fed.eval()
        assert fed.conv_in.weight.data_ptr() == sd["conv_in.weight"].data_ptr()
        ref = diffusers.UNet2DConditionModel.from_pretrained(str(pipe), subfolder="unet", torch_dtype=torch.float32)
        ref.eval()
        with torch.no_grad():
            got = fed(sample, 500, encoder_hidden_states=context).sample
            want = ref(sample, 500, encoder_hidden_states=context).sample
        assert torch.equal(got, want)


def test_cuda_without_a_gpu_is_a_one_line_error(daemon):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the GPU check (scripts/gpu-check.sh) covers device=cuda")
    with mora.connect(daemon.socket) as client:
        with pytest.raises(mora.InvalidArgument) as e:
            client.state_dict(MODEL, device="cuda:0")
        assert "cuda" in str(e.value) and "\n" not in str(e.value)
        assert all(m["leases"] == 0 for m in client.ps())
