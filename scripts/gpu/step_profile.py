"""Where a decode step's time goes on the GPU: the kernels of graph-replayed steps, from the
CUDA profiler (CUPTI sees each kernel of a replayed graph), grouped by kernel, with the gaps
between one kernel's end and the next one's start.

Usage (device machine, after ``. scripts/gpu/setup.sh``):
    python3 scripts/gpu/step_profile.py --model /tmp/llama3.2-1b-q4_0.gguf --batch 1,64 --json OUT.json

For each model and batch size: the step's time (CUDA events around 20 replays, per step), the
kernels a step launches, the sum of their durations, the sum of the gaps, and per kernel name
the time per step; printed as a table and written as JSON.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from scripts.gpu_engine_check import environment

PROMPT = 24


def _kernels(trace: Path) -> list[dict]:
    events = json.loads(trace.read_text())["traceEvents"]
    return sorted((e for e in events if e.get("cat") == "kernel"), key=lambda e: e["ts"])


def profile(path: str, batch: int, steps: int) -> dict:
    from driftwood.model import load_model

    model = load_model(path, device="cuda", dtype="bfloat16", progress=False)
    ids = [(i * 7919) % 100000 + 5 for i in range(PROMPT + 16)]
    with torch.inference_mode():
        if batch == 1:
            sess = model.new_session(capacity=4160)  # as `driftwood bench decode` sizes it
            sess.prefill(ids[:PROMPT])
            tokens = [[ids[PROMPT + i]] for i in range(8)]
            decode = lambda t: sess.decode(t[0])  # noqa: E731
        else:
            sess = model.new_batch(batch, capacity=PROMPT + 8 + 2 * steps + 16)
            for b in range(batch):
                sess.prefill(b, ids[b % 8: b % 8 + PROMPT + b % 8])
            tokens = [[ids[PROMPT + b % 8] for b in range(batch)]] * 8
            decode = sess.decode

        def step(i: int) -> None:
            decode(tokens[i % 8])

        for i in range(3):  # capture, warm
            step(i)
        torch.cuda.synchronize()
        times = []
        for i in range(steps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            step(i)
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for i in range(steps):
                step(i)
            torch.cuda.synchronize()
        with tempfile.TemporaryDirectory() as d:
            trace = Path(d) / "trace.json"
            prof.export_chrome_trace(str(trace))
            kernels = _kernels(trace)
    # one step = the kernels between two launches of the first kernel name (the embedding's)
    first = kernels[0]["name"]
    starts = [i for i, k in enumerate(kernels) if k["name"] == first]
    per_step = [kernels[a:b] for a, b in zip(starts, [*starts[1:], len(kernels)], strict=True)][1:]  # the first may be cut
    by_name: dict[str, list[float]] = defaultdict(list)
    busy, gaps, counts = [], [], []
    for ks in per_step:
        counts.append(len(ks))
        busy.append(sum(k["dur"] for k in ks))
        gaps.append(sum(max(0.0, b["ts"] - (a["ts"] + a["dur"])) for a, b in itertools.pairwise(ks)))
        for k in ks:
            by_name[k["name"]].append(k["dur"])
    n = len(per_step)
    names = sorted(by_name, key=lambda k: -sum(by_name[k]))
    return {
        "file": os.path.basename(path), "batch": batch, "steps_profiled": n,
        "step_ms_events": round(statistics.median(times), 4),
        "kernels_per_step": statistics.median(counts),
        "kernel_busy_us_per_step": round(statistics.median(busy), 1),
        "gaps_us_per_step": round(statistics.median(gaps), 1),
        "by_kernel": [{"name": k[:90], "per_step": round(len(by_name[k]) / n, 2),
                       "us_per_step": round(sum(by_name[k]) / n, 1),
                       "us_each_median": round(statistics.median(by_name[k]), 2)} for k in names],
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="GGUF file(s), comma-separated")
    p.add_argument("--batch", default="1,64")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--json", required=True)
    args = p.parse_args()
    rows = []
    for path in args.model.split(","):
        for batch in (int(b) for b in args.batch.split(",")):
            r = profile(path, batch, args.steps)  # the model is freed on return
            torch.cuda.empty_cache()
            rows.append(r)
            print(f"\n{r['file']} batch {batch}: step {r['step_ms_events'] * 1e3:.0f} us (events), "
                  f"{r['kernels_per_step']} kernels, busy {r['kernel_busy_us_per_step']:.0f} us, "
                  f"gaps {r['gaps_us_per_step']:.0f} us", flush=True)
            print(f"{'us/step':>8} {'n/step':>6} {'us each':>8}  kernel")
            for k in r["by_kernel"][:14]:
                print(f"{k['us_per_step']:8.1f} {k['per_step']:6.1f} {k['us_each_median']:8.2f}  {k['name'][:70]}")
    env = environment("cuda")
    env["command"] = "scripts/gpu/step_profile.py " + " ".join(sys.argv[1:])
    Path(args.json).write_text(json.dumps({"bench": "step-profile", "environment": env, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
