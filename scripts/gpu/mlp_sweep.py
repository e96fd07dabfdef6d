"""One row's dense MLP as one streaming kernel plus a partial-sum kernel (kernels.mlp,
``TritonOps(fuse_mlp=True)``) against the two products decode runs now (gate|up with RMSNorm
inside, then down with SiLU · up and the residual), on the Llama-3.2-1B shape in bfloat16:

1. error of each against float32 torch on the same inputs;
2. µs an MLP, replayed in a CUDA graph over enough copies of the weights to defeat the 50 MB L2,
   for the current products and each fused configuration;
3. end to end: a BF16 1B file decoded at batch 1 with and without the fused MLP (the best
   configuration of 2.), one session each, interleaved token by token, greedy tokens compared.

Usage: python scripts/gpu/mlp_sweep.py OUT.json   (environment: MODEL=/tmp/llama3.2-1b-bf16.gguf,
ROUNDS=5, TOKENS=24)"""

from __future__ import annotations

import itertools
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from scripts.gpu_engine_check import graph_ms

from driftwood.bench.report import environment, format_table, progress, write_json
from driftwood.model.cuda import kernels as K
from driftwood.model.cuda.decoder import TorchOps, TritonOps

D, FF = 2048, 8192
CONFIGS = [(bh, bk, bd, w, 16, 128) for bh, bk, bd, w in itertools.product((8, 16, 32, 64), (128, 256), (64, 128),
                                                                                (4, 8))
           if bh * bk <= 8192]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def unfused(x, nw, w13, w2, res):
    gu = K.gemv(x, K.DENSE, w13, None, norm=(nw, 1e-5))
    return K.gemv(gu, K.DENSE, w2, None, residual=res, out=res, glu=True)


def kernels() -> tuple[list[dict], dict]:
    copies = 3  # 100 MB each
    mats = [((torch.randn(2 * FF, D, device="cuda") / D**0.5).bfloat16(),
             (torch.randn(D, FF, device="cuda") / FF**0.5).bfloat16()) for _ in range(copies)]
    x = torch.randn(1, D, device="cuda").bfloat16()
    nw = (1 + 0.1 * torch.randn(D, device="cuda")).bfloat16()
    res = torch.randn(1, D, device="cuda").bfloat16()
    w13, w2 = mats[0]
    hm = (TorchOps().rms_norm(x, nw, 1e-5).float() @ w13.float().t()).bfloat16().float()
    want = res.float() + (F.silu(hm[:, :FF]) * hm[:, FF:]) @ w2.float().t()
    errors = {"unfused": rel(unfused(x, nw, w13, w2, res.clone()), want)}
    rows = []
    r = res.clone()

    def run_unfused():
        for a, b in mats:
            unfused(x, nw, a, b, r)

    us = graph_ms(run_unfused) / copies * 1e3
    rows.append({"config": "two products (now)", "us": round(us, 2), "gb_s": round(3 * D * FF * 2 / us / 1e3, 1)})
    for cfg in CONFIGS:
        try:
            errors[str(cfg)] = rel(K.mlp(x, (nw, 1e-5), w13, w2, res.clone(), config=cfg), want)

            def run(cfg=cfg):
                for a, b in mats:
                    K.mlp(x, (nw, 1e-5), a, b, r, out=r, config=cfg)

            us = graph_ms(run) / copies * 1e3
        except Exception as exc:  # a configuration that does not compile
            rows.append({"config": str(cfg), "error": repr(exc)[:200]})
            continue
        rows.append({"config": str(cfg), "us": round(us, 2), "gb_s": round(3 * D * FF * 2 / us / 1e3, 1)})
    return rows, errors


def end_to_end(path: str, config: tuple) -> list[dict]:
    from driftwood.model import load_model

    K.MLP_CONFIG = config
    rounds, tokens = int(os.environ.get("ROUNDS", "5")), int(os.environ.get("TOKENS", "24"))
    prompt = [(i * 7919) % 100000 + 5 for i in range(24 + tokens)]
    model = load_model(path, device="cuda", dtype="bfloat16", progress=False)
    settings = [("two products", TritonOps()), ("fused mlp", TritonOps(fuse_mlp=True))]
    sessions = []
    for _, ops in settings:
        model.decode_ops = ops
        s = model.new_session(capacity=24 + tokens + 4096)
        s.prefill(prompt[:24])
        s.decode(prompt[24])
        sessions.append(s)
    times: list[list[float]] = [[] for _ in settings]
    diffs, same = [], 0
    for _ in range(rounds):
        for s in sessions:
            s.reset()
            s.prefill(prompt[:24])
        for i in range(tokens):
            got = []
            for j, s in enumerate(sessions):
                torch.cuda.synchronize()
                t = time.perf_counter()
                got.append(s.decode(prompt[24 + i]))
                torch.cuda.synchronize()
                times[j].append((time.perf_counter() - t) * 1e3)
            diffs.append(rel(got[1], got[0]))
            same += int(got[1].argmax() == got[0].argmax())
    base = statistics.median(times[0])
    return [{"file": os.path.basename(path), "step": name, "decode_ms_per_token": round(statistics.median(ts), 4),
             "decode_ms_p10": round(statistics.quantiles(ts, n=10)[0], 4),
             "delta_us": round((statistics.median(ts) - base) * 1e3, 1),
             "logits_rel_diff_max": max(diffs) if j else 0.0,
             "greedy_same": f"{same}/{len(diffs)}" if j else "-"}
            for j, ((name, _), ts) in enumerate(zip(settings, times, strict=True))]


def main(out: str) -> int:
    progress("MLP kernels: errors and times in CUDA graphs")
    rows, errors = kernels()
    timed = [r for r in rows if "us" in r]
    best = min((r for r in timed if r["config"] != "two products (now)"), key=lambda r: r["us"])
    print(format_table(sorted(timed, key=lambda r: r["us"])[:12], [("config", "config"), ("us", "us an MLP"),
                                                                  ("gb_s", "GB/s")]))
    print("errors against float32:", {k: f"{v:.2e}" for k, v in list(errors.items())[:4]}, "max",
          f"{max(errors.values()):.2e}")
    model = os.environ.get("MODEL", "/tmp/llama3.2-1b-bf16.gguf")
    progress(f"end to end on {model} with {best['config']}")
    e2e = end_to_end(model, next(cfg for cfg in CONFIGS if str(cfg) == best["config"]))
    print(format_table(e2e, [("file", "file"), ("step", "step"), ("decode_ms_per_token", "ms/token"),
                             ("decode_ms_p10", "p10"), ("delta_us", "vs now us"),
                             ("logits_rel_diff_max", "logits rel diff"), ("greedy_same", "greedy same")]))
    write_json({"benchmark": "mlp-sweep", "environment": environment("cuda"), "kernels": rows, "errors": errors,
                "best": best, "end_to_end": e2e}, out)
    return 0 if max(errors.values()) < 2e-2 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
