"""Writes the report of scripts/gpu-check.sh from its steps' folders: the
markdown docs/gpu-results.md takes, and the same as JSON.

Each step folder holds `status` and `seconds` (written by the runner),
`records.tsv` (check / figure / fact lines, tab-separated) and `report.md`
(the step's own tables). Standard library only: it runs on any python3.
"""
import argparse
import datetime
import json
import os

TITLES = {
    "machine": "The machine",
    "correctness": "Correctness: embeddings on the device against the CPU",
    "generate": "Generation: a synthetic llama, bf16 on the device against f32 on the CPU",
    "faults": "Faults: clients killed with SIGKILL, the daemon killed under a client",
    "attach": "Attach at scale: one large model, 4 clients",
    "sharing": "Sharing: 4 clients at once",
    "figures": "Figures: warm runs against --no-cache",
    "peers-text": "Peers on the device: sentence-transformers",
    "images": "Images: Stable Diffusion pipelines on the device",
    "peers-image": "Peers on the device: diffusers",
    "python": "The Python package: torch tensors over the daemon's allocation",
    "loads": "Loads against the machine's limits",
}


def read(path, default=""):
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return default


def records(step_dir):
    checks, figures, facts = [], [], {}
    for line in read(os.path.join(step_dir, "records.tsv")).splitlines():
        f = line.split("\t")
        if f[0] == "check" and len(f) >= 3:
            checks.append({"name": f[1], "status": f[2], "detail": f[3] if len(f) > 3 else ""})
        elif f[0] == "figure" and len(f) >= 3:
            value = f[2]
            try:
                value = float(value) if "." in value or "e" in value.lower() else int(value)
            except ValueError:
                pass
            figures.append({"name": f[1], "value": value, "unit": f[3] if len(f) > 3 else "",
                            "detail": f[4] if len(f) > 4 else ""})
        elif f[0] == "fact" and len(f) >= 2:
            facts[f[1]] = f[2] if len(f) > 2 else ""
    return checks, figures, facts


def main():
    p = argparse.ArgumentParser()
    for a in ("steps", "order", "md", "json", "elapsed", "budget", "runs", "device", "command"):
        p.add_argument("--" + a, required=True)
    a = p.parse_args()
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    steps, machine = [], {}
    for name in a.order.split():
        d = os.path.join(a.steps, name)
        checks, figures, facts = records(d)
        machine.update(facts)
        status = read(os.path.join(d, "status"), "error: the step left no status").strip()
        seconds = read(os.path.join(d, "seconds"), "0").strip()
        steps.append({
            "name": name,
            "title": TITLES.get(name, name),
            "status": status.split(":")[0],
            "detail": status,
            "seconds": float(seconds) if seconds else 0.0,
            "checks": checks,
            "figures": figures,
            "report": read(os.path.join(d, "report.md")).rstrip("\n"),
        })
    broken = [s["name"] for s in steps if s["status"] in ("fail", "error")]
    doc = {
        "date": date,
        "device": a.device,
        "runs": int(a.runs),
        "budget_s": int(a.budget),
        "elapsed_s": int(a.elapsed),
        "command": a.command.strip(),
        "passed": not broken,
        "machine": machine,
        "steps": steps,
    }
    with open(a.json, "w") as f:
        json.dump(doc, f, indent=1)

    out = [f"## GPU check, {date}", ""]
    out.append(f"`{doc['command']}`: device {a.device}, {a.runs} runs per figure (medians), "
               f"{a.elapsed} s of a {a.budget} s budget.")
    out.append("")
    for k, v in machine.items():
        out.append(f"- {k}: {v}")
    out += ["", "| step | status | seconds |", "| --- | --- | --- |"]
    for s in steps:
        out.append(f"| {s['name']} | {s['detail'].replace('|', '/')} | {s['seconds']:.0f} |")
    for s in steps:
        if s["name"] == "machine" and s["status"] == "pass" and not s["report"]:
            continue
        out += ["", f"### {s['title']}", ""]
        if s["status"] in ("skipped", "error"):
            out.append(f"- {s['detail']}")
        if s["report"]:
            out += [s["report"], ""]
        for c in s["checks"]:
            mark = {"pass": "PASS", "fail": "FAIL", "skip": "skipped"}.get(c["status"], c["status"])
            detail = c["detail"]
            if c["status"] == "skip" and detail.startswith("skipped: "):
                detail = detail[len("skipped: "):]
            out.append(f"- {mark} {c['name']}: {detail}")
    with open(a.md, "w") as f:
        f.write("\n".join(out).rstrip("\n") + "\n")


if __name__ == "__main__":
    main()
