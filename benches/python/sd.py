"""The Python peers of benchmark scenario 8: a Stable Diffusion 1.5 pipeline
run by diffusers on the CPU, as users run it today, and its components timed
one forward at a time against Mora's.

  sd.py make OUT [--tiny]        write an SD-1.5-shaped pipeline with diffusers'
                                 own save_pretrained: random weights in the
                                 official shapes (float16 on disk), the
                                 tokenizer of the test fixtures; --tiny: small
                                 shapes, for the harness's smoke run
  sd.py once PIPELINE REQ [--mora]
                                 a process per run: import, load, make one
                                 image, write it, exit; REQ is the request's JSON;
                                 --mora: the weights borrowed from the Mora
                                 daemon ($MORA_SOCKET), mora.diffusers.from_pretrained
  sd.py worker PIPELINE          a persistent process with the pipeline loaded:
                                 one request per stdin line, answered by one
                                 "ok" (or "error: ...") line
  sd.py components PIPELINE LATENT REPEATS
                                 time the text encoder (batch 2, 77 tokens), one
                                 UNet step (batch 2, LATENTxLATENT latents) and
                                 the VAE decoder (one latent), each forward after
                                 a warm-up; prints {"text_encoder": [ms, ...], ...}

A request is {"prompt", "side", "steps", "guidance", "seed", "out"}. The
pipeline is loaded in float32 (computed as Mora computes it). Threads:
torch.set_num_threads($MORA_BENCH_THREADS) when set. A process prints its
peak resident memory (VmHWM, bytes) as its last stdout line after "once".
"once" also runs through `python -m mora run sd.py once ...`, in a process
forked from an interpreter that has already imported torch and diffusers.
scripts/bench-python.sh installs the venv.
"""
import json
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

if os.environ.get("MORA_BENCH_THREADS"):
    torch.set_num_threads(int(os.environ["MORA_BENCH_THREADS"]))

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIXTURE_TOKENIZER = os.path.join(ROOT, "tests", "fixtures", "image", "pipelines", "sd15", "tokenizer")


def make(out, tiny):
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    tok = CLIPTokenizer.from_pretrained(FIXTURE_TOKENIZER)
    # runwayml/stable-diffusion-v1-5's configs; --tiny scales the widths and depths down.
    width, depth = (64, 2) if tiny else (768, 12)
    te = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=max(49408, len(tok)),
            hidden_size=width,
            intermediate_size=4 * width,
            num_hidden_layers=depth,
            num_attention_heads=12 if not tiny else 4,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            projection_dim=width,
            bos_token_id=tok.bos_token_id,
            eos_token_id=2,
            pad_token_id=1,
        )
    )
    blocks = (32, 64, 64, 64) if tiny else (320, 640, 1280, 1280)
    unet = UNet2DConditionModel(
        sample_size=64,
        block_out_channels=blocks,
        cross_attention_dim=width,
        attention_head_dim=8,
        norm_num_groups=32,
        layers_per_block=1 if tiny else 2,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(32, 32, 64, 64) if tiny else (128, 256, 512, 512),
        layers_per_block=1 if tiny else 2,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=512,
    )
    scheduler = PNDMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=te, tokenizer=tok, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.to(torch.float16)
    tmp = "%s.tmp.%d" % (out, os.getpid())
    pipe.save_pretrained(tmp, safe_serialization=True)
    os.rename(tmp, out)


def load(path, borrow=False):
    if borrow:
        import mora.diffusers

        pipe = mora.diffusers.from_pretrained(path, torch_dtype=torch.float32, safety_checker=None)
    else:
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline.from_pretrained(path, torch_dtype=torch.float32, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def image(pipe, req):
    g = torch.Generator().manual_seed(req["seed"])
    with torch.inference_mode():
        img = pipe(
            req["prompt"], height=req["side"], width=req["side"], num_inference_steps=req["steps"],
            guidance_scale=req["guidance"], generator=g,
        ).images[0]
    img.save(req["out"])


def peak_rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def components(path, latent, repeats):
    pipe = load(path)
    te, unet, vae = pipe.text_encoder, pipe.unet, pipe.vae
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, te.config.vocab_size, (2, 77), generator=g)
    sample = torch.randn((2, unet.config.in_channels, latent, latent), generator=g)
    context = torch.randn((2, 77, unet.config.cross_attention_dim), generator=g)
    z = torch.randn((1, vae.config.latent_channels, latent, latent), generator=g)
    forwards = {
        "text_encoder": lambda: te(ids),
        "unet": lambda: unet(sample, 999, encoder_hidden_states=context),
        "vae_decoder": lambda: vae.decode(z),
    }
    times = {}
    with torch.inference_mode():
        for name, f in forwards.items():
            f()  # warm-up
            ms = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                f()
                ms.append((time.perf_counter() - t0) * 1e3)
            times[name] = ms
    print(json.dumps(times), flush=True)


def main():
    a = sys.argv[1:]
    if len(a) in (2, 3) and a[0] == "make" and a[2:] in ([], ["--tiny"]):
        make(a[1], a[2:] == ["--tiny"])
    elif len(a) in (3, 4) and a[0] == "once" and a[3:] in ([], ["--mora"]):
        image(load(a[1], borrow=a[3:] == ["--mora"]), json.loads(a[2]))
        print(peak_rss(), flush=True)
    elif len(a) == 2 and a[0] == "worker":
        pipe = load(a[1])
        print("ready", flush=True)
        for line in sys.stdin:
            try:
                image(pipe, json.loads(line))
                print("ok", flush=True)
            except Exception as e:  # a bad request answers an error and the worker goes on
                print("error: %s" % str(e).replace("\n", " "), flush=True)
    elif len(a) == 4 and a[0] == "components":
        components(a[1], int(a[2]), int(a[3]))
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
