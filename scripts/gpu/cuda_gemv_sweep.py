"""The CUDA C++ one-row GEMV (driftwood.model.cuda.nvrtc) against the Triton kernel decode runs
today, on the Llama-3.2-1B shapes with what decode fuses into each product (qkv: RMSNorm, RoPE
and the cache write; o: residual; gate_up: RMSNorm; down: silu(gate) * up and residual; head:
RMSNorm, float32 out).

1. Correctness: each product against a float32 reference on fresh random inputs (bfloat16 and
   float16), and the QKV product's queries and cache writes against the Triton kernel's.
2. Speed: µs a product replayed in a CUDA graph over enough copies of the matrix to defeat the
   50 MB L2, for each (warps, rows a warp) and the Triton kernel's decode configuration.
3. End to end (``--model``): greedy decode with the Triton kernels and with the CUDA kernel on
   the same weights, logits compared step by step.

Usage: python scripts/gpu/cuda_gemv_sweep.py OUT.json [--stages check,sweep] [--model M.gguf] [--tokens N]"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F
from scripts.gpu_engine_check import SHAPES_1B, graph_ms

from driftwood.model.cuda import kernels as K
from driftwood.model.cuda import nvrtc
from driftwood.model.llama import rms_norm
from driftwood.model.weights import BlockLinear

FORMATS = {"bf16": nvrtc.DENSE, "q4_0": nvrtc.Q4_0, "q8_0": nvrtc.Q8_0}
H, HKV, D, CAP, POS = 32, 8, 64, 4160, 1234


def fmt_name(fmt: int) -> str:
    return next(f for f, v in FORMATS.items() if v == fmt)


def configs(fmt: int, k: int) -> list[tuple[int, int, int]]:
    """(warps, rows a group, warps a row) to try for K = k."""
    if fmt != nvrtc.DENSE:  # and blocks looping over tiles (a fourth element 1: one warp a row)
        return ([(w, r, s) for w in (4, 8, 16) for r in (1, 2, 4) for s in (1, 2, 4)
                 if w % s == 0 and (k // 32) % s == 0 and nvrtc.lane_loads(fmt, k, r, s) <= 8]
                + [(w, r, 1, 1) for w in (4, 8, 16) for r in (1, 2, 4) if 2 * nvrtc.lane_loads(fmt, k, r, 1) <= 8])
    if k >= 8192:
        return [(w, r, s) for w in (8, 16) for r in (1, 2) for s in (1, 2, 4, 8) if w % s == 0]
    return [(w, r, s) for w in (4, 8, 16) for r in (1, 2, 4) for s in (1, 2)]


def matrix(N: int, Kd: int, fmt: int, g: torch.Generator, dtype=torch.bfloat16):
    """A random matrix: (nvrtc.gemv_row's weight arguments, kernels.gemv's, the float32 matrix)."""
    if fmt == nvrtc.DENSE:
        w = (torch.randn(N, Kd, device="cuda", generator=g) / Kd**0.5).to(dtype)
        return {"weight": w, "fmt": fmt, "scales": None}, (K.DENSE, w, None), w.float()
    G = Kd // 32
    scales = (torch.rand(N, G, device="cuda", generator=g) * 0.02 / Kd**0.5 + 1e-4).half()
    if fmt == nvrtc.Q4_0:
        q = torch.randint(0, 16, (N, G, 32), device="cuda", generator=g)
        codes, w = BlockLinear.pack_q4_0(q.to(torch.uint8)), q.float() - 8
    else:
        q = torch.randint(-128, 128, (N, G, 32), device="cuda", generator=g)
        codes, w = BlockLinear.pack_q8_0(q.to(torch.int8)), q.float()
    w = (w * scales.float()[..., None]).reshape(N, Kd)
    return {"weight": codes, "fmt": fmt, "scales": scales}, (fmt, codes, scales), w


def weight_bytes(fmt: int, N: int, Kd: int) -> int:
    return N * Kd * 2 if fmt == nvrtc.DENSE else N * Kd // (2 if fmt == nvrtc.Q4_0 else 1) + N * Kd // 32 * 2


def inputs(name: str, fmt: int, dtype: torch.dtype, copies: int = 1, seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    N, Kd = SHAPES_1B[name]
    mats = [matrix(N, Kd, fmt, g, dtype) for _ in range(copies)]
    x = torch.randn(1, 2 * Kd if name == "down" else Kd, device="cuda", generator=g).to(dtype)
    nw = (torch.rand(Kd, device="cuda", generator=g) + 0.5).to(dtype)
    res = torch.randn(1, N, device="cuda", generator=g).to(dtype)
    return mats, x, nw, res


def kwargs(name: str, nw: torch.Tensor, res: torch.Tensor, caches=None) -> dict:
    """The fusions decode asks of this product (residual passed as a fresh copy by the caller)."""
    if name == "qkv":
        pos = torch.tensor([POS], device="cuda")
        inv = 1.0 / (500000.0 ** (torch.arange(0, D, 2, device="cuda").float() / D))
        return {"norm": (nw, 1e-5), "rope": (pos, inv, *caches, H, HKV, D)}
    if name == "o":
        return {"residual": res}
    if name == "gate_up":
        return {"norm": (nw, 1e-5)}
    if name == "down":
        return {"residual": res, "glu": True}
    return {"norm": (nw, 1e-5), "out_dtype": torch.float32}


def product_reference(w, x, *, norm=None, glu=False, residual=None) -> torch.Tensor:
    """One product in float32 on float32 weights ``w``: x RMS-normed (``norm``: weight, eps) or
    ``silu(gate) * up`` of a gate|up pair (``glu``), plus ``residual``."""
    if norm is not None:
        x = rms_norm(x, *norm).float()
    elif glu:
        g, u = x.float().chunk(2, dim=-1)
        x = F.silu(g) * u
    y = x.float() @ w.t()
    return y if residual is None else y + residual.float()


def reference(name: str, w, x, nw, res) -> torch.Tensor:
    """The 1B product ``name`` as decode fuses it (:func:`kwargs`), in float32."""
    return product_reference(w, x, norm=(nw, 1e-5) if name in ("qkv", "gate_up", "head") else None,
                             glu=name == "down", residual=res if name in ("o", "down") else None)


def caches(dtype):
    return (torch.zeros(1, HKV, CAP, D, device="cuda", dtype=dtype), torch.zeros(1, HKV, CAP, D, device="cuda", dtype=dtype))


def split_config(fmt: int, k: int) -> tuple[int, int, int]:
    """A configuration with the columns split among warps (checked beside the default)."""
    return (16, 2, 4 if k >= 8192 else 2) if fmt == nvrtc.DENSE else (8, 1, 4 if k >= 8192 else 2)


def rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def check(name: str, fmt: int, dtype: torch.dtype) -> dict:
    """The CUDA kernel (its default configuration, without PDL, and a split one with PDL) and the
    Triton kernel against float32 on the same random weights."""
    ((wk, wt, wf),), x, nw, res = inputs(name, fmt, dtype, seed=1)
    row = {"shape": name, "format": fmt_name(fmt), "dtype": str(dtype).split(".")[-1]}
    N, Kd = SHAPES_1B[name]
    cfg = nvrtc.pick(fmt, Kd, N) or nvrtc.default_config(fmt, Kd)  # as decode picks it (or would)
    runs = {"cuda": lambda **kw: nvrtc.gemv_row(x, **wk, config=cfg, **kw),
            "cuda_split": lambda **kw: nvrtc.gemv_row(x, **wk, config=split_config(fmt, x.shape[1]), pdl=True, **kw),
            "triton": lambda **kw: K.gemv(x, *wt, **kw)}
    if fmt != nvrtc.DENSE and name != "qkv":  # blocks looping over tiles
        runs["cuda_loop"] = lambda **kw: nvrtc.gemv_row(x, **wk, config=nvrtc.fit(fmt, Kd, (8, 1, 1, 1)), pdl=True, **kw)
    ref = reference(name, wf, x, nw, res)
    if name == "qkv":  # queries and keys rotated, values as they are: each against Triton, values also against float32
        outs = {}
        for label, fn in runs.items():
            kc, vc = caches(dtype)
            q = fn(**kwargs(name, nw, res, (kc, vc)))
            outs[label] = torch.cat([q.flatten(), kc[0, :, POS].flatten(), vc[0, :, POS].flatten()])
            row[f"values_rel_err_{label}"] = rel(vc[0, :, POS].flatten(), ref[0, (H + HKV) * D:])
            kc[0, :, POS] = 0
            vc[0, :, POS] = 0
            row[f"other_positions_untouched_{label}"] = not kc.any() and not vc.any()
        for label in ("cuda", "cuda_split"):
            row[f"rel_err_{label}_vs_triton"] = rel(outs[label], outs["triton"])
        row["ok"] = (max(row["rel_err_cuda_vs_triton"], row["rel_err_cuda_split_vs_triton"]) < 1e-2
                     and all(row[f"values_rel_err_{k}"] < 1e-2 for k in runs)
                     and all(row[f"other_positions_untouched_{k}"] for k in runs))
        return row
    for label, fn in runs.items():
        kw = kwargs(name, nw, res)
        if "residual" in kw:
            kw["residual"] = kw["out"] = res.clone()
        row[f"rel_err_{label}"] = rel(fn(**kw), ref)
    row["ok"] = max(row[f"rel_err_{k}"] for k in runs if k != "triton") < max(1e-2, 1.5 * row["rel_err_triton"])
    return row


def time_shape(name: str, fmt: int) -> list[dict]:
    """µs a product: the Triton kernel decode ran before, every CUDA configuration without PDL,
    then the four fastest with PDL (the same product back to back over the copies)."""
    N, Kd = SHAPES_1B[name]
    nbytes = weight_bytes(fmt, N, Kd)
    copies = max(1, min(16, (200 << 20) // nbytes))
    mats, x, nw, res = inputs(name, fmt, torch.bfloat16, copies)
    kw = kwargs(name, nw, res, caches(torch.bfloat16))
    if "residual" in kw:
        kw["out"] = kw["residual"]
    fname = fmt_name(fmt)
    rows: list[dict] = []
    variants = [("triton", None)] + [("cuda", c) for c in configs(fmt, Kd) if not (name == "qkv" and c[1] % 2)]
    for label, cfg in variants:
        def call(cfg=cfg, label=label):
            for wk, wt, _ in mats:
                if label == "triton":
                    K.gemv(x, *wt, **kw)
                else:
                    nvrtc.gemv_row(x, **wk, config=cfg, pdl=label == "cuda-pdl", **kw)
        try:
            ms = graph_ms(call) / len(mats)
        except Exception as exc:
            rows.append({"shape": name, "format": fname, "kernel": label, "config": cfg, "error": repr(exc)[:300]})
            continue
        rows.append({"shape": name, "format": fname, "kernel": label, "config": cfg, "us": round(ms * 1e3, 2),
                     "tb_s": round(nbytes / ms / 1e9, 3)})
        if label == "cuda" and len([r for r in rows if r["kernel"] == "cuda"]) == len(variants) - 1:
            top = sorted((r for r in rows if r["kernel"] == "cuda" and "us" in r), key=lambda r: r["us"])[:4]
            variants += [("cuda-pdl", r["config"]) for r in top]
    best = {k: min((r for r in rows if r["kernel"] == k and "us" in r), key=lambda r: r["us"], default=None)
            for k in ("triton", "cuda", "cuda-pdl")}
    print(f"{fname:5s} {name:8s} " + " | ".join(
        f"{k} {b['config'] or ''} {b['us']:.2f} us {b['tb_s']:.2f} TB/s" for k, b in best.items() if b), flush=True)
    return rows


def end_to_end(path: str, tokens: int) -> dict:
    """Greedy decode with the Triton kernels, then the same tokens fed (teacher-forced) through
    the step with the CUDA kernels, so that every step's logits are compared on the same inputs
    (random weights give near-ties: one flipped argmax would change every later input)."""
    from driftwood.model import load_model
    from driftwood.model.cuda.decoder import TritonOps

    model = load_model(path, device="cuda", dtype="bfloat16", progress=False)
    ids = [(i * 7919) % 100000 + 5 for i in range(24)]
    out: dict = {"model": path, "tokens": tokens}
    forced: list[int] = []
    ref = None
    for label, ops in (("triton", TritonOps(cuda_gemv=False, cuda_quant=False)), ("cuda", TritonOps(cuda_pdl=False)),
                       ("cuda-pdl", TritonOps())):
        model.decode_ops = ops
        s = model.new_session(capacity=256)
        logits = [s.prefill(ids).float()]
        for i in range(tokens):
            if label == "triton":
                forced.append(int(logits[-1].argmax()))
            logits.append(s.decode(forced[i]).float())
        s.close()
        got = torch.stack(logits[1:]).cpu()
        if ref is None:
            ref, out["tokens_triton"] = got, forced
            continue
        rel = ((got - ref).norm(dim=-1) / ref.norm(dim=-1)).max().item()
        agree = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
        out[label] = {"max_step_logits_rel_diff": rel, "argmax_agreement": agree}
        print(f"end to end, {os.path.basename(path)} {label}: largest step logits ‖Δ‖/‖ref‖ {rel:.2e}, "
              f"argmax agrees at {agree:.0%} of {tokens} steps", flush=True)
    del model
    torch.cuda.empty_cache()
    return out


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--model")
    p.add_argument("--tokens", type=int, default=24)
    p.add_argument("--stages", default="check,sweep", help="of check, sweep (and the end-to-end run with --model)")
    p.add_argument("--formats", default="bf16,q4_0,q8_0")
    p.add_argument("--shapes", default=",".join(SHAPES_1B), help="of " + ", ".join(SHAPES_1B))
    args = p.parse_args()
    fmts = [FORMATS[f] for f in args.formats.split(",")]
    shapes = args.shapes.split(",")
    result: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "checks": [],
                    "command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if "check" in args.stages:
        result["checks"] = [check(n, f, dt) for f in fmts for dt in (torch.bfloat16, torch.float16) for n in shapes]
        for c in result["checks"]:
            print(c, flush=True)
    if "sweep" in args.stages:
        result["rows"] = [r for f in fmts for n in shapes for r in time_shape(n, f)]
    if args.model:
        result["end_to_end"] = [end_to_end(m, args.tokens) for m in args.model.split(",")]
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    return 0 if all(c["ok"] for c in result["checks"]) else 1


if __name__ == "__main__":
    sys.exit(main())
