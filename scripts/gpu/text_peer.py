"""The sentence-transformers peer of scripts/gpu-check.sh's peers-text step:
the embedding model on DEVICE as users run it today (mean pooled,
L2-normalised, as Mora's embed step), from a model folder.

  text_peer.py once DIR DEVICE TEXTS_JSON OUT          a process per run: import, load, embed, write, exit
  text_peer.py persistent DIR DEVICE TEXTS_JSON RUNS OUT.json
                                                       load once, then RUNS requests timed in the process

Falls back to transformers' AutoModel with mean pooling when
sentence-transformers is missing. Outputs {"model", "embeddings"} as Mora's
embed step writes them; `persistent` writes its timings.
"""
import json
import os
import sys
import time

T0 = time.perf_counter()
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
import torch  # noqa: E402

try:
    from sentence_transformers import SentenceTransformer  # noqa: E402
except ImportError:
    SentenceTransformer = None


def load(d, dev):
    if SentenceTransformer is not None:
        m = SentenceTransformer(d, device=dev)
        return "sentence-transformers", lambda texts: m.encode(texts, normalize_embeddings=True, convert_to_numpy=True).tolist()
    from transformers import AutoModel, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(d)
    model = AutoModel.from_pretrained(d).to(dev).eval()

    def encode(texts):
        with torch.no_grad():
            b = tok(texts, padding=True, truncation=True, max_length=128, return_tensors="pt").to(dev)
            h = model(**b).last_hidden_state
            mask = b["attention_mask"].unsqueeze(-1).to(h.dtype)
            v = (h * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(v, dim=-1).cpu().tolist()
    return "transformers (mean pooling)", encode


def sync(dev):
    if dev.startswith("cuda"):
        torch.cuda.synchronize()


def main():
    mode, d, dev, texts = sys.argv[1:5]
    texts = json.loads(texts)
    t = time.perf_counter()
    peer, encode = load(d, dev)
    load_ms = (time.perf_counter() - t) * 1000
    if mode == "once":
        with open(sys.argv[5], "w") as f:
            json.dump({"model": d, "embeddings": encode(texts)}, f)
    elif mode == "persistent":
        runs, out = int(sys.argv[5]), sys.argv[6]
        encode(texts)  # warm-up
        times = []
        for _ in range(runs):
            sync(dev)
            t = time.perf_counter()
            vectors = encode(texts)
            sync(dev)
            times.append((time.perf_counter() - t) * 1000)
        with open(out, "w") as f:
            json.dump({"peer": peer, "load_ms": load_ms, "import_ms": (t - T0) * 1000, "request_ms": times,
                       "model": d, "embeddings": vectors}, f)
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
