"""The diffusers peer of scripts/gpu-check.sh's peers-image step: a Stable
Diffusion pipeline folder on DEVICE (f16 on a GPU, f32 on the CPU) with its
own scheduler, one image of STEPS steps at WIDTH x HEIGHT, seed 7.

  image_peer.py once DIR DEVICE STEPS WIDTH HEIGHT OUT.png     a process per image
  image_peer.py persistent DIR DEVICE STEPS WIDTH HEIGHT RUNS OUT.json
                                                               load once, RUNS images timed
"""
import json
import sys
import time

T0 = time.perf_counter()
import torch  # noqa: E402
from diffusers import StableDiffusionPipeline  # noqa: E402

PROMPT = "a photo of a cat, watercolor"


def main():
    mode, d, dev, steps, w, h = sys.argv[1:7]
    steps, w, h = int(steps), int(w), int(h)
    dtype = torch.float32 if dev == "cpu" else torch.float16
    t = time.perf_counter()
    pipe = StableDiffusionPipeline.from_pretrained(d, torch_dtype=dtype, safety_checker=None,
                                                   requires_safety_checker=False).to(dev)
    pipe.set_progress_bar_config(disable=True)
    load_ms = (time.perf_counter() - t) * 1000

    def image():
        g = torch.Generator(device="cpu").manual_seed(7)
        return pipe(PROMPT, num_inference_steps=steps, width=w, height=h, generator=g).images[0]

    if mode == "once":
        image().save(sys.argv[7])
    elif mode == "persistent":
        runs, out = int(sys.argv[7]), sys.argv[8]
        image()  # warm-up
        times = []
        for _ in range(runs):
            t = time.perf_counter()
            image()
            if dev.startswith("cuda"):
                torch.cuda.synchronize()
            times.append((time.perf_counter() - t) * 1000)
        with open(out, "w") as f:
            json.dump({"load_ms": load_ms, "import_ms": (time.perf_counter() - T0) * 1000 - load_ms - sum(times),
                       "image_ms": times, "scheduler": type(pipe.scheduler).__name__}, f)
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
