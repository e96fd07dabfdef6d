"""The int8-activation kernels (kernels._qgemv_i8_kernel through dp4a for one row,
kernels._qgemm_i8_kernel through int8 tensor-core dots for more) against the configurations
decode runs now, on the Llama-3.2-1B shapes, Q4_0 and Q8_0: first each against float32 torch on
the dequantized weights (the error of int8 activations), then GB/s of weight bytes, each product
replayed in a CUDA graph over enough copies of its matrix to defeat the 50 MB L2, RMSNorm inside
for qkv, gate_up and the head as decode runs them (the int8 kernels quantize inside the
product for one row, in a kernel before it for more: both are in the time).

Usage: python scripts/gpu/int8_sweep.py OUT.json   (environment: ROWS=1,8,16,32,64 the row counts,
FORMATS=q4_0,q8_0, SHAPES=qkv,o,gate_up,down,head)"""

from __future__ import annotations

import itertools
import json
import os
import sys
import time

import torch
from scripts.gpu_engine_check import SHAPES_1B, time_quantized

from driftwood.model.cuda import kernels as K

SHAPES = SHAPES_1B
DP4A = [("dp4a", bn, wpt) for bn in (2, 4, 8, 16, 32) for wpt in (2, 4)]
# ("i8", BLOCK_M, BLOCK_N, num_warps, num_stages, split). The variants measured on 2026-11-22 and dropped
# (Q4_0's nibbles read twice, the unsigned codes' offset term in the epilogue, sub-blocks sharing a tile, two
# groups an iteration, the next group loaded ahead) are in experiment-int8-sweep-*-cuda-2026-11-22.json
I8 = {
    64: [("i8", 64, bn, 4, st, sp) for bn in (64, 128) for st in (3, 5) for sp in (1, 4, 8)]
    + [("i8", 64, bn, 8, 3, sp) for bn in (128, 256) for sp in (1, 4)] + [("i8", 64, 256, 4, 3, 1)],
    32: [("i8", 32, bn, 4, 4, sp) for bn in (64, 128) for sp in (1, 4)],
    16: [("i8", 16, bn, 4, 4, sp) for bn in (64, 128) for sp in (1, 4)],
    8: [("i8", 16, bn, 4, 4, sp) for bn in (64, 128) for sp in (1, 4)],
    4: [("i8", 16, bn, 4, 4, sp) for bn in (64, 128) for sp in (1, 4)] + [("gemvT", bn, 4) for bn in (2, 8, 16)]
    + [("dp4a", bn, 4) for bn in (4, 16)],
    2: [("i8", 16, 64, 4, 4, sp) for sp in (1, 4)] + [("gemvT", bn, 4) for bn in (2, 8, 16)]
    + [("dp4a", bn, 4) for bn in (4, 16)],
}
if os.environ.get("I8_SPLITS"):  # e.g. I8_SPLITS=2,3: the 64-row configurations with these splits only
    I8[64] = [("i8", 64, 128, 4, st, int(sp)) for st in (3, 5) for sp in os.environ["I8_SPLITS"].split(",")]
ROWS = [int(m) for m in os.environ.get("ROWS", "1,8,16,32,64").split(",")]
FORMATS = [{"q4_0": K.Q4_0, "q8_0": K.Q8_0}[f] for f in os.environ.get("FORMATS", "q4_0,q8_0").split(",")]
if os.environ.get("SHAPES"):
    SHAPES = {s: SHAPES[s] for s in os.environ["SHAPES"].split(",")}


# ("mma", warps a block, 8-row tiles a warp, PDL, 16-row tiles of x a block): driftwood.model.cuda.mma (4 weight
# tiles a warp spill at 64 rows)
MMA = [("mma", wn, nt, pdl, ms) for wn, nt in ((2, 1), (4, 1), (4, 2), (8, 2)) for pdl in (True, False)
       for ms in (1, 2, 4)]
if os.environ.get("MMA_ROWS_A_BLOCK"):  # e.g. 1,4
    MMA = [c for c in MMA if str(c[4]) in os.environ["MMA_ROWS_A_BLOCK"].split(",")]
if os.environ.get("MMA_SPLITS"):  # e.g. 2,4,8: the groups split among blocks (a sixth element)
    MMA += [("mma", wn, nt, True, ms, int(ks)) for wn, nt in ((2, 1), (4, 1), (4, 2), (8, 2)) for ms in (2, 4)
            for ks in os.environ["MMA_SPLITS"].split(",")]


def candidates(fmt: int, m: int, n: int, k: int) -> list[tuple]:
    """The configuration decode picks now, dequantize + cuBLAS, then the int8 ones (MMA=1: the
    configuration before the mma kernels, dequantize + cuBLAS and the mma configurations)."""
    now = K.pick_config(fmt, m, n, k)
    base = [now] + ([("mm", 0)] if now != ("mm", 0) else [])
    if m == 1:
        return base + DP4A
    if os.environ.get("MMA") == "1":
        before = K.pick_config(fmt, m, n, k, mma=False)
        return list(dict.fromkeys([now, before, ("mm", 0), *MMA]))
    return base + I8.get(m, [])


def errors(fmt: int) -> list[dict]:
    """Each int8 kernel on a 1B shape (gate_up, with RMSNorm; down with SiLU-gating and the
    residual) against float32 on the dequantized weights, beside the kernel decode runs now."""
    out = []
    g = torch.Generator(device="cuda").manual_seed(int.from_bytes(os.urandom(4), "little"))
    for name in ("gate_up", "down"):
        N, Kd = SHAPES_1B[name]
        per_word = 8 if fmt == K.Q4_0 else 4
        codes = torch.randint(-2**31, 2**31 - 1, (N, Kd // per_word), dtype=torch.int32, device="cuda", generator=g)
        scales = (torch.rand(N, Kd // 32, device="cuda", generator=g) * 0.01).half()
        w = K.dequantize(fmt, codes, scales, torch.empty(N, Kd, device="cuda"))  # float32, exact
        for m in sorted({1, *ROWS}):
            glu = name == "down"
            x = torch.randn(m, 2 * Kd if glu else Kd, device="cuda", generator=g).bfloat16()
            res = torch.randn(m, N, device="cuda", generator=g).bfloat16() if glu else None
            nw = torch.rand(Kd, device="cuda", generator=g).bfloat16()
            if glu:
                h = torch.nn.functional.silu(x[:, :Kd].float()) * x[:, Kd:].float()
                ref = res.float() + h @ w.t()
            else:
                xf = x.float()
                h = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)).bfloat16().float() * nw.float()
                ref = h @ w.t()
            cands = candidates(fmt, m, N, Kd)
            for cfg in cands[:1] + [c for c in cands if c[0] in ("dp4a", "i8") and (c[0] != "i8" or c[5] in (1, 4))][:6]:
                if glu:
                    r = res.clone()
                    y = K.gemv(x, fmt, codes, scales, glu=True, residual=r, out=r, config=cfg)
                elif K.fuses_norm(fmt, m, config=cfg):
                    y = K.gemv(x, fmt, codes, scales, norm=(nw, 1e-5), config=cfg)
                else:
                    y = K.gemv(K.rms_norm(x, nw, 1e-5), fmt, codes, scales, config=cfg)
                err = float((y.float() - ref).norm() / ref.norm())
                out.append({"shape": name, "fmt": fmt, "M": m, "config": cfg, "rel_err": err})
                print(f"error {name} fmt={fmt} M={m} {cfg}: {err:.2e}", flush=True)
    return out


def sweep(fmt: int) -> list[dict]:
    rows = []
    for name, (N, Kd) in SHAPES.items():
        timed = time_quantized(fmt, name, ROWS, lambda m, n, k: candidates(fmt, m, n, k))
        rows += timed
        for r in timed:
            if "error" in r:
                print(f"sweep {name} fmt={fmt} M={r['M']} {r['config']}: {r['error'][:200]}", flush=True)
        for m in ROWS:
            here = [r for r in timed if r["M"] == m and "us" in r]
            now = here[0] if here and here[0]["config"] == K.pick_config(fmt, m, N, Kd) else None
            best = min(here, key=lambda r: r["us"], default=None)
            if best and now:
                print(f"sweep {name} fmt={fmt} M={m}: now {now['config']} {now['us']:.1f} us; best {best['config']} "
                      f"{best['us']:.1f} us {best['gb_s']:.0f} GB/s", flush=True)
    return rows


def totals(rows: list[dict]) -> list[dict]:
    """Per (format, rows): the step's products (16 layers + the head) with the configurations
    decode picks now against the best measured per shape."""
    out = []
    for fmt, m in itertools.product(FORMATS, ROWS):
        now = best = 0.0
        picks = {}
        for name, (N, Kd) in SHAPES.items():
            here = [r for r in rows if r["shape"] == name and r["M"] == m and r["fmt"] == fmt and "us" in r]
            if not here:
                break
            cur = next((r for r in here if tuple(r["config"]) == tuple(K.pick_config(fmt, m, N, Kd))), None)
            b = min(here, key=lambda r: r["us"])
            weight = 1 if name == "head" else 16
            now += weight * (cur["us"] if cur else float("nan"))
            best += weight * b["us"]
            picks[name] = b["config"]
        else:
            out.append({"fmt": fmt, "M": m, "now_us": now, "best_us": best, "best": picks})
            print(f"step products fmt={fmt} M={m}: now {now:.0f} us, best {best:.0f} us {picks}", flush=True)
    return out


def main() -> int:
    t0 = time.time()
    env = {k: os.environ[k] for k in ("ROWS", "FORMATS", "SHAPES", "I8_SPLITS", "MMA", "MMA_SPLITS", "MMA_ROWS_A_BLOCK")
           if os.environ.get(k)}
    result = {"environment": {"device": "cuda", "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                              "date": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime()),
                              "command": " ".join([*(f"{k}={v}" for k, v in env.items()), "python scripts/gpu/int8_sweep.py",
                                                   *sys.argv[1:]])},
              "errors": [], "sweep": []}
    for fmt in FORMATS if os.environ.get("MMA") != "1" else []:  # tests/model/test_mma.py checks those
        result["errors"] += errors(fmt)
    for fmt in FORMATS:
        result["sweep"] += sweep(fmt)
        with open(sys.argv[1], "w") as f:
            json.dump(result, f, indent=1)
    result["totals"] = totals(result["sweep"])
    result["seconds"] = time.time() - t0
    with open(sys.argv[1], "w") as f:
        json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
