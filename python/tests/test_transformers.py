"""mora.transformers.from_pretrained and
mora.sentence_transformers.SentenceTransformer against transformers' and
sentence-transformers' own loads: the test model (MiniLM) from the hub
cache, and tiny causal language models written in the test with
transformers' own save_pretrained (float32 and float16, tied and untied
embeddings). The same class, the same dtypes, tied weights tied, the weights
borrowed (no copy), equal embeddings and equal greedy tokens. Skipped, with
the reason, where transformers (or sentence-transformers) is missing."""

from __future__ import annotations

import importlib.util

import pytest

import mora
from conftest import MODEL

# Without torch this module holds no tests: test_torch.py reports that skip
# once for all of them.
__test__ = importlib.util.find_spec("torch") is not None
if __test__:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    import mora.transformers

TEXTS = ["A man is eating food.", "Mora keeps the weights resident."]


def aligned(model):
    """``model`` with every parameter at a 64-byte aligned address, as the
    daemon's tensors are: transformers leaves the weights it reads at the
    file's offsets, and torch's CPU matmul sums an unaligned weight in
    another order (the last bit differs)."""
    for p in model.parameters():
        if p.data_ptr() % 64:
            p.data = p.data.clone()
    return model


def lent_pointers(model):
    return {sd_t.data_ptr() for sd in model._mora.state_dicts for sd_t in sd.values()}


def test_minilm_from_the_daemon_gives_transformers_embeddings(daemon):
    model = mora.transformers.from_pretrained(MODEL, socket=daemon.socket)
    ref = transformers.AutoModel.from_pretrained(MODEL)
    assert type(model) is type(ref) and model.dtype == ref.dtype == torch.float32 and not model.training
    assert all(p.data_ptr() in lent_pointers(model) for p in model.parameters())
    tok = transformers.AutoTokenizer.from_pretrained(MODEL)
    batch = tok(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(model(**batch).last_hidden_state, aligned(ref)(**batch).last_hidden_state)


def tiny_llama(path, dtype, tie):
    config = transformers.LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(dtype)
    model.save_pretrained(path)
    return path


@pytest.mark.parametrize("stored, tie", [("float32", True), ("float16", False)])
def test_a_causal_lm_gives_transformers_greedy_tokens_and_dtypes(daemon, tmp_path, stored, tie):
    stored = getattr(torch, stored)
    path = tiny_llama(tmp_path / "llama", stored, tie)
    lm = mora.transformers.from_pretrained(path, auto_class="AutoModelForCausalLM", socket=daemon.socket)
    ref = transformers.AutoModelForCausalLM.from_pretrained(path)
    assert type(lm) is transformers.LlamaForCausalLM
    # transformers 5 keeps the stored dtype when none is asked for.
    assert {k: t.dtype for k, t in lm.state_dict().items()} == {k: t.dtype for k, t in ref.state_dict().items()}
    assert lm.dtype == stored
    assert (lm.lm_head.weight is lm.model.embed_tokens.weight) == tie == (ref.lm_head.weight is ref.model.embed_tokens.weight)
    assert {k: t.dtype for k, t in lm.named_buffers()} == {k: t.dtype for k, t in ref.named_buffers()}
    ids = torch.tensor([[1, 17, 42, 5, 63]])
    args = dict(max_new_tokens=12, do_sample=False)
    assert torch.equal(lm.generate(ids, **args), aligned(ref).generate(ids, **args))
    f32 = mora.transformers.from_pretrained(path, auto_class="AutoModelForCausalLM", socket=daemon.socket, dtype=torch.float32)
    ref32 = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    assert f32.dtype == ref32.dtype == torch.float32
    with torch.no_grad():
        assert torch.equal(f32(ids).logits, aligned(ref32)(ids).logits)
    assert torch.equal(f32.generate(ids, **args), ref32.generate(ids, **args))


def test_sentence_transformers_through_the_daemon_gives_the_same_embeddings(daemon):
    st = pytest.importorskip("sentence_transformers", reason="sentence-transformers is not installed")
    import mora.sentence_transformers

    model = mora.sentence_transformers.SentenceTransformer(MODEL, device="cpu", socket=daemon.socket)
    ref = st.SentenceTransformer(MODEL, device="cpu")
    inner = model[0].auto_model
    assert all(p.data_ptr() in lent_pointers(inner) for p in inner.parameters())
    aligned(ref[0].auto_model)
    assert (model.encode(TEXTS) == ref.encode(TEXTS)).all()
    assert model._mora.client is inner._mora.client


def leases(client):
    return sum(m["leases"] for m in client.ps() if m["name"] == MODEL)


def test_a_model_holds_its_lease_until_collected_or_released(daemon):
    import gc

    model = mora.transformers.from_pretrained(MODEL, socket=daemon.socket)
    gc.collect()
    with mora.connect(daemon.socket) as client:
        assert leases(client) == 1
        with pytest.raises(mora.DaemonError, match="leased by pid"):
            client.evict(MODEL)
        del model
        gc.collect()
        assert leases(client) == 0
        model = mora.transformers.from_pretrained(MODEL, client=client)
        assert leases(client) == 1
        assert mora.release(model) is True and leases(client) == 0
        assert not hasattr(model, "_mora") and all(p.is_meta for p in model.parameters())
        assert client.evict(MODEL).models


def test_a_sentence_transformer_released_refuses_to_encode(daemon):
    pytest.importorskip("sentence_transformers", reason="sentence-transformers is not installed")
    import mora.sentence_transformers

    model = mora.sentence_transformers.SentenceTransformer(MODEL, device="cpu", socket=daemon.socket)
    with mora.connect(daemon.socket) as client:
        assert leases(client) == 1
        assert mora.release(model) is True and leases(client) == 0
    with pytest.raises(mora.Released, match="^this SentenceTransformer's weights were given back"):
        model.encode(TEXTS)


def test_a_missing_directory_is_named_as_such(daemon, tmp_path):
    with pytest.raises(mora.ModelNotFound) as e:
        mora.transformers.from_pretrained(tmp_path / "nowhere", socket=daemon.socket)
    assert "no such directory" in str(e.value) and "\n" not in str(e.value), str(e.value)


FIXTURES = __import__("pathlib").Path(__file__).resolve().parents[2] / "tests" / "fixtures"


@pytest.mark.parametrize("adapter", ["llama-tf5-peft", "qwen2-tf5-peft"])
def test_a_peft_adapter_over_a_borrowed_decoder_gives_peft_greedy_tokens(daemon, adapter):
    """PEFT's `PeftModel.from_pretrained` over a decoder borrowed from the
    daemon gives the greedy tokens transformers + PEFT gave with both read
    from disk (tests/fixtures/lora/*/lora.json), and leaves the base's
    tensors the daemon's."""
    peft = pytest.importorskip("peft", reason="peft is not installed")
    import json

    lora = FIXTURES / "lora" / adapter
    ref = json.loads((lora / "lora.json").read_text())
    base = mora.transformers.from_pretrained(FIXTURES / ref["base"], auto_class="AutoModelForCausalLM", socket=daemon.socket, dtype=torch.float32)
    lent = lent_pointers(base)
    lm = peft.PeftModel.from_pretrained(base, lora)
    ids = torch.tensor([ref["prompt_ids"]])
    out = lm.generate(input_ids=ids, max_new_tokens=ref["max_tokens"], do_sample=False)
    want = [c for c in ref["cases"] if c["scale"] == 1.0][0]["ids"]
    assert out[0, ids.shape[1]:].tolist() == want
    q = base.model.layers[0].self_attn.q_proj.base_layer.weight
    assert q.data_ptr() in lent, "the base's weights were copied"
