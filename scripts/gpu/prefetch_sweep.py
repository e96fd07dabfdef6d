"""Batch-1 decode with the next products' weights asked into L2 as each one-row product's programs
finish (``TritonOps(prefetch_mb=P)``) against without, in one process on the same weights: one
session per setting, the settings interleaved token by token within each round (so drift between
them cancels), every decode's logits checked bit for bit against the plain step's.

Usage: python scripts/gpu/prefetch_sweep.py OUT.json   (environment: MODELS=a.gguf,b.gguf (default
the three 1B files scripts/gpu/decode.sh writes), MB=2,4,8,16 the prefetch sizes, MODES=1 the
prefetch modes (kernels._prefetch_next: 1 bulk at the programs' end, 2 bulk at their start, 3 and 4
per line), PDL=1 adds each with programmatic dependent launch, ROUNDS=5, TOKENS=24)"""

from __future__ import annotations

import os
import statistics
import sys
import time

import torch

from driftwood.bench.report import environment, format_table, progress, write_json
from driftwood.model import load_model
from driftwood.model.cuda.decoder import TritonOps

MODELS = os.environ.get("MODELS", ",".join(f"/tmp/llama3.2-1b-{d}.gguf" for d in ("bf16", "q4_0", "q8_0")))
MB = [float(v) for v in os.environ.get("MB", "2,4,8,16").split(",")]
MODES = [int(v) for v in os.environ.get("MODES", "1").split(",")]
PDL = [False, True] if os.environ.get("PDL") == "1" else [False]
# (prefetch MB, mode, pdl); the plain step first
SETTINGS = [(0.0, 0, pdl) for pdl in PDL] + [(mb, mode, pdl) for pdl in PDL for mode in MODES for mb in MB]
ROUNDS = int(os.environ.get("ROUNDS", "5"))
TOKENS = int(os.environ.get("TOKENS", "24"))
PROMPT = [(i * 7919) % 100000 + 5 for i in range(24 + TOKENS)]


def sweep(path: str) -> list[dict]:
    model = load_model(path, device="cuda", dtype="bfloat16", progress=False)
    sessions = []
    for mb, mode, pdl in SETTINGS:
        model.decode_ops = TritonOps(prefetch_mb=mb, prefetch_mode=mode, pdl=pdl)
        s = model.new_session(capacity=24 + TOKENS + 4096)  # as the benchmark sizes it
        s.prefill(PROMPT[:24])
        s.decode(PROMPT[24])  # captures the graph with these ops
        sessions.append(s)
    times: list[list[float]] = [[] for _ in SETTINGS]
    mismatches = [0] * len(SETTINGS)
    for _ in range(ROUNDS):
        for s in sessions:
            s.reset()
            s.prefill(PROMPT[:24])
        for i in range(TOKENS):
            want = None
            for j, s in enumerate(sessions):
                torch.cuda.synchronize()
                t = time.perf_counter()
                logits = s.decode(PROMPT[24 + i])
                torch.cuda.synchronize()
                times[j].append((time.perf_counter() - t) * 1e3)
                if want is None:
                    want = logits
                elif not torch.equal(logits, want):
                    mismatches[j] += 1
    base = statistics.median(times[0])
    rows = []
    for (mb, mode, pdl), ts, bad in zip(SETTINGS, times, mismatches, strict=True):
        med = statistics.median(ts)
        rows.append({"file": os.path.basename(path), "prefetch_mb": mb, "mode": mode, "pdl": pdl,
                     "decode_ms_per_token": round(med, 4),
                     "decode_ms_p10": round(statistics.quantiles(ts, n=10)[0], 4),
                     "decode_ms_p90": round(statistics.quantiles(ts, n=10)[-1], 4),
                     "delta_us": round((med - base) * 1e3, 1), "tokens_timed": len(ts),
                     "logits_differing_from_plain": bad})
    for s in sessions:
        s.close()
    del model
    torch.cuda.empty_cache()
    return rows


def main(out: str) -> int:
    rows = []
    for path in MODELS.split(","):
        progress(f"prefetch sweep: {path}")
        rows += sweep(path)
    print(format_table(rows, [("file", "file"), ("prefetch_mb", "prefetch MB"), ("mode", "mode"), ("pdl", "pdl"),
                              ("decode_ms_per_token", "ms/token"), ("decode_ms_p10", "p10"),
                              ("decode_ms_p90", "p90"), ("delta_us", "vs plain us"),
                              ("logits_differing_from_plain", "logits differing")]))
    write_json({"benchmark": "prefetch-sweep", "environment": environment("cuda"), "rows": rows}, out)
    return 1 if any(r["logits_differing_from_plain"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
