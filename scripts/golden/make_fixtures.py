#!/usr/bin/env python3
"""Writes the golden parity fixtures of tests/fixtures/golden/.

Each fixture is a tiny random-weight checkpoint written by transformers' own
`save_pretrained` (config.json in the form that transformers version writes,
model.safetensors, a tokenizer, generation_config.json), and golden.json
holds what transformers computed from it: for a decoder, the greedy token ids
of 16 new tokens after a fixed prompt; for the BERT encoder, the
sentence-transformers embeddings of fixed texts. Rust tests (tests/golden.rs)
check that Mora gives the same, with no torch in CI.

Run by hand, once per transformers major version (see docs/workflow.md,
"Golden parity fixtures"):

    python3 scripts/golden/make_fixtures.py            # transformers 5.x: the `-tf5` fixtures
    PYTHONPATH=/path/to/transformers4 python3 scripts/golden/make_fixtures.py   # 4.x: `-tf4`

Weights are drawn from fixed seeds, with a spread wide enough that every
greedy step wins by a clear margin (at least MIN_MARGIN in logits), so that
float rounding cannot flip a token. Each feature a fixture exercises (a rope
theta, a rope scaling, a sliding window) is checked to change the greedy ids
when it is removed: a runtime that ignores it fails the test.
"""

import copy
import json
import os
import shutil
import sys
import tempfile

import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers, decoders, processors, trainers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

MAJOR = int(transformers.__version__.split(".")[0])
FORM = f"tf{MAJOR}"
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tests", "fixtures", "golden")
PROMPT = "the man is eating a piece of bread with the cat"
NEW_TOKENS = 16
MIN_MARGIN = 0.05
CORPUS = [
    "the man is eating a piece of bread",
    "a woman is eating food with the dog",
    "the cat sat on the mat and the dog ran",
    "models weights cache run fast or slow",
    "one copy of each model for every workflow",
    "the quick brown fox jumps over the lazy dog",
] * 4


CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('Unknown role: ' + message['role']) }}{% endif %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'].strip() }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CHAT = [
    {"role": "system", "content": "  You answer about food.  "},
    {"role": "user", "content": "Is the man eating bread?"},
]


def bpe_tokenizer(add_bos, chat=False):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    if chat:
        from tokenizers import AddedToken
        tok.add_special_tokens([AddedToken("<|im_start|>", special=True), AddedToken("<|im_end|>", special=True)])
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    if chat:
        hf.chat_template = CHAT_TEMPLATE
    return hf


def draw(model, seed):
    """Weights with a wide spread, so logits are far apart."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if p.dim() == 1:
                base = 1.0 if ("norm" in name or "ln_" in name) and name.endswith("weight") else 0.0
                p.copy_(base + 0.1 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p.shape[1] if "c_" not in name else p.shape[0]
                p.copy_(torch.randn(p.shape, generator=g) * (1.5 / fan_in**0.5))


def greedy(model, ids, eos):
    out = model.generate(
        torch.tensor([ids]),
        max_new_tokens=NEW_TOKENS,
        do_sample=False,
        eos_token_id=eos,
        pad_token_id=0,
        output_scores=True,
        return_dict_in_generate=True,
    )
    new = out.sequences[0, len(ids):].tolist()
    margins = []
    for s in out.scores:
        top = torch.topk(s[0].float(), 2).values
        margins.append(float(top[0] - top[1]))
    return new, min(margins)


def build(config, seed):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    draw(model, seed)
    return model


def decoder_fixture(name, config, add_bos=True, without=None, eos_list=False, chat=False):
    """`without`: a function that returns the config minus the feature under
    test; the greedy ids must differ without it. `chat`: the prompt is
    CHAT rendered with the tokenizer's chat template."""
    tokenizer = bpe_tokenizer(add_bos, chat)
    if chat:
        ids = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True)
        if not isinstance(ids, list):
            ids = ids["input_ids"]
    else:
        ids = tokenizer(PROMPT)["input_ids"]
    eos = config.eos_token_id
    for seed in range(1, 200):
        model = build(config, seed)
        new, margin = greedy(model, ids, eos)
        if margin < MIN_MARGIN or len(set(new)) < 5 or len(new) < NEW_TOKENS:
            continue
        if without is not None:
            other = build(without(copy.deepcopy(config)), seed)
            other.load_state_dict(model.state_dict())
            if greedy(other, ids, eos)[0] == new:
                continue
        break
    else:
        sys.exit(f"{name}: no seed gave clear margins")
    gen_eos = None
    if eos_list:
        # Stop at a list of ids, as Llama 3 instruct models do: the second
        # is what greedy decoding produces ninth, so generation stops there.
        stop = new[8]
        if stop in new[:8]:
            sys.exit(f"{name}: the stop token appears early; pick another seed")
        gen_eos = [config.eos_token_id, stop]
        new, margin = greedy(model, ids, gen_eos)
        assert new[-1] == stop and len(new) == 9, new
    d = os.path.join(OUT, f"{name}-{FORM}")
    shutil.rmtree(d, ignore_errors=True)
    model.save_pretrained(d)
    tokenizer.save_pretrained(d)
    if gen_eos is not None:
        path = os.path.join(d, "generation_config.json")
        with open(path) as f:
            gc = json.load(f)
        gc["eos_token_id"] = gen_eos
        with open(path, "w") as f:
            json.dump(gc, f, indent=2)
    golden = {
        "task": "generate",
        **({"messages": CHAT} if chat else {"prompt": PROMPT}),
        "prompt_ids": ids,
        "max_tokens": NEW_TOKENS,
        "token_ids": new,
        "min_margin": round(margin, 4),
        "seed": seed,
        "transformers": transformers.__version__,
        "torch": torch.__version__.split("+")[0],
    }
    with open(os.path.join(d, "golden.json"), "w") as f:
        json.dump(golden, f, indent=2)
    print(f"{name}-{FORM}: seed {seed}, margin {margin:.3f}, ids {new}")


def small(cls, **kw):
    common = dict(vocab_size=300, bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    common.update(kw)
    return cls(**common)


def rope(theta, partial=None, **scaling):
    """The rope keys in the form of this transformers version."""
    if MAJOR >= 5:
        params = {"rope_theta": theta, "rope_type": scaling.pop("rope_type", "default"), **scaling}
        if partial is not None:
            params["partial_rotary_factor"] = partial
        return {"rope_parameters": params}
    out = {"rope_theta": theta}
    if scaling:
        out["rope_scaling"] = scaling
    if partial is not None:
        out["partial_rotary_factor"] = partial
    return out


def llama_like(**kw):
    kw = {k: v for k, v in kw.items() if v is not None}
    return dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=128, **kw)


def set_rope(cfg, theta, **scaling):
    for k, v in rope(theta, **scaling).items():
        setattr(cfg, k, v)
    if MAJOR < 5 and not scaling:
        cfg.rope_scaling = None
    if MAJOR < 5 and hasattr(cfg, "partial_rotary_factor"):
        cfg.partial_rotary_factor = 1.0
    return cfg


def main():
    from transformers import Gemma2Config, GPT2Config, LlamaConfig, MistralConfig, Phi3Config, Qwen2Config, Qwen3Config

    os.makedirs(OUT, exist_ok=True)
    decoder_fixture(
        "llama",
        small(LlamaConfig, **llama_like(), **rope(500.0)),
        without=lambda c: set_rope(c, 10000.0),
    )
    decoder_fixture(
        "llama3-scaling",
        small(LlamaConfig, **llama_like(), **rope(500.0, rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                                   high_freq_factor=4.0, original_max_position_embeddings=16)),
        without=lambda c: set_rope(c, 500.0),
        eos_list=True,
    )
    decoder_fixture(
        "llama-linear",
        small(LlamaConfig, **llama_like(), **rope(500.0, rope_type="linear", factor=4.0)),
        without=lambda c: set_rope(c, 500.0),
    )
    decoder_fixture(
        "llama-yarn",
        small(LlamaConfig, **llama_like(), **rope(500.0, rope_type="yarn", factor=4.0,
                                                   original_max_position_embeddings=32)),
        without=lambda c: set_rope(c, 500.0),
    )
    decoder_fixture(
        "mistral",
        small(MistralConfig, **llama_like(sliding_window=4), **rope(500.0)),
        without=lambda c: setattr(c, "sliding_window", None) or c,
    )
    decoder_fixture(
        "qwen2",
        small(Qwen2Config, **llama_like(), **rope(500.0), use_sliding_window=False, sliding_window=None),
        without=lambda c: set_rope(c, 10000.0),
    )
    decoder_fixture(
        "qwen3",
        small(Qwen3Config, **llama_like(head_dim=16), **rope(500.0), use_sliding_window=False, sliding_window=None),
        without=lambda c: set_rope(c, 10000.0),
    )
    decoder_fixture(
        "phi3",
        small(Phi3Config, **llama_like(sliding_window=6), **rope(500.0), original_max_position_embeddings=128),
        without=lambda c: setattr(c, "sliding_window", None) or c,
    )
    decoder_fixture(
        "phi3-partial-rotary",
        small(Phi3Config, **llama_like(head_dim=None), **rope(500.0, partial=0.5), original_max_position_embeddings=128),
        without=lambda c: set_rope(c, 500.0),
    )
    decoder_fixture(
        "gemma2",
        small(Gemma2Config, **llama_like(head_dim=16, sliding_window=4), **rope(500.0), query_pre_attn_scalar=16,
              attn_logit_softcapping=2.0, final_logit_softcapping=10.0, tie_word_embeddings=True),
        without=lambda c: setattr(c, "attn_logit_softcapping", None) or c,
    )
    decoder_fixture("llama-chat", small(LlamaConfig, **llama_like(), **rope(500.0), vocab_size=304), add_bos=False, chat=True)
    decoder_fixture(
        "gpt2",
        small(GPT2Config, n_embd=32, n_layer=2, n_head=4, n_positions=64, tie_word_embeddings=True),
        add_bos=False,
    )
    bert_fixture()
    xlm_roberta_fixture()
    modernbert_fixture()


EMBED_TEXTS = ["A man is eating food.", "A man is eating a piece of bread.", "The cat sat on the mat."]


def encoder_fixture(name, tmp_model, pooling):
    """Saves `tmp_model` (a directory with a transformers encoder and its
    tokenizer) as a sentence-transformers model with `pooling` and
    normalisation, and its embeddings of EMBED_TEXTS."""
    from sentence_transformers import SentenceTransformer, models as st_models

    d = os.path.join(OUT, f"{name}-{FORM}")
    shutil.rmtree(d, ignore_errors=True)
    word = st_models.Transformer(tmp_model, max_seq_length=64)
    pool = st_models.Pooling(word.get_word_embedding_dimension(), pooling_mode=pooling)
    SentenceTransformer(modules=[word, pool, st_models.Normalize()], device="cpu").save(d)
    st = SentenceTransformer(d, device="cpu")
    emb = st.encode(EMBED_TEXTS, convert_to_numpy=True, normalize_embeddings=False)
    golden = {
        "task": "embed",
        "texts": EMBED_TEXTS,
        "embeddings": [[float(x) for x in row] for row in emb],
        "transformers": transformers.__version__,
        "sentence_transformers": __import__("sentence_transformers").__version__,
        "torch": torch.__version__.split("+")[0],
    }
    p = os.path.join(d, "README.md")
    if os.path.exists(p):
        os.remove(p)
    with open(os.path.join(d, "golden.json"), "w") as f:
        json.dump(golden, f, indent=2)
    print(f"{name}-{FORM}: {len(EMBED_TEXTS)} embeddings of {emb.shape[1]}")


def xlm_roberta_fixture():
    """An XLM-RoBERTa encoder (multilingual-e5 / bge-m3 shape: a
    SentencePiece unigram tokenizer, positions after the padding id) with
    CLS pooling, as bge-m3 pools."""
    from transformers import XLMRobertaConfig, XLMRobertaModel, XLMRobertaTokenizerFast

    tok = Tokenizer(models.Unigram())
    tok.normalizer = __import__("tokenizers").normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=150, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
                                      unk_token="<unk>", show_progress=False)
    tok.train_from_iterator(CORPUS + EMBED_TEXTS, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
    with tempfile.TemporaryDirectory() as tmp:
        hf = XLMRobertaTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", sep_token="</s>",
                                     cls_token="<s>", unk_token="<unk>", pad_token="<pad>", mask_token="<mask>")
        config = XLMRobertaConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=64, max_position_embeddings=66,
                                  pad_token_id=1, bos_token_id=0, eos_token_id=2)
        torch.manual_seed(5)
        XLMRobertaModel(config, add_pooling_layer=False).eval().save_pretrained(tmp)
        hf.save_pretrained(tmp)
        encoder_fixture("xlm-roberta", tmp, "cls")


def modernbert_fixture():
    """A ModernBERT encoder (alternating global and local attention, two rope
    thetas, GeGLU, no biases) with mean pooling."""
    from transformers import ModernBertConfig, ModernBertModel

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS + EMBED_TEXTS, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", 1), ("[SEP]", 2)])
    with tempfile.TemporaryDirectory() as tmp:
        hf = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]",
                                     pad_token="[PAD]", mask_token="[MASK]",
                                     model_input_names=["input_ids", "attention_mask"])
        config = ModernBertConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, num_hidden_layers=4,
                                  num_attention_heads=4, intermediate_size=64, max_position_embeddings=64,
                                  local_attention=4, global_attn_every_n_layers=3, pad_token_id=3, bos_token_id=1,
                                  eos_token_id=2, cls_token_id=1, sep_token_id=2)
        torch.manual_seed(9)
        ModernBertModel(config).eval().save_pretrained(tmp)
        hf.save_pretrained(tmp)
        encoder_fixture("modernbert", tmp, "mean")


def bert_fixture():
    """A BERT encoder with sentence-transformers' mean pooling and
    normalisation, as all-MiniLM-L6-v2 is laid out."""
    from tokenizers import normalizers, pre_tokenizers as pt
    from transformers import BertConfig, BertModel, BertTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pt.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=200, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"],
                                        show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))])
    with tempfile.TemporaryDirectory() as tmp:
        hf = BertTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                               sep_token="[SEP]", mask_token="[MASK]")
        config = BertConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, num_hidden_layers=2,
                            num_attention_heads=4, intermediate_size=64, max_position_embeddings=64)
        torch.manual_seed(3)
        BertModel(config, add_pooling_layer=False).eval().save_pretrained(tmp)
        hf.save_pretrained(tmp)
        encoder_fixture("bert", tmp, "mean")


if __name__ == "__main__":
    main()
