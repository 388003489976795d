#!/usr/bin/env python3
"""Writes the UNet parity fixtures of tests/fixtures/image/unet/.

Each fixture is a tiny random-weight `UNet2DConditionModel` built by
diffusers itself from a config in the form of one Stable Diffusion release
(scaled down: few channels, few groups, a small cross-attention width), saved
with diffusers' own `save_pretrained` (config.json +
diffusion_pytorch_model.safetensors, float32), and `reference.json` beside it
holds fixed inputs and what diffusers' `UNet2DConditionModel.forward`
computed from them (float32, batch 2, several timesteps). The Rust test in
models/src/image/unet.rs loads each fixture on the CPU and compares,
with no torch needed.

    python scripts/golden/make_unet_fixtures.py

Shapes:
- sd15: SD 1.5's form: CrossAttn x3 + a plain last down block, two layers
  per block, `attention_head_dim` an int (the number of heads), conv
  projections in the transformers.
- sd21: SD 2.1 (768-v): `attention_head_dim` a list, `use_linear_projection`
  and `upcast_attention` true; the latents are 10x12, not a multiple of the
  total upsampling factor, so the up blocks upsample to the skip's size.
- sdxl: SDXL base: a plain first down block, `transformer_layers_per_block` a
  list, `text_time` added conditioning (text_embeds + 6 time ids).
- sdxl_refiner: the refiner's shape: plain first and last down blocks, an int
  `transformer_layers_per_block`, 5 time ids, and `downsample_padding` 0,
  `mid_block_scale_factor`, `center_input_sample` and `freq_shift` changed
  from their defaults so that the tests see them honoured.

Weights: diffusers' own seeded initialisation, then every norm's weight and
bias drawn around 1 and 0 (they initialise to exactly 1 and 0, which would
hide a swapped or missing affine), and the output conv scaled up so that the
outputs are of order 1.

NOTE (config forms): the fixtures' config.json are written by the installed
diffusers (0.42.1), which writes every `__init__` argument, nulls included
(`attention_type`, `dropout`, `reverse_transformer_layers_per_block`, ...).
Older releases wrote fewer keys: the hub configs of SD 1.5 (written by
0.6.0, 19 keys), SD 2.1 (0.10.0.dev0) and SDXL (0.19.0.dev0) are parsed as
literals by the config tests in unet.rs, so both ends are covered; only a
release that adds a key would matter (Mora refuses keys it does not know).
To see the form another release writes, install it in a scratch venv
(`pip install diffusers==0.41.0 torch numpy`), run this script there with
`OUT=/tmp/unet-other`, and diff the config.json files against these; the
reference outputs should agree to float32 rounding as well.
"""

import json
import os

import numpy as np
import torch
import diffusers
from diffusers import UNet2DConditionModel

OUT = os.environ.get("OUT") or os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "..", "..", "tests", "fixtures", "image", "unet"
)
TIMESTEPS = [999, 1, 500.5]
BATCH = 2
SEQ = 7
CROSS = 32

CONFIGS = {
    "sd15": dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=[8, 8, 16, 16],
        layers_per_block=2,
        down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        attention_head_dim=2,
        cross_attention_dim=CROSS,
        norm_num_groups=4,
    ),
    "sd21": dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=[8, 16, 16],
        layers_per_block=1,
        down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        attention_head_dim=[2, 4, 4],
        cross_attention_dim=CROSS,
        norm_num_groups=4,
        use_linear_projection=True,
        upcast_attention=True,
    ),
    "sdxl": dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=[8, 16, 16],
        layers_per_block=2,
        down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        attention_head_dim=[1, 2, 4],
        transformer_layers_per_block=[1, 1, 2],
        cross_attention_dim=CROSS,
        norm_num_groups=4,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=24 + 6 * 8,
    ),
    "sdxl_refiner": dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=[8, 8, 16, 16],
        layers_per_block=1,
        down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        attention_head_dim=[1, 2, 4, 4],
        transformer_layers_per_block=2,
        cross_attention_dim=CROSS,
        norm_num_groups=2,
        norm_eps=1e-4,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=24 + 5 * 8,
        downsample_padding=0,
        mid_block_scale_factor=1.5,
        center_input_sample=True,
        freq_shift=1,
        flip_sin_to_cos=False,
    ),
}
# The latents' height and width, per fixture.
SIZES = {"sd15": (8, 8), "sd21": (10, 12), "sdxl": (8, 8), "sdxl_refiner": (8, 8)}
TEXT_EMBEDS = 24


def tensor_json(t):
    a = t.detach().to(torch.float32).numpy()
    # 9 significant digits give back the float32 exactly.
    return {"shape": list(a.shape), "data": [float(f"{x:.9g}") for x in a.reshape(-1)]}


def make(name, cfg, seed):
    torch.manual_seed(seed)
    model = UNet2DConditionModel(**cfg).eval()
    g = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname and pname.endswith(".weight") and p.dim() == 1:
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
            elif "norm" in pname and pname.endswith(".bias"):
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
        model.conv_out.weight.mul_(4.0)
    out = os.path.join(OUT, name)
    os.makedirs(out, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)

    rng = np.random.default_rng(seed)
    h, w = SIZES[name]
    sample = torch.from_numpy(rng.standard_normal((BATCH, cfg["in_channels"], h, w)).astype(np.float32))
    ehs = torch.from_numpy(rng.standard_normal((BATCH, SEQ, CROSS)).astype(np.float32))
    ref = {"sample": tensor_json(sample), "encoder_hidden_states": tensor_json(ehs), "cases": []}
    added = None
    if cfg.get("addition_embed_type") == "text_time":
        n_ids = (cfg["projection_class_embeddings_input_dim"] - TEXT_EMBEDS) // cfg["addition_time_embed_dim"]
        text_embeds = torch.from_numpy(rng.standard_normal((BATCH, TEXT_EMBEDS)).astype(np.float32))
        if n_ids == 6:  # original size, crop top-left, target size
            ids = [[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0], [768.0, 1024.0, 16.0, 8.0, 1024.0, 1024.0]]
        else:  # original size, crop top-left, aesthetic score
            ids = [[1024.0, 1024.0, 0.0, 0.0, 6.0], [768.0, 1024.0, 16.0, 8.0, 2.5]]
        time_ids = torch.tensor(ids, dtype=torch.float32)
        added = {"text_embeds": text_embeds, "time_ids": time_ids}
        ref["text_embeds"] = tensor_json(text_embeds)
        ref["time_ids"] = tensor_json(time_ids)
    with torch.no_grad():
        for t in TIMESTEPS:
            y = model(sample, t, encoder_hidden_states=ehs, added_cond_kwargs=added).sample
            ref["cases"].append({"timestep": float(t), "output": tensor_json(y)})
            print(f"{name} t={t}: max |out| {y.abs().max().item():.3f}, mean |out| {y.abs().mean().item():.3f}")
    ref["diffusers_version"] = diffusers.__version__
    with open(os.path.join(out, "reference.json"), "w") as f:
        json.dump(ref, f)
    n = sum(p.numel() for p in model.parameters())
    print(f"{name}: {n} parameters")


def main():
    torch.set_num_threads(2)
    for i, (name, cfg) in enumerate(CONFIGS.items()):
        make(name, cfg, 1234 + i)


if __name__ == "__main__":
    main()
