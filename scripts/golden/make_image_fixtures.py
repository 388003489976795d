#!/usr/bin/env python3
"""Writes the image parity fixtures of tests/fixtures/image/pipelines/.

Three tiny random-weight Stable Diffusion pipelines, each written by
diffusers' own `save_pretrained` in the full diffusers layout
(model_index.json, scheduler/, text_encoder/, tokenizer/, unet/, vae/, and for
SDXL text_encoder_2/ and tokenizer_2/):

- `sd15`: StableDiffusionPipeline, CLIPTextModel with quick_gelu, the PNDM
  scheduler config SD 1.5 ships, a tokenizer padding with `<|endoftext|>` in
  the form of the official repos (vocab.json, merges.txt,
  tokenizer_config.json, special_tokens_map.json; no tokenizer.json);
- `sd21`: gelu text encoder, v_prediction DDIM as SD 2.1 ships, a tokenizer
  padding with `!`, in the official form plus tokenizer.json;
- `sdxl`: StableDiffusionXLPipeline, two text encoders (the second
  CLIPTextModelWithProjection, gelu, new-style `eos_token_id`),
  EulerDiscrete, tokenizers as transformers 5 saves them (tokenizer.json and
  tokenizer_config.json only).

The tokenizers share one small real CLIP BPE vocabulary (byte-level, `</w>`
word ends) learnt here from a fixed corpus the way CLIP's merges are: the 256
byte symbols, the same with `</w>`, the merges, then `<|startoftext|>` and
`<|endoftext|>`.

Beside each pipeline, `reference.json` holds what transformers and diffusers
compute from the files: the ids each tokenizer gives for a few prompts
(`padding="max_length"`, `max_length=model_max_length`, `truncation=True`),
the text encoders' last_hidden_state, hidden_states[-2] and pooled output
(text_embeds for the projection variant) for two prompts, a VAE decode of
fixed seeded latents [1, 4, 8, 8] and the encode (mean, std) of a fixed
seeded image [1, 3, 16, 16].

Run with the benchmark environment's Python (torch CPU, diffusers,
transformers):

    python scripts/golden/make_image_fixtures.py

Weights are drawn from fixed seeds with a spread of 1/sqrt(fan_in) (norm
scales around 1, biases around 0), so that outputs are of order one.
"""

import json
import os
import shutil

import torch
import transformers
import diffusers
from tokenizers import Regex, pre_tokenizers
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tests", "fixtures", "image", "pipelines")
MAX_LEN = 77
HIDDEN = 32
N_MERGES = 320

CORPUS = """
a photograph of an astronaut riding a horse on the moon, highly detailed, 4k
a painting of a red cat sitting on a chair by the window, oil on canvas
portrait of a young woman with long hair, studio lighting, sharp focus
a beautiful landscape with mountains and a lake at sunset, trending on artstation
an old castle in the forest, fantasy art, digital painting, concept art
a cute dog wearing a hat, cartoon style, colorful, high quality
the city at night with neon lights and rain, cinematic, photorealistic
a bowl of fruit on a wooden table, still life, soft light
a spaceship flying over a desert planet, science fiction, matte painting
a close up photo of a flower with water drops, macro photography
a watercolor painting of a small house near the river in spring
a man and a woman walking on the beach with their dog, golden hour
an elephant in the savanna, national geographic, wildlife photography
a robot playing the piano in a dark room, dramatic lighting
the cat and the dog are sleeping together on the bed
a bright blue sky with white clouds over green fields
a detailed drawing of a dragon breathing fire, black and white
it's a beautiful day, isn't it? they're happy and we'll see
a photo of a horse running in the snow, winter morning, fog
a painting of the sea with a ship and a storm, dramatic clouds
a highly detailed portrait of an old man with a beard, oil painting
a house in the mountains with snow on the roof, cozy, warm light
a beautiful garden with red and white roses, sunny day
a photograph of a street in paris at night, rain, reflections
a cat sitting on a window looking at the birds in the tree
a forest with tall trees and a river running through it
a cinematic shot of a woman walking in the city at sunset
an astronaut standing on the moon looking at the earth
a digital painting of a castle on a hill, fantasy landscape
a red car driving on a mountain road, photorealistic, 8k
a small boat on a calm lake in the morning, mist, mountains
a portrait photo of a smiling child, natural light, bokeh
a drawing of a horse and a rider, pencil sketch, detailed
"""


def bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def learn_bpe():
    """CLIP-form vocabulary and merges learnt from CORPUS."""
    pre = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(
                Regex(r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""), behavior="removed", invert=True
            ),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    freq = {}
    for line in CORPUS.strip().lower().split("\n"):
        for word, _ in pre.pre_tokenize_str(" ".join(line.split())):
            symbols = tuple(word[:-1]) + (word[-1] + "</w>",)
            freq[symbols] = freq.get(symbols, 0) + 1
    merges = []
    for _ in range(N_MERGES):
        pairs = {}
        for symbols, f in freq.items():
            for a, b in zip(symbols, symbols[1:]):
                pairs[(a, b)] = pairs.get((a, b), 0) + f
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        if pairs[best] < 2:
            break
        merges.append(best)
        merged = {}
        for symbols, f in freq.items():
            out = []
            i = 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    out.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            merged[tuple(out)] = merged.get(tuple(out), 0) + f
        freq = merged
    byte_symbols = list(bytes_to_unicode().values())
    vocab = byte_symbols + [s + "</w>" for s in byte_symbols]
    for a, b in merges:
        if a + b not in vocab:
            vocab.append(a + b)
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(vocab)}, merges


def added_token(content):
    return {"content": content, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}


def write_official_tokenizer(folder, vocab, merges, pad):
    """The four files of the official SD 1.5 / 2.1 / XL tokenizer folders."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    special = {
        "bos_token": added_token("<|startoftext|>"),
        "eos_token": added_token("<|endoftext|>"),
        "pad_token": pad if pad == "!" else "<|endoftext|>",
        "unk_token": added_token("<|endoftext|>"),
    }
    with open(os.path.join(folder, "special_tokens_map.json"), "w") as f:
        json.dump(special, f, indent=2)
    config = {
        "add_prefix_space": False,
        "bos_token": {"__type": "AddedToken", **added_token("<|startoftext|>")},
        "do_lower_case": True,
        "eos_token": {"__type": "AddedToken", **added_token("<|endoftext|>")},
        "errors": "replace",
        "model_max_length": MAX_LEN,
        "name_or_path": "openai/clip-vit-large-patch14",
        "pad_token": pad,
        "special_tokens_map_file": "./special_tokens_map.json",
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": {"__type": "AddedToken", **added_token("<|endoftext|>")},
    }
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)


def randomize(model, seed, half=False):
    """Seeded weights of order one: std 1/sqrt(fan_in), norm scales near 1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if p.ndim == 1:
                base = 1.0 if name.endswith("weight") else 0.0
                p.copy_(base + 0.2 * torch.randn(p.shape, generator=g))
            elif "embedding" in name and p.ndim == 2:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) / fan_in**0.5)
            if half:
                # Stored as float16: the reference is computed from exactly
                # the weights the file holds.
                p.copy_(p.half().float())
    return model


def text_encoder(seed, vocab, act, with_projection, legacy_eos):
    cfg = CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_LEN,
        hidden_act=act,
        layer_norm_eps=1e-5,
        projection_dim=HIDDEN,
        bos_token_id=vocab["<|startoftext|>"],
        # The official checkpoints say 2 (pooled at argmax(input_ids)); newer
        # ones give the real end-of-text id (pooled at its first position).
        eos_token_id=2 if legacy_eos else vocab["<|endoftext|>"],
        pad_token_id=1,
        architectures=["CLIPTextModelWithProjection" if with_projection else "CLIPTextModel"],
    )
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return randomize(cls(cfg), seed).eval()


def vae(seed, scaling_factor, force_upcast):
    m = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        act_fn="silu",
        latent_channels=4,
        norm_num_groups=8,
        sample_size=16,
        scaling_factor=scaling_factor,
        force_upcast=force_upcast,
    )
    return randomize(m, seed, half=True).eval()


def unet(seed, xl):
    common = dict(
        block_out_channels=(16, 32),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        norm_num_groups=8,
    )
    if xl:
        m = UNet2DConditionModel(
            **common,
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            transformer_layers_per_block=(1, 1),
            projection_class_embeddings_input_dim=6 * 8 + HIDDEN,
            cross_attention_dim=2 * HIDDEN,
        )
    else:
        m = UNet2DConditionModel(**common, attention_head_dim=4, cross_attention_dim=HIDDEN)
    return randomize(m, seed, half=True).eval()


SCHEDULERS = {
    # As runwayml/stable-diffusion-v1-5 ships it.
    "sd15": (
        PNDMScheduler,
        {
            "beta_end": 0.012,
            "beta_schedule": "scaled_linear",
            "beta_start": 0.00085,
            "num_train_timesteps": 1000,
            "set_alpha_to_one": False,
            "skip_prk_steps": True,
            "steps_offset": 1,
            "trained_betas": None,
            "clip_sample": False,
        },
    ),
    # As stabilityai/stable-diffusion-2-1 ships it.
    "sd21": (
        DDIMScheduler,
        {
            "beta_end": 0.012,
            "beta_schedule": "scaled_linear",
            "beta_start": 0.00085,
            "clip_sample": False,
            "num_train_timesteps": 1000,
            "prediction_type": "v_prediction",
            "set_alpha_to_one": False,
            "skip_prk_steps": True,
            "steps_offset": 1,
            "trained_betas": None,
        },
    ),
    # As stabilityai/stable-diffusion-xl-base-1.0 ships it.
    "sdxl": (
        EulerDiscreteScheduler,
        {
            "beta_end": 0.012,
            "beta_schedule": "scaled_linear",
            "beta_start": 0.00085,
            "clip_sample": False,
            "interpolation_type": "linear",
            "num_train_timesteps": 1000,
            "prediction_type": "epsilon",
            "sample_max_value": 1.0,
            "set_alpha_to_one": False,
            "skip_prk_steps": True,
            "steps_offset": 1,
            "timestep_spacing": "leading",
            "trained_betas": None,
            "use_karras_sigmas": False,
        },
    ),
}

PROMPTS = [
    "a photograph of an astronaut riding a horse",
    "A Photograph of an ASTRONAUT, riding a horse!!! (4k, HDR) -- it's \"great\"; isn't it?",
    "   multiple   spaces\tand\nnewlines  ",
    "cafe\u0301 naïve \u2014 東京 😀 1234 x 56.7",
    "<|endoftext|> inside <|startoftext|> the text",
    "<|ENDOFTEXT|> We'LL DON'T it’s C++ @user #tag a_b x2 3.14 ...",
    "Ünïcödé: İstanbul ﬁ ½ Ⅻ straße​mañana",
    " ".join(["a red cat on the mat"] * 20),
    "",
]
ENCODER_PROMPTS = [PROMPTS[1], ""]


def floats(t):
    return [float(f"{v:.7g}") for v in t.detach().to(torch.float32).reshape(-1).tolist()]


def tensor_entry(t):
    return {"shape": list(t.shape), "data": floats(t)}


def tokenizer_from(vocab, merges, pad, tmp):
    write_official_tokenizer(tmp, vocab, merges, pad)
    return CLIPTokenizer.from_pretrained(tmp)


def encode_reference(tok, te):
    ids = tok(ENCODER_PROMPTS, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        out = te(ids, output_hidden_states=True)
    pooled = out.text_embeds if isinstance(te, CLIPTextModelWithProjection) else out.pooler_output
    return {
        "prompts": ENCODER_PROMPTS,
        "input_ids": ids.tolist(),
        "last_hidden_state": tensor_entry(out.last_hidden_state),
        "penultimate": tensor_entry(out.hidden_states[-2]),
        "pooled": tensor_entry(pooled),
    }


def vae_reference(v, seed):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn((1, 4, 8, 8), generator=g)
    image = torch.rand((1, 3, 16, 16), generator=g) * 2 - 1
    with torch.no_grad():
        decoded = v.decode(latents).sample
        dist = v.encode(image).latent_dist
    return {
        "latents": tensor_entry(latents),
        "decode": tensor_entry(decoded),
        "image": tensor_entry(image),
        "encode_mean": tensor_entry(dist.mean),
        "encode_std": tensor_entry(dist.std),
    }


def tokenizer_reference(folder):
    # Loaded back from the files as written, as a pipeline would.
    tok = CLIPTokenizer.from_pretrained(folder)
    ids = [tok(p, padding="max_length", max_length=tok.model_max_length, truncation=True).input_ids for p in PROMPTS]
    return {"model_max_length": tok.model_max_length, "pad_token": tok.pad_token, "ids": ids}


def main():
    torch.manual_seed(0)
    vocab, merges = learn_bpe()
    tmp = os.path.join(OUT, "..", "_tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for name, seed in (("sd15", 10), ("sd21", 20), ("sdxl", 30)):
        out = os.path.join(OUT, name)
        shutil.rmtree(out, ignore_errors=True)
        sched_cls, sched_cfg = SCHEDULERS[name]
        scheduler = sched_cls.from_config(sched_cfg)
        if name == "sdxl":
            tok = tokenizer_from(vocab, merges, "<|endoftext|>", os.path.join(tmp, "t1"))
            tok2 = tokenizer_from(vocab, merges, "!", os.path.join(tmp, "t2"))
            te = text_encoder(seed + 1, vocab, "quick_gelu", False, True)
            te2 = text_encoder(seed + 2, vocab, "gelu", True, False)
            v = vae(seed + 3, 0.13025, True)
            pipe = StableDiffusionXLPipeline(
                vae=v, text_encoder=te, text_encoder_2=te2, tokenizer=tok, tokenizer_2=tok2,
                unet=unet(seed + 4, True), scheduler=scheduler,
            )
            encoders = {"text_encoder": (tok, te), "text_encoder_2": (tok2, te2)}
        else:
            pad = "<|endoftext|>" if name == "sd15" else "!"
            tok = tokenizer_from(vocab, merges, pad, os.path.join(tmp, "t1"))
            te = text_encoder(seed + 1, vocab, "quick_gelu" if name == "sd15" else "gelu", False, True)
            v = vae(seed + 3, 0.18215, name == "sd21")
            pipe = StableDiffusionPipeline(
                vae=v, text_encoder=te, tokenizer=tok, unet=unet(seed + 4, False), scheduler=scheduler,
                safety_checker=None, feature_extractor=None, requires_safety_checker=False,
            )
            encoders = {"text_encoder": (tok, te)}
        reference = {
            "transformers_version": transformers.__version__,
            "diffusers_version": diffusers.__version__,
            "prompts": PROMPTS,
            "tokenizers": {},
            "text_encoders": {},
            "vae": vae_reference(v, seed + 5),
        }
        # The UNet and the VAE are stored as float16 to keep the fixtures small
        # (their weights were rounded to float16 before anything was computed).
        pipe.unet.half()
        pipe.vae.half()
        pipe.save_pretrained(out, safe_serialization=True)
        # The official repos' tokenizer folders: sd15 without tokenizer.json,
        # sd21 with it beside the four files; sdxl keeps what transformers 5 writes.
        if name in ("sd15", "sd21"):
            folder = os.path.join(out, "tokenizer")
            shutil.rmtree(folder)
            write_official_tokenizer(folder, vocab, merges, "<|endoftext|>" if name == "sd15" else "!")
            if name == "sd21":
                tok.save_pretrained(os.path.join(tmp, "fast"))
                shutil.copy(os.path.join(tmp, "fast", "tokenizer.json"), folder)
        for enc_name, (t, e) in encoders.items():
            tok_folder = "tokenizer" if enc_name == "text_encoder" else "tokenizer_2"
            reference["tokenizers"][tok_folder] = tokenizer_reference(os.path.join(out, tok_folder))
            reference["text_encoders"][enc_name] = encode_reference(t, e)
        # Both forms of a tokenizer folder must give the same ids.
        if name == "sd21":
            only_fast = os.path.join(tmp, "only_fast")
            os.makedirs(only_fast, exist_ok=True)
            for f in ("tokenizer.json", "tokenizer_config.json"):
                shutil.copy(os.path.join(out, "tokenizer", f), only_fast)
            assert tokenizer_reference(only_fast)["ids"] == reference["tokenizers"]["tokenizer"]["ids"]
        with open(os.path.join(out, "reference.json"), "w") as f:
            json.dump(reference, f, separators=(",", ":"), ensure_ascii=False)
            f.write("\n")
        total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(out) for f in fs)
        print(f"{name}: {total / 1e6:.2f} MB")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
