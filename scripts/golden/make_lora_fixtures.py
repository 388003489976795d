#!/usr/bin/env python3
"""Writes the LoRA parity fixtures of tests/fixtures/lora/.

Adapters with seeded random weights over the tiny committed bases, written by
the reference libraries themselves, and what those libraries compute with
them:

- sd15-diffusers/pytorch_lora_weights.safetensors: a PEFT LoRA on the UNet of
  tests/fixtures/image/pipelines/sd15 (r=4, lora_alpha=8 on to_q, to_k, to_v,
  to_out.0 and the 1x1 convolution proj_in; rank_pattern {"to_out.0": 2},
  alpha_pattern {"to_out.0": 2, "proj_in": 2}, so the scales alpha/r are 2,
  1 and 0.5) and on its CLIP text encoder (r=2, lora_alpha=4 on q_proj,
  k_proj, v_proj, out_proj: scale 2), saved by diffusers'
  `StableDiffusionPipeline.save_lora_weights` with each LoraConfig as the
  file's `lora_adapter_metadata` (keys `unet.<module>.lora_A.weight`,
  `text_encoder.<module>.lora_B.weight`, ...).
- sd15-kohya/lora.safetensors: the same base in Kohya's format, written here
  (keys `lora_unet_<module path, '.' -> '_'>.lora_down.weight`,
  `.lora_up.weight`, `.alpha` as a 0-dim tensor; text encoder
  `lora_te_text_model_encoder_layers_<i>_...`). Rank 4, alpha 2 (scale 0.5)
  on the UNet's attention to_q/to_k/to_v/to_out_0, ff_net_2, proj_in (1x1
  convolution) and a 3x3 resnet conv1 (LoCon: lora_down [r, in, 3, 3],
  lora_up [out, r, 1, 1]), and on the text encoder's q_proj, v_proj,
  out_proj and mlp_fc1. diffusers 0.42 loads all of it, the 3x3 convolution
  included; the script checks that every module got its LoRA layer. (The
  text encoder's out_proj is there because diffusers 0.42 tells the old
  `to_q_lora` spelling it converts Kohya's attention keys to by the presence
  of a `to_out_lora` key: without one it drops q_proj and v_proj. Kohya's
  own trainer targets all four projections, so its files are not affected.)
  The text encoder keys keep Kohya's `text_model_` level although
  transformers 5's CLIPTextModel has none; diffusers strips it. Note that
  diffusers' own file (above) has no such level with transformers 5:
  `text_encoder.encoder.layers.<i>....`.
- sd15.json: for seeded UNet and text encoder inputs, the outputs of the
  base and of each adapter at scales 1.0 and 0.5 (`cases`), and whole
  text-to-image runs with an adapter (`runs`, recorded as
  make_pipeline_fixtures.py records runs.json, plus `adapter` and
  `lora_scale`). Each adapter is loaded alone with
  `pipe.load_lora_weights(dir, weight_name=..., adapter_name=...)` and
  scaled with `pipe.set_adapters([name], adapter_weights=[scale])`, which in
  diffusers 0.42 sets the same weight on the UNet and the text encoder (each
  LoRA layer's scaling becomes scale * alpha / r); `cross_attention_kwargs=
  {"scale": s}` scales both as well, and the script checks that it gives the
  UNet the same output. `pipe.unload_lora_weights()` between adapters.
- sdxl-kohya-sgm/lora.safetensors: a Kohya-format LoRA on
  tests/fixtures/image/pipelines/sdxl whose UNet keys use the original
  sgm/LDM UNet's module names, as kohya-ss sd-scripts writes SDXL LoRAs (it
  trains SDXL on that UNet, not on diffusers'): `input_blocks.<i>.<j>`,
  `middle_block.<j>`, `output_blocks.<i>.<j>`; in a resnet `in_layers.2`
  (conv1), `out_layers.3` (conv2), `emb_layers.1` (time_emb_proj) and
  `skip_connection` (conv_shortcut); a downsampler's `op`. The names are
  diffusers' module names put through the inverse of diffusers'
  `_maybe_map_sgm_blocks_to_diffusers` for the UNet's layers_per_block L:
  down block b, layer l is input block 1 + b * (L + 1) + l (inner 0 the
  resnet, 1 the attention), its downsampler input block (b + 1) * (L + 1),
  inner 0; middle_block 0, 1, 2 are resnets.0, attentions.0, resnets.1; up
  block b, layer l is output block b * (L + 1) + l. Rank 4, alpha 2 (scale
  0.5) on every attention's attn1/attn2 to_q, to_k, to_v, to_out_0 and the
  linear proj_in/proj_out, in input, middle and output blocks; on two 3x3
  resnet in_layers_2 (one input, one output block) and a middle block's
  out_layers_3, the downsampler's 3x3 op (all LoCon: lora_down
  [r, in, 3, 3], lora_up [out, r, 1, 1]), an emb_layers_1 (linear) and a
  1x1 skip_connection. Text encoders: layer 0's q_proj, k_proj, v_proj and
  out_proj of both, as `lora_te1_text_model_...` and
  `lora_te2_text_model_...` (transformers 5's CLIPTextModelWithProjection
  still has the `text_model` level, CLIPTextModel not: diffusers strips it
  for the first). diffusers 0.42 loads all of it; the script checks that
  the modules with a LoRA layer are exactly those the file names. Left out:
  upsamplers. diffusers reads an output block's inner index 2 as its
  upsampler, which holds for SDXL's own UNet (every up block with an
  upsampler has attentions there) but not for this tiny one, whose
  attention-less first up block has its upsampler at inner index 1 in sgm
  names (`output_blocks.1.1.conv`, where diffusers' own single-file
  checkpoint converter looks for it too): diffusers' LoRA loader maps that to
  up_blocks.0.attentions.0.conv, which does not exist, and drops the key
  without an error.
- sdxl.json: seeded UNet inputs (sample, timestep, context and the added
  conditions text_embeds, time_ids), one prompt through each tokenizer, the
  diffusers module names the adapter targets (`targets`), and the outputs
  of the UNet and of both text encoders (text_encoder_2's
  `last_hidden_state`, not its projected `text_embeds`) without the adapter
  and with it at scales 1.0 and 0.5 (`cases`), loaded and scaled as for
  SD 1.5 (`set_adapters` sets the weight on all three components).
- <fixture>-peft/ for the golden decoders llama-tf5 and qwen2-tf5: a PEFT
  adapter (r=4, lora_alpha=8 on q_proj, v_proj, o_proj, gate_proj;
  rank_pattern {"o_proj": 2}, alpha_pattern {"gate_proj": 3}: scales 2, 2, 4
  and 0.75) saved by PEFT's `save_pretrained` (adapter_config.json,
  adapter_model.safetensors), and lora.json: transformers' greedy ids (16
  new tokens after the fixture's prompt, as make_fixtures.py generates them)
  of the base, and of the adapter read back with `PeftModel.from_pretrained`
  at scale 1.0 and at 0.5 (PEFT's `LoraLayer.set_scale("default", 0.5)` on
  every LoRA layer: scaling = 0.5 * alpha / r). The adapter's seed is drawn
  again until its ids differ from the base's and every greedy step wins by
  at least make_fixtures.py's MIN_MARGIN at both scales.

The script also merges each adapter by hand into a copy of its base (W +
scale * alpha / r * up @ down, with r and alpha read from the files: the
metadata's patterns, Kohya's `.alpha`, adapter_config.json) and checks that
the libraries give the same outputs (SD 1.5, SDXL) or the same ids (decoders), so
the fixtures pin down what the formats mean. Each recorded run is also made
without a LoRA (not written): every adapter changes the latents.

Run with the benchmark environment's Python (torch CPU, diffusers 0.42,
transformers 5, peft; scripts/bench-python.sh installs it), after
make_fixtures.py and make_image_fixtures.py:

    python scripts/golden/make_lora_fixtures.py
"""

import copy
import json
import os
import re
import shutil
import sys

import numpy as np
import peft
import safetensors
import torch
import transformers
import diffusers
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from make_fixtures import MIN_MARGIN, NEW_TOKENS, greedy  # noqa: E402
from make_pipeline_fixtures import entry, run_once  # noqa: E402

FIXTURES = os.path.join(HERE, "..", "..", "tests", "fixtures")
OUT = os.path.join(FIXTURES, "lora")
SD15 = "image/pipelines/sd15"
SDXL = "image/pipelines/sdxl"
TEXT_PROMPT = "a photo of a cat wearing a red hat"
RUN = dict(prompt="a photo of a cat", negative_prompt="blurry", num_inference_steps=3, guidance_scale=7.5)
DECODERS = ["llama-tf5", "qwen2-tf5"]


def randomize(model, seed, magnitude):
    """Seeded A and B for every LoRA layer (B is zero after PEFT's init)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, module in sorted(model.named_modules(), key=lambda kv: kv[0]):
            if not isinstance(module, LoraLayer):
                continue
            for name in sorted(module.lora_A.keys()):
                a = module.lora_A[name].weight
                b = module.lora_B[name].weight
                fan_in = a[0].numel()
                a.copy_(torch.randn(a.shape, generator=g) / fan_in**0.5)
                b.copy_(torch.randn(b.shape, generator=g) * magnitude / b.shape[1] ** 0.5)


def delta(down, up):
    """up @ down in the shape of the base weight (linear or convolution)."""
    r = down.shape[0]
    d = up.reshape(up.shape[0], r) @ down.reshape(r, -1)
    return d.reshape(up.shape[0], *down.shape[1:])


def merged(model, deltas):
    """A copy of `model` with W += factor * up @ down for each module."""
    m = copy.deepcopy(model)
    with torch.no_grad():
        for path, (down, up, factor) in deltas.items():
            w = m.get_submodule(path).weight
            w += factor * delta(down.float(), up.float()).reshape(w.shape)
    return m


def rel(a, b):
    """Largest difference, as a share of b's range."""
    a, b = np.asarray(a), np.asarray(b)
    return float(np.abs(a - b).max() / (b.max() - b.min()))


def close(a, b, what, tol=1e-4):
    e = rel(a, b)
    assert e < tol, f"{what}: off by {e:.2e} of the range"


# --- SD 1.5 -----------------------------------------------------------------


def sd_outputs(pipe, inputs):
    with torch.no_grad():
        unet = pipe.unet(inputs["sample"], inputs["timestep"], encoder_hidden_states=inputs["context"]).sample
        text = pipe.text_encoder(inputs["ids"])[0]
    return unet.numpy(), text.numpy()


def component_outputs(unet, text_encoder, inputs):
    with torch.no_grad():
        u = unet(inputs["sample"], inputs["timestep"], encoder_hidden_states=inputs["context"]).sample
        t = text_encoder(inputs["ids"])[0]
    return u.numpy(), t.numpy()


def lora_modules(model):
    return sorted(n for n, m in model.named_modules() if isinstance(m, LoraLayer))


def scrub(config_dict):
    d = dict(config_dict)
    d["base_model_name_or_path"] = None
    d["target_modules"] = sorted(d["target_modules"])  # a set: a stable file
    return d


def make_diffusers_adapter(path, out_dir):
    """PEFT adapters on the UNet and the text encoder, saved by diffusers."""
    from diffusers import StableDiffusionPipeline

    pipe = diffusers.DiffusionPipeline.from_pretrained(path, torch_dtype=torch.float32)
    unet_config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in"],
        rank_pattern={"to_out.0": 2}, alpha_pattern={"to_out.0": 2, "proj_in": 2},
    )
    text_config = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "k_proj", "v_proj", "out_proj"])
    pipe.unet.add_adapter(unet_config)
    pipe.text_encoder.add_adapter(text_config)
    randomize(pipe.unet, 11, 0.5)
    randomize(pipe.text_encoder, 12, 0.5)
    shutil.rmtree(out_dir, ignore_errors=True)
    StableDiffusionPipeline.save_lora_weights(
        out_dir,
        unet_lora_layers=get_peft_model_state_dict(pipe.unet),
        text_encoder_lora_layers=get_peft_model_state_dict(pipe.text_encoder),
        unet_lora_adapter_metadata=scrub(pipe.unet.peft_config["default"].to_dict()),
        text_encoder_lora_adapter_metadata=scrub(pipe.text_encoder.peft_config["default"].to_dict()),
        safe_serialization=True,
    )
    return "pytorch_lora_weights.safetensors"


def diffusers_deltas(file):
    """{component: {module: (down, up, alpha / r)}} from the saved file and its
    metadata, read the way a loader without PEFT would."""
    import re

    with safetensors.safe_open(file, "pt") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    out = {}
    for key in tensors:
        if not key.endswith(".lora_A.weight"):
            continue
        component, module = key[: -len(".lora_A.weight")].split(".", 1)
        cfg = {k[len(component) + 1:]: v for k, v in meta.items() if k.startswith(component + ".")}

        def pick(pattern, default):
            for p, v in (pattern or {}).items():
                if re.match(rf"(.*\.)?({p})$", module):
                    return v
            return default

        r = pick(cfg["rank_pattern"], cfg["r"])
        alpha = pick(cfg["alpha_pattern"], cfg["lora_alpha"])
        down, up = tensors[key], tensors[key.replace("lora_A", "lora_B")]
        assert down.shape[0] == r, (key, down.shape, r)
        out.setdefault(component, {})[module] = (down, up, alpha / r)
    return out


def make_kohya_adapter(pipe, out_dir):
    """A Kohya-format LoRA (with a 3x3 LoCon), seeded."""
    unet, te = pipe.unet, pipe.text_encoder
    targets = []
    for name, _ in unet.named_modules():
        last = name.split(".")[-1]
        if name.endswith(("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
                          "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0", "ff.net.2")) \
                or (last == "proj_in" and "attentions" in name):
            targets.append(("unet", name))
    targets.append(("unet", "down_blocks.0.resnets.0.conv1"))
    targets.append(("unet", "up_blocks.1.resnets.0.conv1"))
    for name, _ in te.named_modules():
        if name.endswith(("self_attn.q_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1")):
            targets.append(("text_encoder", name))
    rank, alpha = 4, 2.0
    g = torch.Generator().manual_seed(21)

    def prefix(component, name):
        if component == "unet":
            return "lora_unet_" + name.replace(".", "_")
        return "lora_te_" + kohya_te_path(name)

    _, deltas = write_kohya(pipe, targets, prefix, rank, alpha, g, out_dir)
    return "lora.safetensors", deltas


def kohya_te_path(name):
    """A CLIP text encoder module's path as Kohya writes it: from
    CLIPTextModel's `text_model` level, which transformers 5 no longer has."""
    path = name if name.startswith("text_model.") else "text_model." + name
    return path.replace(".", "_")


def write_kohya(pipe, targets, prefix, rank, alpha, g, out_dir):
    """Writes out_dir/lora.safetensors in Kohya's format: for each (component,
    module) of `targets`, seeded lora_down/lora_up (LoCon on a convolution: a
    kernel-shaped down, a 1x1 up) and alpha under `prefix(component, module)`.
    Returns {prefix: (component, module)} and {component: {module: (down, up,
    alpha / rank)}}."""
    sd, names = {}, {}
    deltas = {component: {} for component, _ in targets}
    for component, name in targets:
        w = getattr(pipe, component).get_submodule(name).weight
        if w.dim() == 4:
            down = torch.randn((rank, *w.shape[1:]), generator=g) / (w[0].numel()) ** 0.5
            up = torch.randn((w.shape[0], rank, 1, 1), generator=g) * 0.5
        else:
            down = torch.randn((rank, w.shape[1]), generator=g) / w.shape[1] ** 0.5
            up = torch.randn((w.shape[0], rank), generator=g) * 0.5
        key = prefix(component, name)
        assert key not in names, key
        names[key] = (component, name)
        sd[f"{key}.lora_down.weight"] = down.contiguous()
        sd[f"{key}.lora_up.weight"] = up.contiguous()
        sd[f"{key}.alpha"] = torch.tensor(alpha)
        deltas[component][name] = (down, up, alpha / rank)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.makedirs(out_dir)
    save_file(sd, os.path.join(out_dir, "lora.safetensors"), metadata={"ss_network_module": "networks.lora"})
    return names, deltas


def scaled(deltas, scale):
    return {k: (d, u, f * scale) for k, (d, u, f) in deltas.items()}


def record_run(pipe, name, seed, adapter, scale):
    scale_factor = pipe.vae_scale_factor
    size = pipe.unet.config.sample_size * scale_factor
    g = torch.Generator().manual_seed(seed + 1000)
    latents = torch.randn((1, pipe.unet.config.in_channels, size // scale_factor, size // scale_factor), generator=g)
    out_latents, taken = run_once(pipe, RUN, seed, latents, None, "latent")
    image, _ = run_once(pipe, RUN, seed, latents, None, "np")
    assert not taken, f"{name}: a deterministic scheduler drew {len(taken)} tensors"
    return {
        "name": name,
        "pipeline": "sd15",
        "class_name": type(pipe).__name__,
        "scheduler": None,
        "prompt": RUN["prompt"],
        "negative_prompt": RUN.get("negative_prompt"),
        "steps": RUN["num_inference_steps"],
        "guidance_scale": RUN["guidance_scale"],
        "width": size,
        "height": size,
        "strength": None,
        "init_image": None,
        "draws": [entry(latents)],
        "latents": entry(out_latents),
        "image": entry(image[0]),
        "adapter": adapter,
        "lora_scale": scale,
    }, out_latents


def sd15():
    path = os.path.join(FIXTURES, SD15)
    pipe = diffusers.DiffusionPipeline.from_pretrained(path, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(7)
    cfg = pipe.unet.config
    inputs = {
        "sample": torch.randn((2, cfg.in_channels, cfg.sample_size, cfg.sample_size), generator=g),
        "timestep": 500,
        "context": torch.randn((2, 8, cfg.cross_attention_dim), generator=g),
    }
    tok = pipe.tokenizer
    ids = tok(TEXT_PROMPT, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt").input_ids
    inputs["ids"] = ids
    base_unet, base_text = copy.deepcopy(pipe.unet), copy.deepcopy(pipe.text_encoder)

    base = sd_outputs(pipe, inputs)
    cases = [{"adapter": None, "scale": 1.0, "unet": entry(base[0]), "text_encoder": entry(base[1])}]
    _, base_latents = record_run(pipe, "sd15-lora-base", 300, None, None)

    diffusers_dir = os.path.join(OUT, "sd15-diffusers")
    weight = make_diffusers_adapter(path, diffusers_dir)
    kohya_dir = os.path.join(OUT, "sd15-kohya")
    kohya_weight, kohya_deltas = make_kohya_adapter(pipe, kohya_dir)
    expected = {
        "sd15-diffusers": diffusers_deltas(os.path.join(diffusers_dir, weight)),
        "sd15-kohya": kohya_deltas,
    }

    runs = []
    plan = [("sd15-diffusers", diffusers_dir, weight, [1.0, 0.5]), ("sd15-kohya", kohya_dir, kohya_weight, [1.0])]
    for adapter, folder, file, run_scales in plan:
        pipe.load_lora_weights(folder, weight_name=file, adapter_name=adapter)
        deltas = expected[adapter]
        for component in ("unet", "text_encoder"):
            got = lora_modules(getattr(pipe, component))
            want = sorted(deltas[component])
            assert got == want, f"{adapter} {component}: LoRA layers on {sorted(set(got) ^ set(want))} differ"
        for scale in (1.0, 0.5):
            pipe.set_adapters([adapter], adapter_weights=[scale])
            out = sd_outputs(pipe, inputs)
            # The same LoRA merged by hand from the file's tensors and alphas.
            ref = component_outputs(
                merged(base_unet, scaled(deltas["unet"], scale)),
                merged(base_text, scaled(deltas["text_encoder"], scale)),
                inputs,
            )
            close(out[0], ref[0], f"{adapter} x{scale} unet vs merged by hand")
            close(out[1], ref[1], f"{adapter} x{scale} text encoder vs merged by hand")
            change = (rel(out[0], base[0]), rel(out[1], base[1]))
            print(f"{adapter} x{scale}: changes the unet by {change[0]:.3f}, the text encoder by {change[1]:.3f} of their ranges")
            assert min(change) > 0.05, f"{adapter} x{scale}: the LoRA hardly changes the outputs"
            cases.append({"adapter": adapter, "scale": scale, "unet": entry(out[0]), "text_encoder": entry(out[1])})
        # cross_attention_kwargs' scale multiplies the adapter weight: the
        # same UNet output as set_adapters' weight.
        pipe.set_adapters([adapter], adapter_weights=[1.0])
        with torch.no_grad():
            via_kwargs = pipe.unet(inputs["sample"], inputs["timestep"], encoder_hidden_states=inputs["context"],
                                   cross_attention_kwargs={"scale": 0.5}).sample.numpy()
        half = np.asarray(cases[-1]["unet"]["data"]).reshape(via_kwargs.shape)
        close(via_kwargs, half, f"{adapter}: cross_attention_kwargs scale vs set_adapters", tol=1e-5)
        for scale in run_scales:
            pipe.set_adapters([adapter], adapter_weights=[scale])
            run, latents = record_run(pipe, f"{adapter}-x{scale}", 300, adapter, scale)
            print(f"{run['name']}: latents differ from the base run's by {rel(latents, base_latents):.3f} of their range")
            assert rel(latents, base_latents) > 0.05
            runs.append(run)
        pipe.unload_lora_weights()
        again = sd_outputs(pipe, inputs)
        assert np.array_equal(again[0], base[0]) and np.array_equal(again[1], base[1]), "unload left a LoRA behind"

    doc = {
        "diffusers_version": diffusers.__version__,
        "transformers_version": transformers.__version__,
        "peft_version": peft.__version__,
        "base": SD15,
        "unet_input": {"sample": entry(inputs["sample"]), "timestep": inputs["timestep"], "context": entry(inputs["context"])},
        "text_input_ids": ids.tolist(),
        "cases": cases,
        "runs": runs,
    }
    with open(os.path.join(OUT, "sd15.json"), "w") as f:
        json.dump(doc, f, separators=(",", ":"))
        f.write("\n")


# --- SDXL -------------------------------------------------------------------

RESNET_SGM = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
              "conv_shortcut": "skip_connection"}


def sgm_name(name, layers_per_block):
    """The sgm/LDM UNet's name of a diffusers UNet module: what diffusers'
    _maybe_map_sgm_blocks_to_diffusers and _convert_unet_lora_key map back
    onto `name` (upsamplers excepted, see the docstring)."""
    per = layers_per_block + 1
    parts = name.split(".")
    inner = {"resnets": 0, "attentions": 1}
    if parts[0] == "down_blocks":
        b, kind, l, rest = int(parts[1]), parts[2], int(parts[3]), parts[4:]
        if kind == "downsamplers":
            assert rest == ["conv"], name
            return f"input_blocks.{(b + 1) * per}.0.op"
        head = f"input_blocks.{1 + b * per + l}.{inner[kind]}"
    elif parts[0] == "mid_block":
        kind, rest = parts[1], parts[3:]
        head = "middle_block." + {("resnets", "0"): "0", ("attentions", "0"): "1", ("resnets", "1"): "2"}[kind, parts[2]]
    elif parts[0] == "up_blocks":
        b, kind, l, rest = int(parts[1]), parts[2], int(parts[3]), parts[4:]
        head = f"output_blocks.{b * per + l}.{inner[kind]}"
    else:
        raise ValueError(name)
    if kind == "resnets":
        rest = [RESNET_SGM[".".join(rest)]]
    return ".".join([head] + rest)


def make_sdxl_kohya_adapter(pipe, out_dir):
    """A Kohya-format SDXL LoRA in the sgm UNet's names (with LoCon), seeded.
    Returns the file's name, {component: {module: (down, up, alpha / r)}} in
    diffusers' module names, and {sgm key prefix: diffusers module}."""
    unet = pipe.unet
    L = unet.config.layers_per_block
    targets = []
    for name, _ in unet.named_modules():
        if ".attentions." in name and name.endswith((
                "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
                "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0", "proj_in", "proj_out")):
            targets.append(("unet", name))
    targets += [("unet", n) for n in (
        "down_blocks.0.resnets.0.conv1",  # input_blocks.1.0.in_layers.2
        "up_blocks.1.resnets.0.conv1",  # output_blocks.2.0.in_layers.2
        "mid_block.resnets.0.conv2",  # middle_block.0.out_layers.3
        "down_blocks.0.downsamplers.0.conv",  # input_blocks.2.0.op
        "down_blocks.1.resnets.0.time_emb_proj",  # input_blocks.3.0.emb_layers.1
        "down_blocks.1.resnets.0.conv_shortcut",  # input_blocks.3.0.skip_connection
    )]
    for component in ("text_encoder", "text_encoder_2"):
        for name, _ in getattr(pipe, component).named_modules():
            if re.search(r"encoder\.layers\.0\.self_attn\.(q|k|v|out)_proj$", name):
                targets.append((component, name))
    rank, alpha = 4, 2.0
    g = torch.Generator().manual_seed(31)

    def prefix(component, name):
        if component == "unet":
            return "lora_unet_" + sgm_name(name, L).replace(".", "_")
        return ("lora_te1_" if component == "text_encoder" else "lora_te2_") + kohya_te_path(name)

    names, deltas = write_kohya(pipe, targets, prefix, rank, alpha, g, out_dir)
    return "lora.safetensors", deltas, names


def sdxl_outputs(unet, text_encoder, text_encoder_2, inputs, **unet_kwargs):
    with torch.no_grad():
        u = unet(inputs["sample"], inputs["timestep"], encoder_hidden_states=inputs["context"],
                 added_cond_kwargs={"text_embeds": inputs["text_embeds"], "time_ids": inputs["time_ids"]},
                 **unet_kwargs).sample
        t1 = text_encoder(inputs["ids"])[0]
        t2 = text_encoder_2(inputs["ids_2"]).last_hidden_state
    return u.numpy(), t1.numpy(), t2.numpy()


def adapter_modules(model, adapter):
    """Modules holding a PEFT lora_A for `adapter`."""
    return sorted(n for n, m in model.named_modules() if isinstance(m, LoraLayer) and adapter in m.lora_A)


def sdxl():
    from diffusers import StableDiffusionXLPipeline

    components = ("unet", "text_encoder", "text_encoder_2")
    path = os.path.join(FIXTURES, SDXL)
    pipe = StableDiffusionXLPipeline.from_pretrained(path, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    cfg = pipe.unet.config
    g = torch.Generator().manual_seed(8)
    text_embeds_dim = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
    inputs = {
        "sample": torch.randn((2, cfg.in_channels, cfg.sample_size, cfg.sample_size), generator=g),
        "timestep": 500,
        "context": torch.randn((2, 8, cfg.cross_attention_dim), generator=g),
        "text_embeds": torch.randn((2, text_embeds_dim), generator=g),
        # original size, crop top-left, target size
        "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0], [96.0, 80.0, 8.0, 16.0, 64.0, 64.0]]),
    }
    for key, tok in (("ids", pipe.tokenizer), ("ids_2", pipe.tokenizer_2)):
        inputs[key] = tok(TEXT_PROMPT, padding="max_length", max_length=tok.model_max_length, truncation=True,
                          return_tensors="pt").input_ids
    bases = [copy.deepcopy(getattr(pipe, c)) for c in components]

    base = sdxl_outputs(*(getattr(pipe, c) for c in components), inputs)
    cases = [{"adapter": None, "scale": 1.0, **{c: entry(o) for c, o in zip(components, base)}}]

    adapter = "sdxl-kohya-sgm"
    folder = os.path.join(OUT, adapter)
    weight, deltas, names = make_sdxl_kohya_adapter(pipe, folder)
    pipe.load_lora_weights(folder, weight_name=weight, adapter_name=adapter)
    for component in components:
        got = adapter_modules(getattr(pipe, component), adapter)
        want = sorted(deltas[component])
        assert got == want, f"{adapter} {component}: LoRA layers on {sorted(set(got) ^ set(want))} differ"
    for scale in (1.0, 0.5):
        pipe.set_adapters([adapter], adapter_weights=[scale])
        out = sdxl_outputs(*(getattr(pipe, c) for c in components), inputs)
        ref = sdxl_outputs(*(merged(b, scaled(deltas[c], scale)) for b, c in zip(bases, components)), inputs)
        for c, o, r, b in zip(components, out, ref, base):
            close(o, r, f"{adapter} x{scale} {c} vs merged by hand")
        change = [rel(o, b) for o, b in zip(out, base)]
        print(f"{adapter} x{scale}: changes " + ", ".join(f"the {c} by {x:.3f}" for c, x in zip(components, change))
              + " of their ranges")
        assert min(change) > 0.05, f"{adapter} x{scale}: the LoRA hardly changes the outputs"
        cases.append({"adapter": adapter, "scale": scale, **{c: entry(o) for c, o in zip(components, out)}})
    # cross_attention_kwargs' scale multiplies the adapter weight here too.
    pipe.set_adapters([adapter], adapter_weights=[1.0])
    via_kwargs = sdxl_outputs(*(getattr(pipe, c) for c in components), inputs,
                              cross_attention_kwargs={"scale": 0.5})[0]
    half = np.asarray(cases[-1]["unet"]["data"]).reshape(via_kwargs.shape)
    close(via_kwargs, half, f"{adapter}: cross_attention_kwargs scale vs set_adapters", tol=1e-5)
    pipe.unload_lora_weights()
    again = sdxl_outputs(*(getattr(pipe, c) for c in components), inputs)
    assert all(np.array_equal(a, b) for a, b in zip(again, base)), "unload left a LoRA behind"
    for prefix, (component, name) in sorted(names.items()):
        print(f"  {prefix} -> {component}.{name}")

    doc = {
        "diffusers_version": diffusers.__version__,
        "transformers_version": transformers.__version__,
        "peft_version": peft.__version__,
        "base": SDXL,
        "unet_input": {
            "sample": entry(inputs["sample"]),
            "timestep": inputs["timestep"],
            "context": entry(inputs["context"]),
            "text_embeds": entry(inputs["text_embeds"]),
            "time_ids": entry(inputs["time_ids"]),
        },
        "text_input_ids": inputs["ids"].tolist(),
        "text_input_ids_2": inputs["ids_2"].tolist(),
        "targets": {c: sorted(deltas[c]) for c in components},
        "cases": cases,
    }
    with open(os.path.join(OUT, "sdxl.json"), "w") as f:
        json.dump(doc, f, separators=(",", ":"))
        f.write("\n")


# --- decoders ---------------------------------------------------------------


def load_base(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()


def decoder_config():
    return LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj", "gate_proj"],
        rank_pattern={"o_proj": 2}, alpha_pattern={"gate_proj": 3}, task_type="CAUSAL_LM",
    )


def set_scale(model, scale):
    for module in model.modules():
        if isinstance(module, LoraLayer):
            module.set_scale("default", scale)


def generate_scales(model, ids, eos):
    out = []
    for scale in (1.0, 0.5):
        set_scale(model, scale)
        out.append(greedy(model, ids, eos))
    set_scale(model, 1.0)
    return out


def clear(new, margin, base_ids):
    return margin >= MIN_MARGIN and len(new) == NEW_TOKENS and new != base_ids


def decoder(fixture):
    path = os.path.join(FIXTURES, "golden", fixture)
    with open(os.path.join(path, "golden.json")) as f:
        golden = json.load(f)
    ids = golden["prompt_ids"]
    base = load_base(path)
    eos = base.config.eos_token_id
    base_ids, base_margin = greedy(base, ids, eos)
    assert base_ids == golden["token_ids"], f"{fixture}: the base no longer gives golden.json's ids"
    for seed in range(1, 200):
        model = get_peft_model(load_base(path), decoder_config())
        randomize(model, seed, 1.0)
        (ids1, m1), (ids05, m05) = generate_scales(model, ids, eos)
        if clear(ids1, m1, base_ids) and clear(ids05, m05, base_ids) and ids1 != ids05:
            break
    else:
        sys.exit(f"{fixture}: no seed gave clear margins")
    out_dir = os.path.join(OUT, f"{fixture}-peft")
    shutil.rmtree(out_dir, ignore_errors=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    for extra in os.listdir(out_dir):
        if extra not in ("adapter_config.json", "adapter_model.safetensors"):
            os.remove(os.path.join(out_dir, extra))
    # PEFT writes where the base was loaded from; the base is "base" in lora.json.
    config_path = os.path.join(out_dir, "adapter_config.json")
    with open(config_path) as f:
        written = json.load(f)
    written["base_model_name_or_path"] = None
    written["target_modules"] = sorted(written["target_modules"])
    with open(config_path, "w") as f:
        json.dump(written, f, indent=2, sort_keys=True)

    # The reference: the adapter as PEFT reads it back from the files.
    loaded = PeftModel.from_pretrained(load_base(path), out_dir).eval()
    cases = []
    for scale, (new, margin), before in zip((1.0, 0.5), generate_scales(loaded, ids, eos), (ids1, ids05)):
        assert new == before and margin >= MIN_MARGIN, f"{fixture} x{scale}: reloaded adapter gives {new}, not {before}"
        cases.append({"scale": scale, "ids": new, "min_margin": round(margin, 4)})

    # The same by hand: factor * B @ A merged into the base's weights.
    import re

    cfg = json.load(open(os.path.join(out_dir, "adapter_config.json")))
    with safetensors.safe_open(os.path.join(out_dir, "adapter_model.safetensors"), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    for case in cases:
        deltas = {}
        for key in tensors:
            if key.endswith(".lora_A.weight"):
                module = key[len("base_model.model."): -len(".lora_A.weight")]
                pick = lambda pattern, default: next(
                    (v for p, v in pattern.items() if re.match(rf"(.*\.)?({p})$", module)), default)
                r, alpha = pick(cfg["rank_pattern"], cfg["r"]), pick(cfg["alpha_pattern"], cfg["lora_alpha"])
                assert tensors[key].shape[0] == r
                deltas[module] = (tensors[key], tensors[key.replace("lora_A", "lora_B")], case["scale"] * alpha / r)
        by_hand, _ = greedy(merged(load_base(path), deltas), ids, eos)
        assert by_hand == case["ids"], f"{fixture} x{case['scale']}: merged by hand gives {by_hand}"

    doc = {
        "peft_version": peft.__version__,
        "transformers_version": transformers.__version__,
        "torch": torch.__version__.split("+")[0],
        "base": f"golden/{fixture}",
        "prompt": golden["prompt"],
        "prompt_ids": ids,
        "max_tokens": NEW_TOKENS,
        "seed": seed,
        "base_ids": base_ids,
        "cases": cases,
    }
    with open(os.path.join(out_dir, "lora.json"), "w") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")
    print(f"{fixture}-peft: seed {seed}, margins {cases[0]['min_margin']} / {cases[1]['min_margin']}, "
          f"ids x1 {cases[0]['ids']}, x0.5 {cases[1]['ids']}, base {base_ids}")


def main():
    os.makedirs(OUT, exist_ok=True)
    torch.manual_seed(0)
    for fixture in DECODERS:
        decoder(fixture)
    sd15()
    sdxl()


if __name__ == "__main__":
    main()
