"""The dense one-row GEMV (kernels._gemv_kernel, BF16 decode at batch 1) per configuration on
the Llama-3.2-1B shapes: GB/s of weight bytes, each product replayed in a CUDA graph over enough
copies of its matrix to defeat the 50 MB L2, with RMSNorm inside for qkv, gate_up and the head
(as decode runs them: timed from Python, the small products measured Triton's launch overhead),
beside torch.mm (cuBLAS, no norm). Prints the best configuration per shape and
writes JSON. Usage: python scripts/gpu/dense_sweep.py OUT.json"""

from __future__ import annotations

import json
import sys

import torch
from scripts.gpu_engine_check import SHAPES_1B, graph_ms

from driftwood.model.cuda import kernels as K

SHAPES = SHAPES_1B
CONFIGS = [(1, bn, bk, w, False) for bn in (1, 2, 4, 8, 16) for bk in (256, 512, 1024, 2048)
           for w in (1, 2, 4, 8) if bn * bk <= 16384]


def main() -> int:
    rows = []
    for name, (N, Kd) in SHAPES.items():
        nbytes = N * Kd * 2
        copies = max(1, min(16, (200 << 20) // nbytes))
        mats = [torch.randn(N, Kd, device="cuda").bfloat16() for _ in range(copies)]
        x = torch.randn(1, Kd, device="cuda").bfloat16()
        nw = torch.rand(Kd, device="cuda").bfloat16()
        out = torch.empty(1, N, device="cuda", dtype=torch.bfloat16)
        for cfg in [None, *CONFIGS]:
            if cfg is None:
                def call(x=x, out=out, mats=mats):
                    for w in mats:
                        torch.mm(x, w.t(), out=out)
            else:
                norm = (nw, 1e-5) if name in ("qkv", "gate_up", "head") else None  # as decode runs them

                def call(cfg=cfg, x=x, out=out, mats=mats, norm=norm):
                    for w in mats:
                        K.gemv(x, K.DENSE, w, None, out=out, config=cfg, norm=norm)
            try:
                ms = graph_ms(call) / len(mats)
            except Exception as exc:
                rows.append({"shape": name, "config": cfg, "error": repr(exc)[:200]})
                continue
            rows.append({"shape": name, "config": cfg or "torch.mm", "us": ms * 1e3, "gb_s": nbytes / ms / 1e6})
        best = max((r for r in rows if r["shape"] == name and "gb_s" in r and r["config"] != "torch.mm"),
                   key=lambda r: r["gb_s"])
        mm = next(r for r in rows if r["shape"] == name and r["config"] == "torch.mm")
        cur = next((r for r in rows if r["shape"] == name and r["config"] == (1, 4, 1024, 4, False)), None)
        print(f"{name}: best {best['config']} {best['us']:.1f} us {best['gb_s']:.0f} GB/s; current "
              f"{cur['us']:.1f} us {cur['gb_s']:.0f} GB/s; torch.mm {mm['us']:.1f} us {mm['gb_s']:.0f} GB/s", flush=True)
        del mats
    with open(sys.argv[1], "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
