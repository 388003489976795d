"""The torch paths: tensors over the daemon's segment, what an in-place
write does, building a module empty and filling it (mora.init_empty_weights,
mora.load_state_dict, and the refusal of a module built under
torch.device("meta")), and the interop recipes of docs/python.md
(transformers, sentence-transformers, diffusers). Skipped, with the reason, where torch (or the
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


def leases(client, name=MODEL):
    return sum(m["leases"] for m in client.ps() if m["name"] == name)


def test_a_tensor_keeps_its_lease_after_close_until_collected(daemon, model_file):
    want = load_file(str(model_file))[NAME]
    with mora.connect(daemon.socket) as client:
        t = client.state_dict(MODEL)[NAME]
    gc.collect()
    view = t[1:].view(-1)
    del t
    with mora.connect(daemon.socket) as client:
        with pytest.raises(mora.DaemonError, match="leased by pid"):
            client.evict(MODEL, dtype="f32")
        assert torch.equal(view, want[1:].view(-1))
        del view
        assert leases(client) == 0
        assert client.evict(MODEL, dtype="f32").models == [MODEL]


def test_a_module_fed_by_hand_holds_the_lease_and_release_takes_it_back(daemon, model_file):
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    ids = torch.tensor([[101, 1037, 2158, 102]])
    with mora.connect(daemon.socket) as client:
        sd = client.state_dict(MODEL)
        with mora.init_empty_weights():
            model = transformers.AutoModel.from_config(transformers.AutoConfig.from_pretrained(sd.dir))
        mora.load_state_dict(model, sd, strict=False).eval()
    del sd  # the module alone keeps the lease now
    gc.collect()
    with mora.connect(daemon.socket) as client:
        assert leases(client) == 1
        kept = model.pooler.dense.weight
        with pytest.warns(UserWarning, match=f"arrays or tensors of {MODEL} .f32, cpu. are still alive"):
            assert mora.release(model) is False
        assert model.pooler.dense.weight.is_meta and not kept.is_meta
        assert torch.equal(kept, load_file(str(model_file))["pooler.dense.weight"])
        assert leases(client) == 1
        del kept
        assert leases(client) == 0
        # The module refuses to run rather than compute on meta tensors.
        with pytest.raises(mora.Released, match=r"^this BertModel's weights were given back with mora.release\(\)"):
            model(input_ids=ids)
        with pytest.raises(mora.Released):
            model.encoder.layer[0](torch.zeros(1, 4, 384))  # a submodule that lost its weights
        assert client.evict(MODEL, dtype="f32").models == [MODEL]


def test_transformers_bert_from_mora_matches_the_disk_load_without_a_copy(daemon):
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    ids = torch.tensor([[101, 1037, 2158, 2003, 5983, 2833, 1012, 102]])
    with mora.connect(daemon.socket) as client:
        sd = client.state_dict(MODEL)
        config = transformers.AutoConfig.from_pretrained(sd.dir)
        transformers.AutoModel.from_config(config)  # warm the imports and allocator before measuring
        gc.collect()
        anon = status("RssAnon")
        with mora.init_empty_weights():
            model = transformers.AutoModel.from_config(config)
        mora.load_state_dict(model, sd, strict=False)
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
        with mora.init_empty_weights():
            fed = diffusers.UNet2DConditionModel.from_config(config)
        mora.load_state_dict(fed, sd)
        fed.eval()
        assert fed.conv_in.weight.data_ptr() == sd["conv_in.weight"].data_ptr()
        ref = diffusers.UNet2DConditionModel.from_pretrained(str(pipe), subfolder="unet", torch_dtype=torch.float32)
        ref.eval()
        with torch.no_grad():
            got = fed(sample, 500, encoder_hidden_states=context).sample
            want = ref(sample, 500, encoder_hidden_states=context).sample
        assert torch.equal(got, want)


class Positions(torch.nn.Module):
    """A module with a non-persistent buffer, as CLIP's text embeddings have:
    its ``position_ids`` are in no state dict."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(16, 4)
        self.proj = torch.nn.Linear(4, 3)
        self.register_buffer("position_ids", torch.arange(16).unsqueeze(0), persistent=False)

    def forward(self, n: int) -> "torch.Tensor":
        return self.proj(self.embed(self.position_ids[:, :n]))


def reference_positions() -> Positions:
    torch.manual_seed(0)
    return Positions().eval()


def test_a_module_built_on_the_meta_device_is_refused_naming_its_buffer():
    ref = reference_positions()
    with torch.device("meta"):
        fed = Positions()
    with pytest.raises(mora.MetaTensorsLeft) as e:
        mora.load_state_dict(fed, ref.state_dict())
    msg = str(e.value)
    assert isinstance(e.value, mora.MoraError) and isinstance(e.value, ValueError)
    assert e.value.names == ["position_ids"]
    assert "1 tensor of Positions" in msg and "position_ids (buffer)" in msg and "mora.init_empty_weights()" in msg, msg
    assert "\n" not in msg


def test_init_empty_weights_keeps_buffers_real_and_matches_a_normal_load():
    ref = reference_positions()
    sd = ref.state_dict()
    with mora.init_empty_weights():
        fed = Positions()
    assert all(p.is_meta for p in fed.parameters())
    assert isinstance(fed.proj.weight, torch.nn.Parameter) and fed.proj.weight.requires_grad
    assert torch.equal(fed.position_ids, torch.arange(16).unsqueeze(0))
    assert mora.load_state_dict(fed, sd) is fed
    assert fed.proj.weight.data_ptr() == sd["proj.weight"].data_ptr()  # assigned, not copied
    with torch.no_grad():
        assert torch.equal(fed(5), ref(5))
    # Out of the block, modules are built as usual again.
    assert not any(p.is_meta for p in Positions().parameters())


def test_init_empty_weights_acts_only_in_its_thread():
    import threading

    built = {}
    inside, done = threading.Event(), threading.Event()

    def other():
        inside.wait()
        built["other"] = torch.nn.Linear(2, 2)
        done.set()

    t = threading.Thread(target=other)
    t.start()
    with mora.init_empty_weights():
        inside.set()
        done.wait()
        built["this"] = torch.nn.Linear(2, 2)
    t.join()
    assert built["this"].weight.is_meta and not built["other"].weight.is_meta


def test_parameters_the_state_dict_lacks_are_refused_in_one_line():
    with mora.init_empty_weights():
        fed = torch.nn.Sequential(*(torch.nn.Linear(2, 2) for _ in range(4)))
    with pytest.raises(mora.MetaTensorsLeft) as e:
        mora.load_state_dict(fed, {}, strict=False)
    msg = str(e.value)
    assert len(e.value.names) == 8 and "8 tensors of Sequential" in msg, msg
    assert "0.weight (parameter)" in msg and "and 3 more" in msg and "the state dict lacks" in msg, msg
    assert "init_empty_weights" not in msg and "\n" not in msg
    with pytest.raises(RuntimeError, match="Missing key"):  # strict=True: torch's own check comes first
        mora.load_state_dict(fed, {})


def test_a_clip_text_encoder_fed_from_mora_needs_its_position_ids(daemon):
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    from pathlib import Path

    pipe = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "image" / "pipelines" / "sd15"
    ids = torch.tensor([[727, 5, 17, 300, 2]])
    with mora.connect(daemon.socket) as client:
        sd = client.state_dict(pipe, subfolder="text_encoder")
        config = transformers.CLIPTextConfig.from_pretrained(str(pipe / "text_encoder"))
        with torch.device("meta"):
            on_meta = transformers.CLIPTextModel(config)
        with pytest.raises(mora.MetaTensorsLeft) as e:
            mora.load_state_dict(on_meta, sd)
        # transformers 5 names it embeddings.position_ids (the fixture's keys), 4 text_model.embeddings.position_ids.
        assert [n for n in e.value.names if n.endswith("embeddings.position_ids")] == e.value.names, str(e.value)
        assert "embeddings.position_ids (buffer)" in str(e.value), str(e.value)
        with mora.init_empty_weights():
            fed = transformers.CLIPTextModel(config)
        mora.load_state_dict(fed, sd)
        fed.eval()
        lent = next(t for name, t in sd.items() if name.endswith("embeddings.token_embedding.weight"))
        assert fed.get_input_embeddings().weight.data_ptr() == lent.data_ptr()
        ref = transformers.CLIPTextModel.from_pretrained(str(pipe / "text_encoder"), torch_dtype=torch.float32)
        ref.eval()
        with torch.no_grad():
            got = fed(input_ids=ids).last_hidden_state
            want = ref(input_ids=ids).last_hidden_state
        assert torch.equal(got, want)


def test_a_tied_weight_absent_from_the_checkpoint_is_tied_again():
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    config = transformers.BertConfig(
        vocab_size=50, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16, max_position_embeddings=16
    )
    torch.manual_seed(0)
    ref = transformers.BertForMaskedLM(config).eval()
    tied = "cls.predictions.decoder.weight"
    sd = {k: v for k, v in ref.state_dict().items() if k != tied}  # as safetensors saves a tied pair
    with mora.init_empty_weights():
        fed = transformers.BertForMaskedLM(config)
    mora.load_state_dict(fed, sd, strict=False)
    fed.eval()
    assert fed.cls.predictions.decoder.weight is fed.bert.embeddings.word_embeddings.weight
    ids = torch.tensor([[1, 7, 9, 2]])
    with torch.no_grad():
        assert torch.equal(fed(input_ids=ids).logits, ref(input_ids=ids).logits)


def test_cuda_without_a_gpu_is_a_one_line_error(daemon):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the GPU check (scripts/gpu-check.sh) covers device=cuda")
    gc.collect()  # the models of the tests before, and their leases
    with mora.connect(daemon.socket) as client:
        with pytest.raises(mora.InvalidArgument) as e:
            client.state_dict(MODEL, device="cuda:0")
        assert "cuda" in str(e.value) and "\n" not in str(e.value)
        assert all(m["leases"] == 0 for m in client.ps())
