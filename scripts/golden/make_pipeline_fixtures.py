#!/usr/bin/env python3
"""Writes tests/fixtures/image/pipelines/runs.json: whole pipeline runs.

The fixture pipelines of tests/fixtures/image/pipelines/ (written by
make_image_fixtures.py through diffusers' own `save_pretrained`) are loaded
back with diffusers' `from_pretrained` and run end to end by diffusers'
own pipeline classes: text to image (StableDiffusionPipeline,
StableDiffusionXLPipeline) and image to image (their Img2Img variants), with
and without classifier-free guidance and a negative prompt, on the pipeline's
own scheduler and on an override, deterministic and ancestral.

Each run records what Mora needs to repeat it and what diffusers gave:
- `draws`: every standard-normal tensor the run consumed, in the order Mora's
  pipeline draws them (the initial latents or the img2img noise, then the
  VAE encoder's sample, then each stochastic scheduler step's noise). diffusers
  draws through `randn_tensor`; the script replaces it with a function that
  hands out seeded tensors and records which caller took each one, and a
  text-to-image run gets its initial latents through `latents=`;
- `latents`: the denoised latents (`output_type="latent"`), before the VAE;
- `image`: the decoded picture as floats in [0, 1] (`output_type="np"`),
  [H, W, 3], which Mora rounds to 8 bits as diffusers' PIL conversion does.

models/src/image/pipeline.rs replays each run on the CPU without torch
(`every_fixture_run_matches_diffusers`). Run with the benchmark
environment's Python (torch CPU, diffusers 0.42, transformers 5), after
make_image_fixtures.py:

    python scripts/golden/make_pipeline_fixtures.py
"""

import inspect
import json
import os
import sys

import numpy as np
import torch
import transformers
import diffusers
from PIL import Image
from diffusers import (
    EulerAncestralDiscreteScheduler,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLPipeline,
)

HERE = os.path.dirname(os.path.abspath(__file__))
PIPELINES = os.path.join(HERE, "..", "..", "tests", "fixtures", "image", "pipelines")

# name, pipeline folder, img2img, scheduler override, call arguments
RUNS = [
    ("sd15-pndm", "sd15", False, None,
     dict(prompt="a photo of a cat", negative_prompt="blurry", num_inference_steps=4, guidance_scale=7.5)),
    ("sd15-img2img", "sd15", True, None,
     dict(prompt="a watercolour of a cat", num_inference_steps=5, guidance_scale=7.5, strength=0.6)),
    ("sd21-ddim-v", "sd21", False, None,
     dict(prompt="a photo of a dog", negative_prompt="dark", num_inference_steps=3, guidance_scale=6.0, width=24, height=16)),
    ("sd21-turbo", "sd21", False, "EulerAncestralDiscreteScheduler",
     dict(prompt="a red bicycle", num_inference_steps=2, guidance_scale=0.0)),
    ("sdxl-euler", "sdxl", False, None,
     dict(prompt="a lighthouse at dusk", num_inference_steps=3, guidance_scale=5.0)),
    ("sdxl-img2img", "sdxl", True, None,
     dict(prompt="an oil painting of a lighthouse", negative_prompt="text", num_inference_steps=4, guidance_scale=5.0, strength=0.5)),
]
OVERRIDES = {"EulerAncestralDiscreteScheduler": EulerAncestralDiscreteScheduler}


class Draws:
    """Stands in for diffusers' `randn_tensor`: seeded tensors, each recorded
    with the function that asked for it."""

    def __init__(self, seed):
        self.generator = torch.Generator().manual_seed(seed)
        self.taken = []

    def __call__(self, shape, generator=None, device=None, dtype=None, layout=None):
        t = torch.randn(tuple(shape), generator=self.generator, dtype=torch.float32)
        self.taken.append((inspect.stack()[1].function, t))
        return t.to(dtype=dtype or torch.float32)


def install(draws):
    for name, module in list(sys.modules.items()):
        if name.startswith("diffusers") and hasattr(module, "randn_tensor"):
            module.randn_tensor = draws


def floats(t):
    return [float(f"{v:.7g}") for v in np.asarray(t, dtype=np.float32).reshape(-1).tolist()]


def entry(t):
    t = np.asarray(t, dtype=np.float32)
    return {"shape": list(t.shape), "data": floats(t)}


def run_once(pipe, args, seed, latents, init, output_type):
    draws = Draws(seed)
    install(draws)
    kwargs = dict(args, output_type=output_type)
    if init is not None:
        kwargs["image"] = init
    else:
        kwargs["latents"] = latents.clone()
    with torch.no_grad():
        out = pipe(**kwargs).images
    return out, draws.taken


def main():
    runs = []
    loaded = {}
    for k, (name, folder, img2img, override, args) in enumerate(RUNS):
        if folder not in loaded:
            loaded[folder] = diffusers.DiffusionPipeline.from_pretrained(os.path.join(PIPELINES, folder), torch_dtype=torch.float32)
        base = loaded[folder]
        xl = isinstance(base, StableDiffusionXLPipeline)
        cls = (StableDiffusionXLImg2ImgPipeline if xl else StableDiffusionImg2ImgPipeline) if img2img else type(base)
        components = dict(base.components)
        if override:
            components["scheduler"] = OVERRIDES[override].from_config(base.scheduler.config)
        pipe = cls(**components)
        pipe.set_progress_bar_config(disable=True)
        seed = 100 + k
        scale = pipe.vae_scale_factor
        default = pipe.unet.config.sample_size * scale
        width, height = args.get("width", default), args.get("height", default)
        g = torch.Generator().manual_seed(seed + 1000)
        latents = torch.randn((1, pipe.unet.config.in_channels, height // scale, width // scale), generator=g)
        init = None
        pixels = None
        if img2img:
            pixels = torch.randint(0, 256, (height, width, 3), generator=g, dtype=torch.uint8).numpy()
            init = Image.fromarray(pixels, "RGB")
        out_latents, taken = run_once(pipe, args, seed, latents, init, "latent")
        image, taken_again = run_once(pipe, args, seed, latents, init, "np")
        assert [c for c, _ in taken] == [c for c, _ in taken_again]
        # Mora's order: the initial latents (text to image, given here) or the
        # img2img noise, then the VAE encoder's sample, then the steps' noise.
        callers = [c for c, _ in taken]
        by = {c: [t for cc, t in taken if cc == c] for c in set(callers)}
        unknown = set(callers) - {"prepare_latents", "sample", "step"}
        assert not unknown, f"{name}: randn_tensor called from {unknown}"
        draws = [latents] if init is None else by.get("prepare_latents", [])
        draws = draws + by.get("sample", []) + by.get("step", [])
        assert len(draws) == len(taken) + (1 if init is None else 0), (name, callers)
        run = {
            "name": name,
            "pipeline": folder,
            "class_name": cls.__name__,
            "scheduler": override,
            "prompt": args["prompt"],
            "negative_prompt": args.get("negative_prompt"),
            "steps": args["num_inference_steps"],
            "guidance_scale": args["guidance_scale"],
            "width": width,
            "height": height,
            "strength": args.get("strength"),
            "init_image": None if pixels is None else pixels.reshape(-1).tolist(),
            "draws": [entry(t) for t in draws],
            "latents": entry(out_latents),
            "image": entry(image[0]),
        }
        runs.append(run)
        print(f"{name}: {cls.__name__}, {len(draws)} draws ({', '.join(callers) or 'latents only'}), image {list(image[0].shape)}")
    doc = {"transformers_version": transformers.__version__, "diffusers_version": diffusers.__version__, "runs": runs}
    with open(os.path.join(PIPELINES, "runs.json"), "w") as f:
        json.dump(doc, f, separators=(",", ":"))
        f.write("\n")


if __name__ == "__main__":
    main()
