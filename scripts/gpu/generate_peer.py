"""transformers on a synthetic llama, for the generate step of
scripts/gpu-check.sh: the first token's logits from the daemon's weights on
DEVICE (bf16, through the `mora` package) against f32 on the CPU, greedy
tokens both ways, and tokens/s of `model.generate` on DEVICE.

  generate_peer.py DIR DEVICE PROMPT MAX_TOKENS GEN_TOKENS RUNS OUT.json

Needs torch and transformers; `mora` is optional (without it the device model
loads from the file, and the JSON says so). Prints nothing; writes OUT.json.
"""
import json
import os
import sys
import time

T0 = time.perf_counter()
import torch  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: E402


def dtype_kw(dt):
    """`dtype=` since transformers 4.56, `torch_dtype=` before."""
    import transformers
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return {"dtype": dt} if (major, minor) >= (4, 56) else {"torch_dtype": dt}


def ms(t):
    return round((time.perf_counter() - t) * 1000, 1)


def sync(dev):
    if dev.startswith("cuda"):
        torch.cuda.synchronize()


def greedy(model, ids, n, eos):
    out = model.generate(ids, max_new_tokens=n, do_sample=False, eos_token_id=eos, pad_token_id=0,
                         output_scores=True, return_dict_in_generate=True)
    new = out.sequences[0, ids.shape[1]:].tolist()
    margins = []
    for s in out.scores:
        top = torch.topk(s[0].float(), 2).values
        margins.append(float(top[0] - top[1]))
    return new, margins


def main():
    d, dev, prompt, max_tokens, gen_tokens, runs, out = sys.argv[1:8]
    max_tokens, gen_tokens, runs = int(max_tokens), int(gen_tokens), int(runs)
    import_ms = ms(T0)
    tok = AutoTokenizer.from_pretrained(d)
    ids = torch.tensor([tok(prompt)["input_ids"]])
    eos = AutoConfig.from_pretrained(d).eos_token_id
    doc = {"prompt_ids": ids[0].tolist(), "import_ms": import_ms}

    # The reference: f32 on the CPU, from the file.
    ref = AutoModelForCausalLM.from_pretrained(d, **dtype_kw(torch.float32)).eval()
    with torch.no_grad():
        ref_logits = ref(ids).logits[0, -1].float()
        doc["cpu_ids"], margins = greedy(ref, ids, max_tokens, eos)
    doc["cpu_min_margin"] = round(min(margins), 4) if margins else None
    del ref

    # On the device, bf16: the daemon's weights when the mora package is here.
    t = time.perf_counter()
    try:
        import mora
        client = mora.connect(autostart=False)  # noqa: F841 (held to the end)
        sd = client.state_dict(d, dtype="bfloat16", device=dev)
        doc["state_dict_ms"] = ms(t)
        with torch.device(dev):
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(d), **dtype_kw(torch.bfloat16))
        model.load_state_dict(dict(sd), assign=True, strict=True)
        doc["weights"] = "lent by the daemon (mora.state_dict)"
    except ImportError:
        model = AutoModelForCausalLM.from_pretrained(d, **dtype_kw(torch.bfloat16)).to(dev)
        doc["weights"] = "read from the file (no mora package)"
    model.eval()
    doc["device_model_ms"] = ms(t)
    with torch.no_grad():
        dev_ids = ids.to(dev)
        logits = model(dev_ids).logits[0, -1].float().cpu()
        doc["logits_max_abs_diff"] = float((logits - ref_logits).abs().max())
        doc["logits_max_abs"] = float(ref_logits.abs().max())
        doc["argmax_equal"] = int(logits.argmax()) == int(ref_logits.argmax())
        doc["device_ids"], _ = greedy(model, dev_ids, max_tokens, eos)
        # tokens/s of model.generate in this (persistent) process: a warm-up, then RUNS.
        greedy(model, dev_ids, gen_tokens, eos)
        rates, counts = [], []
        for _ in range(runs):
            sync(dev)
            t = time.perf_counter()
            new, _ = greedy(model, dev_ids, gen_tokens, eos)
            sync(dev)
            rates.append(len(new) / (time.perf_counter() - t))
            counts.append(len(new))
    doc["tokens_per_s"] = [round(r, 1) for r in rates]
    doc["tokens"] = counts
    doc["process_ms"] = ms(T0)
    with open(out, "w") as f:
        json.dump(doc, f)
    # Exit without tearing down torch's CUDA state over lent memory: the
    # process's end closes the IPC mapping and the daemon's connection.
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
