"""The decode attention kernel's configurations (keys a block, num_warps) on the Llama-3.2-1B
attention shape (32 query heads, 8 KV heads, head dim 64), each replayed in a CUDA graph over
16 layers' caches as decode runs it (split kernel + combine), at batch 1 and 64, short and long
contexts, and caches of 64 and 4,160 positions (the split count follows the capacity).

Usage (device machine, after ``. scripts/gpu/setup.sh``):
    python3 scripts/gpu/attention_sweep.py --json OUT.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from scripts.gpu_engine_check import environment, graph_ms

CONFIGS = [(16, 1), (16, 2), (32, 1), (32, 2), (32, 4), (64, 1), (64, 2), (64, 4), (128, 4), (128, 8)]
CASES = [  # (batch, cache capacity, position)
    (1, 4160, 30), (1, 4160, 1000), (1, 4160, 4100), (64, 64, 40), (64, 4160, 1000)]


def main() -> int:
    from driftwood.model.cuda import kernels as K

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", required=True)
    args = p.parse_args()
    H, Hkv, D, layers = 32, 8, 64, 16
    rows = []
    for B, cap, at in CASES:
        caches = [(torch.randn(B, Hkv, cap, D, device="cuda").bfloat16(),
                   torch.randn(B, Hkv, cap, D, device="cuda").bfloat16()) for _ in range(layers)]
        q = torch.randn(B, H, D, device="cuda").bfloat16()
        pos = torch.full((B,), at, device="cuda") - torch.arange(B, device="cuda") % 8
        ref = K.attention(q, *caches[0], pos)
        for cfg in CONFIGS:
            try:
                got = K.attention(q, *caches[0], pos, config=cfg)
                err = float((got.float() - ref.float()).norm() / ref.float().norm())
                ms = graph_ms(lambda cfg=cfg, q=q, pos=pos, cs=caches: [K.attention(q, k, v, pos, config=cfg)
                                                                           for k, v in cs]) / layers
                rows.append({"batch": B, "capacity": cap, "position": at, "config": cfg, "us": round(ms * 1e3, 2),
                             "rel_err_vs_default": err})
            except Exception as exc:  # a config that does not compile
                rows.append({"batch": B, "capacity": cap, "position": at, "config": cfg, "error": repr(exc)[:300]})
        done = [r for r in rows if r["batch"] == B and r["capacity"] == cap and r["position"] == at and "us" in r]
        line = "  ".join(f"{tuple(r['config'])} {r['us']:.2f}" for r in done)
        print(f"B={B} cap={cap} pos={at}: {line}", flush=True)
        torch.cuda.empty_cache()
    env = environment("cuda")
    env["command"] = "scripts/gpu/attention_sweep.py " + " ".join(sys.argv[1:])
    Path(args.json).write_text(json.dumps({"bench": "attention-sweep", "environment": env,
                                           "default": {"few": K.ATTENTION_FEW, "many": K.ATTENTION_MANY}, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
