#!/usr/bin/env python3
"""Writes the scheduler parity fixtures of tests/fixtures/image/schedulers/.

Each fixture is one scheduler config (as a Stable Diffusion repository ships
it in `scheduler/scheduler_config.json`, or a variation of one) run through a
diffusers scheduler class, as the diffusers pipelines run it:

    scheduler = Class.from_config(config)
    scheduler.set_timesteps(steps)
    sample = latent * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        model_in = scheduler.scale_model_input(sample, t)
        model_out = 0.1 * model_in + sin(t / 100)      # a fake UNet, in float32
        sample = scheduler.step(model_out, t, sample, eta=...).prev_sample

at 1, 4 and 20 steps, and the image-to-image start (strength 0.6, the
pipelines' `get_timesteps`, `set_begin_index` and `add_noise`) at 4 and 20.
Everything is float32 on the CPU. The latent, the image latent and every
noise tensor a stochastic scheduler draws come from fixed formulas (below,
mirrored by the Rust tests), so no random generator has to be reproduced:
`randn_tensor` is replaced, in each scheduler module that imports it, by a
function returning the next formula tensor.

Recorded per run: the timesteps, `init_noise_sigma`, `order`, the sigmas
where the class has them, per step the first 8 values, the sum and the sum
of absolute values of the stepped sample and (Euler schedulers, where it is
not the identity) of the scaled model input, and the final sample: in full
(9 significant digits, a float32 round trip) at 20 steps, as the same
figures otherwise.

Rerun (from the repository root, with a Python that has diffusers and torch):

    python3 scripts/golden/make_scheduler_fixtures.py

It prints the diffusers version it used; the fixtures record it too.
"""

import copy
import json
import math
import os

import numpy as np
import torch
import diffusers
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)
import diffusers.schedulers.scheduling_ddim as m_ddim
import diffusers.schedulers.scheduling_ddpm as m_ddpm
import diffusers.schedulers.scheduling_euler_ancestral_discrete as m_euler_a
import diffusers.schedulers.scheduling_euler_discrete as m_euler

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tests", "fixtures", "image", "schedulers")
SHAPE = (1, 4, 8, 8)
N = 256
STEPS = [1, 4, 20]
IMG2IMG_STEPS = [4, 20]
STRENGTH = 0.6

CLASSES = {
    "pndm": PNDMScheduler,
    "ddim": DDIMScheduler,
    "euler": EulerDiscreteScheduler,
    "euler_ancestral": EulerAncestralDiscreteScheduler,
    "ddpm": DDPMScheduler,
    "unipc": UniPCMultistepScheduler,
}


def formula(fn):
    return torch.tensor(np.array([fn(k) for k in range(N)], dtype=np.float64).astype(np.float32)).reshape(SHAPE)


def latent():
    """The initial latent (before `init_noise_sigma`): cos(0.377 k + 0.5) * 1.1."""
    return formula(lambda k: math.cos(0.377 * k + 0.5) * 1.1)


def image_latent():
    """The image latent of image-to-image: sin(0.291 k) * 0.8."""
    return formula(lambda k: math.sin(0.291 * k) * 0.8)


def noise(d):
    """The d-th noise tensor (d = 0, 1, ... per run): sin(0.731 k + 1.37 d + 0.2) * 1.4."""
    return formula(lambda k: math.sin(0.731 * k + 1.37 * d + 0.2) * 1.4)


IMG2IMG_NOISE = 1000  # the add_noise noise is noise(1000)


class Draws:
    def __init__(self):
        self.n = 0

    def __call__(self, shape, generator=None, device=None, dtype=None, layout=None):
        assert tuple(shape) == SHAPE, shape
        t = noise(self.n)
        self.n += 1
        return t.to(dtype or torch.float32)


def stats(x):
    f = x.flatten().to(torch.float64)
    return {
        "first": [float(f"{v:.9g}") for v in f[:8].tolist()],
        "sum": float(f"{f.sum().item():.12g}"),
        "abs_sum": float(f"{f.abs().sum().item():.12g}"),
    }


def full(x):
    return [float(f"{v:.9g}") for v in x.flatten().tolist()]


def fake_unet(model_in, t):
    return 0.1 * model_in + math.sin(float(t) / 100.0)


def make(cls, config):
    return cls.from_config(copy.deepcopy(config))


def run(cls, config, steps, eta, draws):
    s = make(cls, config)
    s.set_timesteps(steps)
    sample = latent() * s.init_noise_sigma
    record = []
    kwargs = {"eta": eta} if cls is DDIMScheduler else {}
    for t in s.timesteps:
        model_in = s.scale_model_input(sample, t)
        out = fake_unet(model_in, t)
        sample = s.step(out, t, sample, **kwargs).prev_sample
        # The scaled input only where scale_model_input is not the identity.
        scaled = stats(model_in) if cls in (EulerDiscreteScheduler, EulerAncestralDiscreteScheduler) else None
        record.append({"scaled": scaled, "prev": stats(sample)})
    ins = s.init_noise_sigma
    r = {
        "steps": steps,
        "timesteps": [float(t) for t in s.timesteps.tolist()],
        "init_noise_sigma": float(ins),
        "order": s.order,
        "draws": draws.n,
        "record": record,
        "final": full(sample) if steps == max(STEPS) else stats(sample),
    }
    if hasattr(s, "sigmas") and cls is not DDPMScheduler:
        r["sigmas"] = [float(v) for v in torch.as_tensor(s.sigmas).tolist()]
    return r


def img2img(cls, config, steps, eta, draws):
    """As StableDiffusionImg2ImgPipeline: get_timesteps, add_noise, then the loop."""
    s = make(cls, config)
    s.set_timesteps(steps)
    init_timestep = min(int(steps * STRENGTH), steps)
    t_start = max(steps - init_timestep, 0)
    begin = t_start * s.order
    timesteps = s.timesteps[begin:]
    if hasattr(s, "set_begin_index"):
        s.set_begin_index(begin)
    latent_timestep = timesteps[:1]
    sample = s.add_noise(image_latent(), noise(IMG2IMG_NOISE), latent_timestep)
    noised = stats(sample)
    kwargs = {"eta": eta} if cls is DDIMScheduler else {}
    for t in timesteps:
        model_in = s.scale_model_input(sample, t)
        out = fake_unet(model_in, t)
        sample = s.step(out, t, sample, **kwargs).prev_sample
    return {"steps": steps, "strength": STRENGTH, "start": begin, "draws": draws.n, "noised": noised,
            "final": full(sample) if steps == max(STEPS) else stats(sample)}


SD15 = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}

SD21 = {
    "_class_name": "DDIMScheduler",
    "_diffusers_version": "0.8.0",
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
}

SDXL = {
    "_class_name": "EulerDiscreteScheduler",
    "_diffusers_version": "0.19.0.dev0",
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
}

SD_TURBO = dict(SDXL, _diffusers_version="0.24.0.dev0", timestep_spacing="trailing")
SDXL_TURBO = dict(SD_TURBO, _class_name="EulerAncestralDiscreteScheduler")

# (name, config, class override (short name or None), eta)
CASES = [
    ("sd15-pndm", SD15, None, 0.0),
    ("sd15-ddim", SD15, "ddim", 0.0),
    ("sd15-euler", SD15, "euler", 0.0),
    ("sd15-euler_ancestral", SD15, "euler_ancestral", 0.0),
    ("sd15-ddpm", SD15, "ddpm", 0.0),
    ("sd15-unipc", SD15, "unipc", 0.0),
    ("sd21-ddim", SD21, None, 0.0),
    ("sd21-pndm", SD21, "pndm", 0.0),
    ("sd21-euler", SD21, "euler", 0.0),
    ("sd21-euler_ancestral", SD21, "euler_ancestral", 0.0),
    ("sd21-ddpm", SD21, "ddpm", 0.0),
    ("sd21-unipc", SD21, "unipc", 0.0),
    ("sdxl-euler", SDXL, None, 0.0),
    ("sd-turbo-euler", SD_TURBO, None, 0.0),
    ("sdxl-turbo-euler_ancestral", SDXL_TURBO, None, 0.0),
    # Variations: other spacings, schedules and keys the classes read.
    ("linspace-euler", dict(SDXL, timestep_spacing="linspace"), None, 0.0),
    ("sd15-ddim-eta", SD15, "ddim", 0.5),
    ("zsnr-ddim-trailing", dict(SD21, rescale_betas_zero_snr=True, timestep_spacing="trailing"), None, 0.0),
    ("zsnr-euler-trailing", dict(SD21, _class_name="EulerDiscreteScheduler", rescale_betas_zero_snr=True,
                                  timestep_spacing="trailing"), None, 0.0),
    ("cos-ddpm-clip", dict(SD15, _class_name="DDPMScheduler", beta_schedule="squaredcos_cap_v2", clip_sample=True,
                           clip_sample_range=1.5, variance_type="fixed_small_log"), None, 0.0),
    ("linear-ddpm-large", dict(SD15, _class_name="DDPMScheduler", beta_schedule="linear", beta_start=0.0001,
                               beta_end=0.02, variance_type="fixed_large", prediction_type="sample",
                               timestep_spacing="trailing"), None, 0.0),
    ("linspace-pndm", dict(SD15, timestep_spacing="linspace", set_alpha_to_one=True), None, 0.0),
    ("ddim-sample-clip", dict(SD15, _class_name="DDIMScheduler", prediction_type="sample", clip_sample=True,
                              set_alpha_to_one=True, timestep_spacing="linspace"), None, 0.0),
    ("unipc-order3-bh1", dict(SD15, _class_name="UniPCMultistepScheduler", solver_order=3, solver_type="bh1",
                              final_sigmas_type="sigma_min", timestep_spacing="trailing"), None, 0.0),
    # (bh1 or noise prediction with the default zero final sigma give NaN in
    # diffusers' last step; Mora refuses them.)
    ("unipc-noise-pred", dict(SD21, _class_name="UniPCMultistepScheduler", predict_x0=False,
                              lower_order_final=False, disable_corrector=[0, 2], final_sigmas_type="sigma_min",
                              timestep_spacing="leading"), None, 0.0),
    ("euler-sigma_min-final", dict(SDXL, final_sigmas_type="sigma_min", prediction_type="v_prediction"), None, 0.0),
    ("sd15-pndm-prk", dict(SD15, skip_prk_steps=False), None, 0.0),
    ("pndm-prk-v-linspace", dict(SD21, _class_name="PNDMScheduler", skip_prk_steps=False, timestep_spacing="linspace"),
     None, 0.0),
    ("euler-log_linear", dict(SDXL, interpolation_type="log_linear"), None, 0.0),
    ("euler-log_linear-karras", dict(SD21, _class_name="EulerDiscreteScheduler", interpolation_type="log_linear",
                                     use_karras_sigmas=True, final_sigmas_type="sigma_min"), None, 0.0),
    ("euler-continuous-v", dict(SD21, _class_name="EulerDiscreteScheduler", timestep_type="continuous",
                                timestep_spacing="trailing"), None, 0.0),
    ("ddim-threshold", dict(SD15, _class_name="DDIMScheduler", thresholding=True, dynamic_thresholding_ratio=0.9,
                            sample_max_value=1.6), None, 0.0),
    ("ddpm-threshold", dict(SD21, _class_name="DDPMScheduler", thresholding=True, sample_max_value=3.0,
                            timestep_spacing="trailing"), None, 0.0),
    ("unipc-threshold", dict(SD15, _class_name="UniPCMultistepScheduler", thresholding=True,
                             dynamic_thresholding_ratio=0.8, sample_max_value=1.3), None, 0.0),
    ("ddpm-sigmoid", dict(SD15, _class_name="DDPMScheduler", beta_schedule="sigmoid", beta_start=0.0001,
                          beta_end=0.02), None, 0.0),
    ("ddpm-laplace", dict(SD15, _class_name="DDPMScheduler", beta_schedule="laplace", timestep_spacing="linspace"),
     None, 0.0),
    ("euler-beta", dict(SDXL, use_beta_sigmas=True), None, 0.0),
    ("unipc-beta", dict(SD21, _class_name="UniPCMultistepScheduler", use_beta_sigmas=True), None, 0.0),
    ("sdxl-euler-karras", dict(SDXL, use_karras_sigmas=True), None, 0.0),
    ("euler-exponential", dict(SDXL, use_exponential_sigmas=True, timestep_spacing="trailing", sigma_min=0.05,
                               sigma_max=10.0), None, 0.0),
    ("euler_ancestral-karras-ignored", dict(SDXL_TURBO, use_karras_sigmas=True), None, 0.0),
    ("unipc-karras", dict(SD15, _class_name="UniPCMultistepScheduler", use_karras_sigmas=True), None, 0.0),
    ("unipc-exponential", dict(SD21, _class_name="UniPCMultistepScheduler", use_exponential_sigmas=True,
                               final_sigmas_type="sigma_min"), None, 0.0),
]


def main():
    print("diffusers", diffusers.__version__)
    os.makedirs(OUT, exist_ok=True)
    for name, config, override, eta in CASES:
        cls = CLASSES[override] if override else getattr(diffusers, config["_class_name"])
        runs, i2i = [], []
        for steps in STEPS:
            draws = Draws()
            for m in (m_ddim, m_ddpm, m_euler_a, m_euler):
                m.randn_tensor = draws
            try:
                runs.append(run(cls, config, steps, eta, draws))
            except ValueError as e:  # diffusers cannot run it: Mora must refuse it
                runs.append({"steps": steps, "error": str(e)})
        for steps in IMG2IMG_STEPS:
            draws = Draws()
            for m in (m_ddim, m_ddpm, m_euler_a, m_euler):
                m.randn_tensor = draws
            i2i.append(img2img(cls, config, steps, eta, draws))
        fixture = {
            "case": name,
            "diffusers": diffusers.__version__,
            "class": cls.__name__,
            "override": override,
            "eta": eta,
            "config": config,
            "runs": runs,
            "img2img": i2i,
        }
        with open(os.path.join(OUT, f"{name}.json"), "w") as f:
            json.dump(fixture, f, separators=(",", ":"))
            f.write("\n")
        print(f"{name}: {cls.__name__}, timesteps at 4 steps {runs[1].get('timesteps')}")


if __name__ == "__main__":
    main()
