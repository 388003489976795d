#!/usr/bin/env bash
# Step `python`: the Python package (its wheel from $WHEELS) lends torch
# tensors on $DEVICE over the daemon's allocation: the times, every tensor on
# the device and equal to the file's weights as f16, a matmul on them, and the
# lease held by live tensors after close() and released when they are gone.
# shellcheck source=scripts/gpu/lib.sh
source "$GPU_DIR/lib.sh"

why="$(torch_ok safetensors)" || skip_step "$why"
pylib="$(mora_pylib 2>"$STEP_DIR/pylib.err")" || skip_step "$(tail -1 "$STEP_DIR/pylib.err")"
embed_model
daemon_start main
log "state_dict on $DEVICE"
PYTHONPATH="$pylib" MODEL="$EMBED_SRC" "$PY" - >"$STEP_DIR/py.out" 2>"$STEP_DIR/py.err" <<'PY'
import gc, os, time
import torch
from safetensors.torch import load_file
import mora

MODEL, dev = os.environ["MODEL"], os.environ["DEVICE"]
def leases(c):
    return sum(m["leases"] for m in c.ps())
def out(kind, *fields):
    print("\t".join([kind] + [str(f) for f in fields]))
def check(name, ok, detail):
    out("check", name, "pass" if ok else "fail", detail)
client = mora.connect(autostart=False)
t0 = time.perf_counter()
sd = client.state_dict(MODEL, dtype=torch.float16, device=dev)
first = (time.perf_counter() - t0) * 1000
t0 = time.perf_counter()
sd2 = client.state_dict(MODEL, dtype=torch.float16, device=dev)
again = (time.perf_counter() - t0) * 1000
out("figure", "state_dict, the daemon loads", f"{first:.0f}", "ms", f"state_dict(dtype=float16, device={dev!r}), {len(sd)} tensors")
out("figure", "state_dict again", f"{again:.1f}", "ms", "the model resident, the same process")
ref = {k: (v.half() if v.is_floating_point() else v).to(dev) for k, v in load_file(os.path.join(sd.dir, "model.safetensors")).items()}
same = set(sd) == set(ref) and all(torch.equal(sd[k], ref[k]) for k in ref)
on_dev = all(t.device == torch.device(dev) or (t.device.type == "cuda" and dev.startswith("cuda")) for t in sd.values())
check("every tensor on the device", on_dev, f"{len(sd)} tensors on {dev}")
check("equal to the file as f16", same, "torch.equal against safetensors.torch.load_file, halved")
name = next(k for k in sd if k.endswith("attention.self.query.weight"))
w = sd[name]
x = torch.randn(8, w.shape[1], device=dev, dtype=torch.float16)
y = x @ w.T
ok = torch.allclose(y.float(), x.float() @ ref[name].float().T, atol=1e-2, rtol=1e-2)
check("a matmul on the lent weights", ok, f"8 x {w.shape[1]} by {name}")
del sd2
gc.collect()
client.close()
watch = mora.connect(autostart=False)
held = leases(watch)
readable = torch.equal(sd[name], ref[name])
# On the host as on a GPU, the lease lasts as long as a tensor views its memory.
check("lease held by live tensors", held == 1 and readable,
      f"after close() with tensors alive: {held} lease(s), 1 expected; still equal the file's: {readable}")
del sd, w, y
gc.collect()
if dev.startswith("cuda"):
    torch.cuda.synchronize()
time.sleep(0.2)
released = leases(watch)
check("lease ends with the tensors", released == 0, f"after the tensors are gone: {released}, 0 expected")
watch.close()
PY
rc=$?
while IFS=$'\t' read -r kind a b c d; do
    case "$kind" in
        check) check "$a" "$b" "$c" ;;
        figure) figure "$a" "$b" "$c" "$d" ;;
    esac
done <"$STEP_DIR/py.out"
((rc == 0)) || die "the Python check raised: $(tail -1 "$STEP_DIR/py.err")"
md "Model: $EMBED_NAME, lent as float16 on $DEVICE to torch."
