"""One UNet step of a diffusers pipeline without a LoRA, with one computed
beside each layer (PEFT's LoRA layers, what `load_lora_weights` gives), and
with it fused (`fuse_lora`): the cost per step of an unmerged adapter in the
reference library, against Mora's merge (docs/decisions.md, "LoRA adapters").

    python benches/python/lora_unmerged.py PIPELINE LORA_FILE [SCALE]

Run with the benchmark peer's Python (scripts/bench-python.sh: torch,
diffusers, peft), 2 threads, batch 2 (guidance) at 32x32 latents; prints the
median and best of 5 steps of each, and the time `fuse_lora` took.
"""

import sys
import time

import diffusers
import torch


def main():
    pipeline, lora = sys.argv[1], sys.argv[2]
    scale = float(sys.argv[3]) if len(sys.argv) > 3 else 0.8
    torch.set_num_threads(2)
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(pipeline, torch_dtype=torch.float32)
    unet = pipe.unet
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, unet.config.in_channels, 32, 32, generator=g)
    ctx = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)

    def step():
        with torch.no_grad():
            t = time.perf_counter()
            unet(x, 999, encoder_hidden_states=ctx)
            return time.perf_counter() - t

    def timed(n=5):
        step()
        v = sorted(step() for _ in range(n))
        return v[n // 2], v[0]

    res = {"without the adapter": timed()}
    pipe.load_lora_weights(lora, adapter_name="a")
    pipe.set_adapters(["a"], adapter_weights=[scale])
    res["adapter beside each layer"] = timed()
    t = time.perf_counter()
    pipe.fuse_lora(lora_scale=scale)
    fuse = time.perf_counter() - t
    pipe.unload_lora_weights()
    res["adapter fused"] = timed()
    for what, (median, best) in res.items():
        print(f"{what}: median {median * 1e3:.0f} ms, best {best * 1e3:.0f} ms")
    print(f"fuse_lora: {fuse * 1e3:.0f} ms")


if __name__ == "__main__":
    main()
