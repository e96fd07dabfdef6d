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
import sys

import torch
import torch.nn.functional as F
from scripts.gpu_engine_check import SHAPES_1B, graph_ms

from driftwood.model.cuda import kernels as K
from driftwood.model.cuda import nvrtc
from driftwood.model.llama import rms_norm


def configs(k: int) -> list[tuple[int, int, int]]:
    """(warps, rows a group, warps a row) to try for K = k."""
    if k >= 8192:
        return [(w, r, s) for w in (8, 16) for r in (1, 2) for s in (1, 2, 4, 8) if w % s == 0]
    return [(w, r, s) for w in (4, 8, 16) for r in (1, 2, 4) for s in (1, 2)]
H, HKV, D, CAP, POS = 32, 8, 64, 4160, 1234


def inputs(name: str, dtype: torch.dtype, copies: int = 1, seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    N, Kd = SHAPES_1B[name]
    mats = [(torch.randn(N, Kd, device="cuda", generator=g) / Kd**0.5).to(dtype) for _ in range(copies)]
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


def reference(name: str, w, x, nw, res) -> torch.Tensor:
    if name in ("qkv", "gate_up", "head"):
        xr = rms_norm(x, nw, 1e-5).float()
    elif name == "down":
        g, u = x.float().chunk(2, dim=-1)
        xr = F.silu(g) * u
    else:
        xr = x.float()
    y = xr @ w.float().t()
    return y + res.float() if name in ("o", "down") else y


def caches(dtype):
    return (torch.zeros(1, HKV, CAP, D, device="cuda", dtype=dtype), torch.zeros(1, HKV, CAP, D, device="cuda", dtype=dtype))


def triton(x, w, **kw):
    return K.gemv(x, K.DENSE, w, None, **kw)


def split(x, w, **kw):
    """The CUDA kernel with the columns split among warps, launched with PDL."""
    return nvrtc.gemv_row(x, w, config=(16, 2, 4 if w.shape[1] >= 8192 else 2), pdl=True, **kw)


def check(name: str, dtype: torch.dtype) -> dict:
    (w,), x, nw, res = inputs(name, dtype, seed=1)
    row = {"shape": name, "dtype": str(dtype).split(".")[-1]}
    if name == "qkv":
        (kc, vc), (ks, vs), (kt, vt) = caches(dtype), caches(dtype), caches(dtype)
        q = nvrtc.gemv_row(x, w, **kwargs(name, nw, res, (kc, vc)))
        qs = split(x, w, **kwargs(name, nw, res, (ks, vs)))
        qt = K.gemv(x, K.DENSE, w, None, **kwargs(name, nw, res, (kt, vt)))
        split_out = torch.cat([qs.flatten(), ks[0, :, POS].flatten(), vs[0, :, POS].flatten()]).float()
        qkv = reference(name, w, x, nw, res)  # unrotated
        got = torch.cat([q.flatten(), kc[0, :, POS].flatten(), vc[0, :, POS].flatten()]).float()
        want = torch.cat([qt.flatten(), kt[0, :, POS].flatten(), vt[0, :, POS].flatten()]).float()
        row["rel_err_vs_triton"] = ((got - want).norm() / want.norm()).item()
        row["split_rel_err_vs_triton"] = ((split_out - want).norm() / want.norm()).item()
        row["values_rel_err"] = ((vc[0, :, POS].flatten().float() - qkv[0, (H + HKV) * D:]).norm()
                                 / qkv[0, (H + HKV) * D:].norm()).item()
        row["other_positions_untouched"] = bool(kc[0, :, :POS].abs().sum() == 0 and vc[0, :, POS + 1:].abs().sum() == 0)
        row["ok"] = (max(row["rel_err_vs_triton"], row["split_rel_err_vs_triton"], row["values_rel_err"]) < 1e-2
                     and row["other_positions_untouched"])
        return row
    kw = kwargs(name, nw, res)
    ref = reference(name, w, x, nw, res)
    for label, fn in (("cuda", nvrtc.gemv_row), ("cuda_split", split), ("triton", triton)):
        if "residual" in kw:
            kw = {**kw, "residual": res.clone()}
        y = fn(x, w, **kw).float()
        row[f"rel_err_{label}"] = ((y - ref).norm() / ref.norm()).item()
    row["ok"] = max(row["rel_err_cuda"], row["rel_err_cuda_split"]) < max(1e-2, 1.5 * row["rel_err_triton"])
    return row


def time_shape(name: str) -> list[dict]:
    N, Kd = SHAPES_1B[name]
    nbytes = N * Kd * 2
    copies = max(1, min(16, (200 << 20) // nbytes))
    mats, x, nw, res = inputs(name, torch.bfloat16, copies)
    kv = caches(torch.bfloat16)
    kw = kwargs(name, nw, res, kv)
    rows = []
    variants = [("triton", None)] + [("cuda", c) for c in configs(Kd) if not (name == "qkv" and c[1] % 2)]
    for label, cfg in variants:
        def call(cfg=cfg, label=label):
            for w in mats:
                if label == "triton":
                    K.gemv(x, K.DENSE, w, None, **kw)
                else:
                    nvrtc.gemv_row(x, w, config=cfg, pdl=label == "cuda-pdl", **kw)
        try:
            ms = graph_ms(call) / len(mats)
        except Exception as exc:
            rows.append({"shape": name, "kernel": label, "config": cfg, "error": repr(exc)[:300]})
            continue
        rows.append({"shape": name, "kernel": label, "config": cfg, "us": round(ms * 1e3, 2),
                     "tb_s": round(nbytes / ms / 1e9, 3)})
        if label == "cuda" and len([r for r in rows if r["kernel"] == "cuda"]) == len(variants) - 1:
            top = sorted((r for r in rows if r["kernel"] == "cuda" and "us" in r), key=lambda r: r["us"])[:4]
            variants += [("cuda-pdl", r["config"]) for r in top]
    best = min((r for r in rows if r["kernel"] == "cuda" and "us" in r), key=lambda r: r["us"])
    tri = next(r for r in rows if r["kernel"] == "triton")
    bp = min((r for r in rows if r["kernel"] == "cuda-pdl" and "us" in r), key=lambda r: r["us"])
    print(f"{name:8s} triton {tri.get('us', float('nan')):7.2f} us {tri.get('tb_s', 0):.2f} TB/s | cuda best "
          f"{best['config']} {best['us']:7.2f} us {best['tb_s']:.2f} TB/s | with PDL {bp['config']} {bp['us']:7.2f} us "
          f"{bp['tb_s']:.2f} TB/s", flush=True)
    return rows


def end_to_end(path: str, tokens: int) -> dict:
    from driftwood.model import load_model
    from driftwood.model.cuda.decoder import TritonOps

    model = load_model(path, device="cuda", dtype="bfloat16", progress=False)
    ids = [(i * 7919) % 100000 + 5 for i in range(24)]
    runs = {}
    for label, ops in (("triton", TritonOps(cuda_gemv=False)), ("cuda", TritonOps(cuda_pdl=False)),
                       ("cuda-pdl", TritonOps())):
        model.decode_ops = ops
        s = model.new_session(capacity=256)
        logits = [s.prefill(ids).float().cpu()]
        toks = []
        for _ in range(tokens):
            t = int(logits[-1].argmax())
            toks.append(t)
            logits.append(s.decode(t).float().cpu())
        runs[label] = (toks, torch.stack(logits[1:]))
        s.close()
    ta, la = runs["triton"]
    out = {"model": path, "tokens": tokens, "tokens_triton": ta}
    for label in ("cuda", "cuda-pdl"):
        tb, lb = runs[label]
        rel = ((la - lb).norm(dim=-1) / la.norm(dim=-1)).max().item()
        out[label] = {"greedy_equal": ta == tb, "tokens": tb, "max_step_logits_rel_diff": rel}
        print(f"end to end, {label}: greedy equal {ta == tb}, largest step logits ‖Δ‖/‖ref‖ {rel:.2e}", flush=True)
    return out


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--model")
    p.add_argument("--tokens", type=int, default=24)
    p.add_argument("--stages", default="check,sweep", help="of check, sweep (and the end-to-end run with --model)")
    args = p.parse_args()
    result: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "checks": []}
    if "check" in args.stages:
        result["checks"] = [check(n, dt) for dt in (torch.bfloat16, torch.float16) for n in SHAPES_1B]
        for c in result["checks"]:
            print(c, flush=True)
    if "sweep" in args.stages:
        result["rows"] = [r for n in SHAPES_1B for r in time_shape(n)]
    if args.model:
        result["end_to_end"] = end_to_end(args.model, args.tokens)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    return 0 if all(c["ok"] for c in result["checks"]) else 1


if __name__ == "__main__":
    sys.exit(main())
