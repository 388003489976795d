"""Python processes getting all-MiniLM-L6-v2's weights: from a warm Mora
daemon (the `mora` package) against reading the file (safetensors) and
against loading the model (sentence-transformers), as users do today.

    HF_HUB_CACHE=$(scripts/fetch-test-model.sh) PATH=target/release:$PATH \\
        .mora-bench/python/bin/python benches/python/client.py [--repeats 10] [--procs 8]

Needs the benchmarks' Python peer (scripts/bench-python.sh) with the package
installed in it (scripts/python-env.sh .mora-bench/python/bin/python), and
`mora-cache` on PATH. It starts a daemon of its own on a private socket.

Part 1: one fresh process per run, contenders interleaved (A B C A B C ...)
after one warm-up each; time spawn to exit and the weights' part of it
(measured inside the process, after `import torch`), and the process's
memory once every weight has been read (VmRSS, RssAnon). Medians over the
repeats, min and max beside; ratios against safetensors.

Part 2: N processes at once, each holding the weights (all read once) until
all of them are measured: the sum of their proportional set sizes (Pss,
shared pages split between the processes that map them, so the sum counts
each page once) and of their private memory (RssAnon).

Prints Markdown tables on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODEL = "sentence-transformers/all-MiniLM-L6-v2"

# Each contender: code run in a fresh process. It prints, as JSON, the
# seconds its weights took and its memory once every weight was read; with
# HOLD set it then waits for a line on stdin before exiting.
PRELUDE = """
import json, os, sys, time
import torch
t0 = time.perf_counter()
"""
EPILOGUE = """
weights = time.perf_counter() - t0
total = 0.0
for t in tensors.values():
    total += float(t.float().sum())   # read every weight once
def kb(key, path="/proc/self/status"):
    for line in open(path):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0
print(json.dumps({"weights_s": weights, "rss": kb("VmRSS"), "anon": kb("RssAnon"),
                  "pss": kb("Pss", "/proc/self/smaps_rollup")}), flush=True)
if os.environ.get("HOLD"):
    sys.stdin.readline()
"""
CONTENDERS = {
    "mora (warm daemon), state_dict": """
import mora
client = mora.connect(os.environ["MORA_BENCH_SOCKET"], autostart=False)
tensors = client.state_dict(MODEL)
""",
    "safetensors.torch.load_file": """
from safetensors.torch import load_file
tensors = load_file(os.environ["MORA_BENCH_FILE"])
""",
    "mora (warm daemon), state_dict(dtype=float16)": """
import mora
client = mora.connect(os.environ["MORA_BENCH_SOCKET"], autostart=False)
tensors = client.state_dict(MODEL, dtype=torch.float16)
""",
    "load_file, then .half()": """
from safetensors.torch import load_file
tensors = {k: v.half() for k, v in load_file(os.environ["MORA_BENCH_FILE"]).items()}
""",
    "SentenceTransformer(...)": """
from sentence_transformers import SentenceTransformer
model = SentenceTransformer(os.environ["MORA_BENCH_DIR"], device="cpu")
tensors = model.state_dict()
""",
    "(no weights: `import torch` only, for scale)": """
tensors = {}
""",
}


def code(name: str) -> str:
    return PRELUDE + f"MODEL = {MODEL!r}\n" + CONTENDERS[name] + EPILOGUE


def run_once(name: str, env: dict) -> dict:
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code(name)], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if out.returncode != 0:
        raise SystemExit(f"{name} failed:\n{out.stderr}")
    r = json.loads(out.stdout.strip().splitlines()[-1])
    r["wall_s"] = wall
    return r


def fmt_s(s: float) -> str:
    return f"{s * 1000:.0f} ms" if s < 10 else f"{s:.1f} s"


def fmt_b(b: float) -> str:
    return f"{b / 2**20:.0f} MiB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--procs", type=int, default=8)
    args = ap.parse_args()

    import mora

    hub = os.environ.get("HF_HUB_CACHE")
    if not hub:
        raise SystemExit("HF_HUB_CACHE is not set: run scripts/fetch-test-model.sh and use its output")
    tmp = Path(tempfile.mkdtemp(prefix="mora-pybench-"))
    sock = tmp / "cache.sock"
    daemon = subprocess.Popen(["mora-cache", "serve", "--socket", str(sock)], stdout=subprocess.DEVNULL,
                              stderr=open(tmp / "daemon.log", "wb"))
    try:
        while not sock.exists():
            if daemon.poll() is not None:
                raise SystemExit(f"mora-cache serve exited: {(tmp / 'daemon.log').read_text()}")
            time.sleep(0.02)
        with mora.connect(sock, autostart=False) as c:
            sd = c.state_dict(MODEL)  # warm: loaded once, resident for every run below
            c.state_dict(MODEL, dtype="float16")
            model_dir, nbytes = sd.dir, sd.nbytes
        env = dict(os.environ, MORA_BENCH_SOCKET=str(sock), MORA_BENCH_DIR=model_dir,
                   MORA_BENCH_FILE=str(Path(model_dir) / "model.safetensors"), HF_HUB_OFFLINE="1",
                   TOKENIZERS_PARALLELISM="false")
        names = list(CONTENDERS)
        results: dict = {n: [] for n in names}
        for n in names:
            run_once(n, env)  # warm-up: page cache, Python's bytecode caches
        for _ in range(args.repeats):
            for n in names:
                results[n].append(run_once(n, env))

        print(f"all-MiniLM-L6-v2 ({fmt_b(nbytes)} as f32), one fresh Python process per run, "
              f"{args.repeats} runs of each, interleaved. Weights: from just after `import torch` to a dict of "
              f"tensors; memory once every weight was read.\n")
        print("| contender | spawn to exit | weights | vs safetensors (weights) | VmRSS | RssAnon |")
        print("|---|---|---|---|---|---|")
        base = statistics.median(r["weights_s"] for r in results["safetensors.torch.load_file"])
        for n in names:
            rs = results[n]
            med = lambda k: statistics.median(r[k] for r in rs)  # noqa: E731
            lo = min(r["weights_s"] for r in rs)
            hi = max(r["weights_s"] for r in rs)
            print(f"| {n} | {fmt_s(med('wall_s'))} | {fmt_s(med('weights_s'))} ({fmt_s(lo)}–{fmt_s(hi)}) | "
                  f"{med('weights_s') / base:.2f}x | {fmt_b(med('rss'))} | {fmt_b(med('anon'))} |")

        print(f"\n{args.procs} processes at once, each holding the weights (every one read) until all are measured:\n")
        print("| contender | sum of Pss | sum of RssAnon | Pss per process |")
        print("|---|---|---|---|")
        for n in names[:4]:
            procs = [subprocess.Popen([sys.executable, "-c", code(n)], env=dict(env, HOLD="1"), stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, text=True) for _ in range(args.procs)]
            rows = [json.loads(p.stdout.readline()) for p in procs]
            # Measured again now that all of them hold their weights: Pss
            # splits the pages shared between them.
            pss = anon = 0
            for p in procs:
                for line in open(f"/proc/{p.pid}/smaps_rollup"):
                    if line.startswith("Pss:"):
                        pss += int(line.split()[1]) * 1024
                for line in open(f"/proc/{p.pid}/status"):
                    if line.startswith("RssAnon:"):
                        anon += int(line.split()[1]) * 1024
            for p in procs:
                p.stdin.write("\n")
                p.stdin.close()
                p.wait()
            assert len(rows) == args.procs
            print(f"| {n} | {fmt_b(pss)} | {fmt_b(anon)} | {fmt_b(pss / args.procs)} |")
    finally:
        daemon.terminate()
        daemon.wait()


if __name__ == "__main__":
    main()
